"""L1 and L2 table entries: qcow2.rst, "Cluster mapping" and "Extended L2 Entries".

Entries are 64-bit big-endian on disk; tables are held in memory as native `array('Q')`
(byte-swapped once when loaded or stored) so lookups index a C array. An extended L2
entry is two such words: the descriptor at index 2*i, its subcluster bitmap at 2*i+1.
"""

import sys
from array import array
from itertools import chain, compress

OFLAG_COPIED = 1 << 63  # refcount of the pointed cluster is exactly 1 (rule 5)
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1  # standard cluster descriptor bit 0 (v3 only): reads as zeros
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
L1E_RESERVED_MASK = 0x7F000000000001FF  # bits 0-8 and 56-62
L2E_STANDARD_RESERVED_MASK = 0x3F000000000001FE  # bits 1-8 and 56-61

# Extended L2 entries (incompatible bit 4): 32 subclusters a cluster; in the bitmap word,
# bit x is "subcluster x allocated" and bit 32+x "subcluster x reads as zeros".
SUBCLUSTERS = 32
SUBCLUSTER_BITS = 5
ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

# What a guest cluster maps to.
UNALLOCATED, DATA, ZERO, COMPRESSED = range(4)

_SWAP = sys.byteorder == "little"


def decode_table(raw: bytes) -> array:
    table = array("Q", raw)
    if _SWAP:
        table.byteswap()
    return table


def encode_table(table: array) -> bytes:
    if not _SWAP:
        return table.tobytes()
    out = array("Q", table)
    out.byteswap()
    return out.tobytes()


class CompressedLayout:
    """Compressed cluster descriptor, qcow2.rst: with x = 62 - (cluster_bits - 8), bits
    0..x-1 are the host offset and bits x..61 the number of additional 512-byte sectors."""

    def __init__(self, cluster_bits: int):
        self.shift = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.shift) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def host_range(self, entry: int) -> tuple[int, int]:
        """(host offset, byte count) of the compressed data; the count may run past the
        data's real end (the last sector is shared or partly unused)."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.shift) & self.sectors_mask) + 1
        return offset, sectors * 512 - (offset & 511)


def subcluster_mask(first: int, end: int) -> int:
    """Bits first..end-1 of a 32-bit subcluster half-bitmap."""
    return ((1 << end) - 1) ^ ((1 << first) - 1)


def classify_extended(entry: int, external: bool = False) -> int:
    """Kind of the descriptor word of an extended L2 entry: COMPRESSED, DATA (a host
    cluster; which subclusters it holds is the bitmap's business) or UNALLOCATED. Bit 0
    is not a zero flag here (qcow2.rst: "with extended L2 entries, this is always 0";
    QEMU ignores it, and so do we)."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & L2E_OFFSET_MASK or external and entry & OFLAG_COPIED:
        return DATA
    return UNALLOCATED


def bitmap_problem(kind: int, bitmap: int) -> str | None:
    """What is wrong with the subcluster bitmap of an extended L2 entry of `kind`
    (qcow2.rst, "Subcluster Allocation Bitmap"), or None."""
    alloc = bitmap & ALL_SUBCLUSTERS
    if kind == COMPRESSED:
        return "a compressed cluster has a non-zero subcluster bitmap" if bitmap else None
    if alloc & (bitmap >> SUBCLUSTERS):
        return "subclusters are both allocated and reading as zeros"
    if alloc and kind != DATA:
        return "subclusters are allocated without a host cluster"
    return None


def classify(entry: int, version: int, external: bool = False) -> int:
    """Kind of a standard-format L2 entry (zero flag only exists from version 3). With an
    external data file (`external`), guest cluster 0 maps to host offset 0: COPIED with
    a zero offset is allocated there (qcow2.rst, "Standard Cluster Descriptor")."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if version >= 3 and entry & OFLAG_ZERO:
        return ZERO
    if entry & L2E_OFFSET_MASK or external and entry & OFLAG_COPIED:
        return DATA
    return UNALLOCATED


def run_end(table, i: int, stop: int, entry: int, step: int) -> int:
    """The index after the last entry of table[i:stop] that continues `entry` =
    table[i]: each `step` more than the one before (the next host cluster; 0: the same
    entry again), never past the offset field. A run of one costs one compare; longer
    runs are compared a slice at a time in C, slices doubling while they match, then
    the end found by halving."""
    if step:  # host offsets never carry past the offset field (bits 9-55)
        stop = min(stop, i + (L2E_OFFSET_MASK - (entry & L2E_OFFSET_MASK)) // step + 1)
    j = i + 1
    if j >= stop or table[j] != entry + step:
        return j
    j += 1
    size = 2
    while j < stop:
        k = min(size, stop - j)
        first = entry + (j - i) * step
        expected = array("Q", range(first, first + k * step, step)) if step \
            else array("Q", (entry,)) * k
        if table[j:j + k] != expected:
            matched, unmatched = 0, k  # table[j:j + matched] matches, [j:j + unmatched] not
            while unmatched - matched > 1:
                mid = (matched + unmatched) // 2
                if table[j:j + mid] == expected[:mid]:
                    matched = mid
                else:
                    unmatched = mid
            return j + matched
        j += k
        size *= 2
    return j


_RUN = 256
_ZERO_RUN = array("Q", bytes(8 * _RUN))


def nonzero(table: array):
    """(index, value) of the non-zero words of a table. A sparse image's tables are
    mostly zeros: all-zero runs of _RUN words are skipped with one compare each and the
    rest filtered in C, so a check of a sparse 1 TiB image keeps up with qemu-img's."""
    runs = ((k, table[k:k + _RUN]) for k in range(0, len(table), _RUN))
    return chain.from_iterable(compress(enumerate(run, k), run)
                               for k, run in runs if run != _ZERO_RUN)


def l2_entries(table: array, version: int, external: bool = False, extended: bool = False):
    """(index in `table`, descriptor, kind, subcluster bitmap or 0) of each entry of an
    L2 table as decode_table() holds it, for the walks over whole tables (check); entries
    all zero (unallocated, nothing to count or check) are left out."""
    if not extended:
        for i, e in nonzero(table):
            yield i, e, classify(e, version, external), 0
        return
    last = -1
    for i, _word in nonzero(table):
        i &= ~1   # an entry is a descriptor and its bitmap: either may be the non-zero one
        if i != last:
            last = i
            yield i, table[i], classify_extended(table[i], external), table[i + 1]
