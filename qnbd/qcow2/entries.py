"""L1 and L2 table entries: qcow2.rst, "Cluster mapping" and "Extended L2 Entries".

Entries are 64-bit big-endian on disk; tables are held in memory as native `array('Q')`
(byte-swapped once when loaded or stored) so lookups index a C array. An extended L2
entry is two such words: the descriptor at index 2*i, its subcluster bitmap at 2*i+1.
"""

import sys
from array import array

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


def l2_entries(table: array, version: int, external: bool = False, extended: bool = False):
    """(index in `table`, descriptor, kind, subcluster bitmap or 0) of each entry of an
    L2 table as decode_table() holds it, for the walks over whole tables (check); entries
    all zero (unallocated, nothing to count or check) are left out."""
    if not extended:
        for i, e in enumerate(table):
            if e:
                yield i, e, classify(e, version, external), 0
        return
    for i in range(0, len(table), 2):
        e, bitmap = table[i], table[i + 1]
        if e or bitmap:
            yield i, e, classify_extended(e, external), bitmap
