"""The cluster tables: the L1 table (in memory, written back entry by entry) and the
cache of L2 tables. qcow2.rst, "Cluster mapping".

Ordering (docs/DESIGN.md, "Durability"): the L2 cache comes after the refcount cache
(rule 2; not with lazy refcounts, rule 6) and after the data storage (rule 4: data, and
copy-on-write data, before the entry that maps it); L1 entries are written only once
the L2 tables they point to are durable (rule 4). Loading validates what the tables
point to (rule 8), so a damaged image fails one request instead of spreading damage.
"""

from array import array

from ..block.cache import TableCache
from ..block.storage import Barrier, Storage
from ..errors import ImageError, IOFailure
from .entries import L1E_OFFSET_MASK, decode_table, encode_table
from .header import Header
from .layout import Layout


class ClusterTables:
    def __init__(self, storage: Storage, header: Header, layout: Layout, refcounts,
                 mark_corrupt, l2_capacity: int, data_storage: Storage,
                 l1: tuple[int, int] | None = None):
        """refcounts: where the refcount table lies, and the cache L2 tables come after;
        mark_corrupt(reason): rule 7; l1: (offset, entries) of the L1 table when it is not
        the header's (an internal snapshot's, read-only)."""
        self.storage = storage
        self.layout = layout
        self._header = header
        self._refcounts = refcounts
        self._mark_corrupt = mark_corrupt
        self.l1_offset, l1_size = l1 or (header.l1_table_offset, header.l1_size)
        raw = storage.pread(l1_size * 8, self.l1_offset)
        if len(raw) != l1_size * 8:
            raise ImageError(f"L1 table at 0x{self.l1_offset:x} is past the end of the file")
        self.l1 = decode_table(raw)
        # A snapshot taken before the image grew has a shorter table: what it does not
        # map is unallocated (qcow2.rst, "Snapshots": l1_size may differ).
        needed = -(-header.size >> layout.table_shift)
        if len(self.l1) < needed:
            self.l1.extend([0] * (needed - len(self.l1)))
        self._l1_dirty: set[int] = set()
        lazy = header.lazy_refcounts and header.version >= 3
        self.l2_cache = TableCache(
            "l2", storage, self._load_l2, encode_table, l2_capacity,
            barrier=Barrier.BEFORE_L2, after=() if lazy else (refcounts.cache,),
            data=(data_storage,))

    def l2_offsets(self):
        return (e & L1E_OFFSET_MASK for e in self.l1 if e & L1E_OFFSET_MASK)

    def l2_for_read(self, l1_index: int):
        """The L2 table of an L1 entry, or None where the entry is unallocated."""
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        return self.l2_cache.get(offset) if offset else None

    def set_l1(self, l1_index: int, entry: int) -> None:
        self.l1[l1_index] = entry
        self._l1_dirty.add(l1_index)

    def has_dirty(self) -> bool:
        return bool(self._l1_dirty) or self.l2_cache.has_dirty()

    def write_dirty(self) -> None:
        """Dirty L2 tables (after their own dependencies), then dirty L1 entries."""
        self.l2_cache.write_dirty()
        if self._l1_dirty:
            self.l2_cache.flush(Barrier.BEFORE_L1)  # rule 4: tables before L1 entries
            for i in sorted(self._l1_dirty):
                self.storage.pwrite(encode_table(self.l1[i:i + 1]), self.l1_offset + 8 * i)
            self._l1_dirty.clear()

    def grow_l1(self, entries: int, header_writer) -> tuple[int, int]:
        """Move the L1 table to new clusters with `entries` entries (qcow2_grow_l1_table,
        exact size). The new table and the refcounts of its clusters are durable before
        the header points to it (rules 2 and 4). Returns the old table's (offset, bytes),
        to be released once the header change is durable (rule 3). No L1 entry may be
        dirty (the caller has flushed)."""
        assert not self._l1_dirty
        cs = self.layout.cluster_size
        table = array("Q", self.l1)
        table.extend([0] * (entries - len(table)))
        clusters = -(-entries * 8 // cs)
        offset = self._refcounts.allocate(clusters)
        self.storage.pwrite(encode_table(table).ljust(clusters * cs, b"\0"), offset)
        self._refcounts.cache.write_dirty()
        self.storage.sync(Barrier.BEFORE_HEADER)
        old = (self.l1_offset, len(self.l1) * 8)
        header_writer.move_l1(offset, entries)
        self.l1, self.l1_offset = table, offset
        return old

    def _load_l2(self, offset: int) -> array:
        cs = self.layout.cluster_size
        if offset % cs or offset + cs > self.storage.size():
            reason = f"L2 table offset 0x{offset:x} is invalid or past the end of the file"
        elif self._is_fixed_table(offset):
            # Else writing this "L2 table" back would overwrite the header, the L1 table
            # or the refcount table (QEMU's overlap check for metadata writes).
            reason = (f"L2 table offset 0x{offset:x} overlaps the header, the L1 table or "
                      "the refcount table")
        else:
            return decode_table(self.storage.pread(cs, offset))
        self._mark_corrupt(reason)
        raise IOFailure(reason)

    def _is_fixed_table(self, offset: int) -> bool:
        """Whether the cluster at `offset` is the header or in the L1 or refcount table."""
        cs = self.layout.cluster_size
        h, rc = self._header, self._refcounts
        return (offset < cs
                or h.l1_table_offset <= offset + cs - 1
                and offset < h.l1_table_offset + h.l1_size * 8
                or rc.table_offset <= offset
                and offset < rc.table_offset + (rc.table_clusters << self.layout.cluster_bits))
