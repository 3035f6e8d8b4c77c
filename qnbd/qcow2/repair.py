"""Repairs of a qcow2 image that rewrite its structures, as qemu-img check -r does
(block/qcow2-refcount.c: rebuild_refcount_structure, qcow2_mark_clean): called by
check.py once the check has counted every reference.

Crash safety: a repair never changes what the current header points to until its
replacement is durable (Barrier.BEFORE_HEADER); a crash in the middle leaves the old
structure, or the new one, never a mix.
"""

from array import array

from ..block.check_result import FIX_LEAKS
from ..block.storage import Barrier
from ..errors import ImageError
from . import header as hdr
from .entries import encode_table
from .refcount import WordBlock


def rebuild_refcounts(ck, fix: int) -> None:
    """Write a new refcount table and blocks, holding the computed refcounts, past
    the end of the file; switch the header to them; the old structure becomes free.
    Crash-safe order (qemu's rebuild_refcount_structure): nothing the old header
    points to is touched; the new structure is durable before the header names it."""
    r = ck.result
    old = (r.corruptions, r.leaks)
    r.messages.append("Rebuilding refcount structure")
    counts = ck.counts
    # The old table and blocks are referenced only by the header being replaced.
    for offset, size in ck.refcount_structure:
        for c in range(offset >> ck.cb, (offset + size - 1 >> ck.cb) + 1):
            counts[c] -= 1
    per_block = ck.stored.per_block
    regions = {c // per_block for c in _nonzero_runs_starts(counts, per_block)}
    start = max(len(counts), -(-ck.file_size // ck.cs))
    table_clusters, blocks = 1, []
    while True:
        end = start + table_clusters + len(blocks)
        needed = sorted(regions | set(range(start // per_block,
                                            (end - 1) // per_block + 1)))
        clusters = -(-(needed[-1] + 1) * 8 // ck.cs)
        if needed == blocks and clusters == table_clusters:
            break
        blocks, table_clusters = needed, clusters
    if table_clusters * ck.cs > hdr.MAX_REFTABLE_BYTES:
        raise ImageError("the rebuilt refcount table would be too large")
    counts.extend(bytes(counts.itemsize * (end - len(counts))))
    for c in range(start, end):
        counts[c] = 1
    table = array("Q", bytes(table_clusters * ck.cs))
    for n, region in enumerate(blocks):
        offset = (start + table_clusters + n) << ck.cb
        table[region] = offset
        block = ck.stored.block_class(bytes(ck.cs), ck.stored.bits)
        values = counts[region * per_block:(region + 1) * per_block]
        if isinstance(block, WordBlock):
            block.entries[:len(values)] = values
        else:
            for i, v in enumerate(values):
                if v:
                    block.set(i, v)
        ck.file.pwrite(block.encode(), offset)
    ck.file.pwrite(encode_table(table), start << ck.cb)
    ck.file.sync(Barrier.BEFORE_HEADER)
    ck.h.refcount_table_offset = start << ck.cb
    ck.h.refcount_table_clusters = table_clusters
    _write_header(ck)
    # Recount against the new structure: what is left are the unfixable corruptions.
    r.corruptions = r.leaks = 0
    ck.reload_stored()
    if ck.calculate(0):
        r.messages.append("ERROR rebuilt refcount structure is still broken")
    # Anything the new structure itself leaked is reclaimed; only what cannot be
    # fixed is reported (qemu counts those as fresh leaks).
    kept = (r.corruptions, r.corruptions_fixed, r.leaks_fixed)
    ck.compare(fix & FIX_LEAKS, False)
    fresh_leaks = r.leaks
    r.corruptions, r.corruptions_fixed, r.leaks_fixed = kept
    r.leaks = 0
    r.corruptions_fixed += max(0, old[0] - r.corruptions)
    r.leaks_fixed += max(0, old[1] - r.leaks)
    r.leaks += fresh_leaks

def mark_clean(ck) -> None:
    """After a successful repair: clear the dirty bit (refcounts are right again) and
    the corrupt bit (qemu's qcow2_mark_clean and qcow2_mark_consistent)."""
    h = ck.h
    bits = hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT
    if h.incompatible_features & bits:
        h.incompatible_features &= ~bits
        ck.file.sync(Barrier.REPAIR)
        _write_header(ck)

def _write_header(ck) -> None:
    """Write the header fields that changed, and only those bytes, so the usual
    change (bytes 48-59 or 72-79) is one small write within the first sector."""
    new = ck.h.encode()
    old = ck.raw_header[:len(new)]
    first = next((i for i in range(len(new)) if i >= len(old) or new[i] != old[i]), None)
    if first is None:
        return
    last = max(i for i in range(len(new)) if i >= len(old) or new[i] != old[i])
    ck.file.pwrite(new[first:last + 1], first)
    ck.file.sync(Barrier.HEADER)
    ck.raw_header = new + ck.raw_header[len(new):]


def _nonzero_runs_starts(counts: array, per_block: int):
    """One index per refcount-block region holding a non-zero count."""
    for start in range(0, len(counts), per_block):
        if last_nonzero(counts[start:start + per_block]) >= 0:
            yield start


def last_nonzero(values: array) -> int:
    """Index of the last non-zero element, -1 if none."""
    raw = values.tobytes().rstrip(b"\0")
    return -(-len(raw) // values.itemsize) - 1 if raw else -1
