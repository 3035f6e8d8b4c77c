"""Metadata contexts for NBD_CMD_BLOCK_STATUS (proto.md "Metadata querying", qemu
docs/interop/nbd.rst).

The registry is data: a context is an id, a name, the LIST wildcards that include it and an
extent function `(offset, length) -> [(length, flags), ...]` (runs from `offset`, possibly
stopping early). Providers turn an export into its contexts; the handshake and transmission
code only see `MetaContext`s. The contexts of an export, in qemu-nbd's order (that order is
also the order of their chunks in a BLOCK_STATUS reply):
- `base:allocation` (proto.md): bit 0 HOLE, bit 1 ZERO, across the backing chain;
- `qemu:allocation-depth` (-A): the flags are the depth, 0 = unallocated in the whole chain,
  1 = this image, 2 = its backing file, ...;
- `qemu:dirty-bitmap:NAME` (-B NAME): bit 0 set where the bitmap is dirty, runs at the
  bitmap's granularity (clipped to the request, as qemu's bitmap_to_extents).

Query rules, as qemu-nbd's nbd_negotiate_meta_queries (qemu nbd/server.c):
- LIST_META_CONTEXT with no query lists every context of the export. The leaf-less queries
  `base:`, `qemu:` and `qemu:dirty-bitmap:` are wildcards for LIST only; any other query
  lists the exact name if the export offers it.
- SET_META_CONTEXT selects exact names only: wildcards and unknown names are ignored, never
  errors ("the server MUST ignore ... rather than report an error").
- Replies come in the export's order, each context once, whatever the order of the queries.
"""

from collections.abc import Callable
from dataclasses import dataclass

from ..block.extents import FIRST_WINDOW

# Descriptors per chunk: the spec asks for at most 2^20; far fewer keeps replies small
# while a client still always makes progress.
MAX_DESCRIPTORS = 1 << 16

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP = "qemu:dirty-bitmap:"
# qemu:dirty-bitmap:NAME flag (qemu docs/interop/nbd.rst).
DIRTY = 1

ExtentFunction = Callable[[int, int], list[tuple[int, int]]]


@dataclass(frozen=True)
class MetaContext:
    name: str
    source: ExtentFunction          # (offset, length) -> (length, flags) runs from offset
    wildcards: tuple[str, ...] = ()  # LIST queries, besides the exact name, that include it
    id: int = 0                     # the id SET_META_CONTEXT hands out; unique per export

    def extents(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        """Descriptors covering consecutive bytes from `offset`, never past `length`: equal
        neighbours merged, one only for NBD_CMD_FLAG_REQ_ONE, at least one always ("MUST
        return at least one status descriptor").

        For REQ_ONE the source is asked for FIRST_WINDOW bytes (as block/extents.py's
        first_extent does, here merging by the context's flags), then for twice as many
        each time the first descriptor is still growing, and no more once a second one
        begins: qemu's client sends REQ_ONE for the rest of the disk each time, and
        mapping all of it to answer one extent cost ~1 ms a request on an image of small
        clusters (issue 17). The work stays within twice what the first extent needs."""
        end = offset + length
        out: list[tuple[int, int]] = []
        window = FIRST_WINDOW if one else length
        while offset < end:
            start = offset
            for n, flags in self.source(offset, min(window, end - offset)):
                n = min(n, end - offset)
                if n <= 0:
                    break
                if out and out[-1][1] == flags:
                    out[-1] = (out[-1][0] + n, flags)
                else:
                    out.append((n, flags))
                offset += n
            if offset == start or len(out) >= MAX_DESCRIPTORS or one and len(out) > 1:
                break
            window *= 2
        if not out:  # nothing reported (past a short backing file): flags 0 are always safe
            out.append((end - offset, 0))
        return out[:1] if one else out[:MAX_DESCRIPTORS]


def _base_allocation(device) -> ExtentFunction:
    # The BlockDevice flags are base:allocation's bits (qnbd/block/base.py).
    return lambda offset, length: [(e.length, e.flags)
                                   for e in device.block_status(offset, length)]


def _allocation_depth(device) -> ExtentFunction:
    return lambda offset, length: [(e.length, e.depth)
                                   for e in device.block_status(offset, length)]


def _dirty_bitmap(bitmap) -> ExtentFunction:
    # Runs are at least one granule long (but for the first), so asking for at most
    # MAX_DESCRIPTORS granules bounds the work of one call by what a reply can carry: a
    # fine bitmap whose bits alternate would otherwise list every run of a 4 GiB request
    # (8 million of them) before the reply is cut to MAX_DESCRIPTORS (issue 16).
    window = MAX_DESCRIPTORS * bitmap.granularity
    return lambda offset, length: [(n, DIRTY if dirty else 0)
                                   for n, dirty in bitmap.extents(offset, min(length, window))]


# A provider returns the contexts (without ids) one export offers. An Export offers
# `device`, `allocation_depth` (bool) and `bitmaps` (DirtyBitmaps, in -B order).
Provider = Callable[[object], list[MetaContext]]
_providers: list[Provider] = [
    lambda export: [MetaContext(BASE_ALLOCATION, _base_allocation(export.device), ("base:",))],
    lambda export: ([MetaContext(ALLOCATION_DEPTH, _allocation_depth(export.device), ("qemu:",))]
                    if export.allocation_depth else []),
    lambda export: [MetaContext(DIRTY_BITMAP + b.name, _dirty_bitmap(b), ("qemu:", DIRTY_BITMAP))
                    for b in export.bitmaps],
]


def contexts_for(export) -> list[MetaContext]:
    """Every context `export` offers, numbered from 1 in a stable order."""
    found = [ctx for provider in _providers for ctx in provider(export)]
    return [MetaContext(c.name, c.source, c.wildcards, i) for i, c in enumerate(found, 1)]


def list_contexts(available: list[MetaContext], queries: list[str]) -> list[MetaContext]:
    if not queries:
        return list(available)
    wanted = set(queries)
    return [c for c in available if c.name in wanted or wanted.intersection(c.wildcards)]


def select_contexts(available: list[MetaContext], queries: list[str]) -> list[MetaContext]:
    wanted = set(queries)
    return [c for c in available if c.name in wanted]
