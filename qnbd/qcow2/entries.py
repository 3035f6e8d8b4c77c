"""L1 and L2 table entries: qcow2.rst, "Cluster mapping".

Entries are 64-bit big-endian on disk; tables are held in memory as native `array('Q')`
(byte-swapped once when loaded or stored) so lookups index a C array.
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
