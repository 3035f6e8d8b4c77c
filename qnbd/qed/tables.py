"""The QED tables: the L1 table (in memory, written back entry by entry), the cache of
L2 tables (qnbd/block/cache.py), and the end of the file, where every new cluster is
allocated. qed_spec.txt, "Tables" and "Logical offset translation".

Allocation is append-only (as QEMU's qed_alloc_clusters): QED has no refcounts, so a
cluster is in use exactly when a table points to it, and new clusters are taken from the
end of the file. Nothing is ever freed while the image is open.

Ordering (docs/DESIGN.md rule 12). Consistency across a crash is NEED_CHECK's job
(image.py): every table change happens while it is durably set, so no barrier is
needed between a new L2 table and the L1 entry naming it (a table a crash left unwritten
reads as zeros, all unallocated, or lies past the end of the file and is dropped by the
check; either way only unflushed writes are lost). One order does keep flushed data: with
a backing file, the data of a new cluster (copy-on-write from the backing file around
the bytes written) is durable before the L2 entry that maps it. Otherwise a crash could
leave the entry pointing to a cluster that reads zeros where the backing file's data had
shown through before; QEMU flushes there for the same reason (qed.c, qed_aio_write_cow).
Without a backing file such a cluster reads zeros either way.
"""

import sys
from array import array

from ..block.cache import TableCache
from ..block.storage import Barrier, Storage
from ..errors import IOFailure
from .header import Header, cluster_offset_valid, table_offset_valid

UNALLOCATED = 0  # "Data cluster offsets": 0 - unallocated
ZERO = 1  # 1 - zero cluster


def decode_table(raw: bytes) -> array:
    table = array("Q", raw)
    if sys.byteorder != "little":
        table.byteswap()
    return table


def encode_table(table: array) -> bytes:
    if sys.byteorder == "little":
        return table.tobytes()
    swapped = array("Q", table)
    swapped.byteswap()
    return swapped.tobytes()


class Geometry:
    """How a guest offset splits into L1 index, L2 index and byte offset."""

    def __init__(self, h: Header):
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_size.bit_length() - 1
        self.entries = h.table_bytes // 8  # TABLE_NOFFSETS
        self.l2_bits = self.entries.bit_length() - 1
        self.table_shift = self.cluster_bits + self.l2_bits  # bytes one L2 table maps


class Tables:
    def __init__(self, storage: Storage, h: Header, l2_capacity: int):
        self.storage = storage
        self.header = h
        self.geometry = Geometry(h)
        self.table_bytes = h.table_bytes
        cs = h.cluster_size
        size = storage.size()
        self.end = size - size % cs  # the allocation end ("Normally the file size...")
        # L1 entries past those the image size needs are never used for mapping but are
        # kept (and written back) as they are.
        self.l1 = decode_table(storage.pread(h.table_bytes, h.l1_table_offset))
        self._l1_dirty: set[int] = set()
        # Clusters holding tables: a data entry that points into one is refused, so a
        # damaged image never makes us write guest data over metadata.
        self.metadata: set[int] = set()
        self._add_table(h.l1_table_offset)
        for entry in self.l1:
            if entry and table_offset_valid(h, entry, self.end):
                self._add_table(entry)
        self.l2_cache = TableCache(
            "qed-l2", storage, self._load_l2, encode_table, l2_capacity,
            barrier=Barrier.BEFORE_L2 if h.backing_file is not None else None,
            data=(storage,))

    def _add_table(self, offset: int) -> None:
        first = offset // self.header.cluster_size
        self.metadata.update(range(first, first + self.header.table_size))

    # -- allocation --------------------------------------------------------------------

    def allocate(self, nbytes: int) -> int:
        """`nbytes` (whole clusters) at the end of the file."""
        offset = self.end
        self.end += nbytes
        return offset

    # -- L2 tables ---------------------------------------------------------------------

    def l2_for_read(self, l1_index: int):
        """The L2 table of an L1 entry, or None where the entry is unallocated."""
        offset = self.l1[l1_index]
        return self.l2_cache.get(offset) if offset else None

    def new_l2(self, l1_index: int) -> array:
        """A new, empty L2 table for an unallocated L1 entry (written back, and the
        entry with it, at the next write-back)."""
        offset = self.allocate(self.table_bytes)
        self._add_table(offset)
        table = array("Q", bytes(self.table_bytes))
        self.l2_cache.mark_dirty(offset, table)
        self.l1[l1_index] = offset
        self._l1_dirty.add(l1_index)
        return table

    def set_entries(self, l1_index: int, table: array, first: int, values) -> None:
        table[first:first + len(values)] = array("Q", values)
        self.l2_cache.mark_dirty(self.l1[l1_index], table)

    def check_data_offset(self, entry: int, writing: bool) -> None:
        """An L2 entry that names a data cluster must point inside the file, after the
        header ("Consistency checking", invariant 2), and when written to, not into a
        table."""
        h = self.header
        if not cluster_offset_valid(h, entry, self.end):
            raise IOFailure(f"QED L2 entry 0x{entry:x} is not a valid cluster offset "
                            "(unaligned, in the header or past the end of the file)")
        if writing and entry // h.cluster_size in self.metadata:
            raise IOFailure(f"QED L2 entry 0x{entry:x} points into a table; write refused")

    # -- write-back --------------------------------------------------------------------

    def write_dirty(self) -> None:
        """Dirty L2 tables (after the data they map, with a backing file), then dirty L1
        entries (no barrier between: see the module's docstring)."""
        self.l2_cache.write_dirty()
        if self._l1_dirty:
            base = self.header.l1_table_offset
            for i in sorted(self._l1_dirty):
                self.storage.pwrite(encode_table(self.l1[i:i + 1]), base + 8 * i)
            self._l1_dirty.clear()

    def _load_l2(self, offset: int) -> array:
        h = self.header
        if not table_offset_valid(h, offset, self.end):
            raise IOFailure(f"QED L2 table offset 0x{offset:x} is invalid or past the "
                            "end of the file")
        if h.l1_table_offset < offset + self.table_bytes and \
                offset < h.l1_table_offset + self.table_bytes:
            raise IOFailure(f"QED L2 table offset 0x{offset:x} overlaps the L1 table")
        raw = self.storage.pread(self.table_bytes, offset)
        return decode_table(raw + bytes(self.table_bytes - len(raw)))
