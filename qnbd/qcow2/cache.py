"""A write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks).

Modelled on QEMU's block/qcow2-cache.c: write ordering is a property of the cache. Before
a cache writes back any dirty table, it calls its `barrier`, which makes whatever that
table may point to durable first (DESIGN.md rules 2 and 4: refcounts before the L2 entries
that use them, data before the L2 entry that maps it). Eviction of a dirty table writes it
back, so memory stays bounded by `capacity` tables whatever the image size.
"""

from collections.abc import Callable

import cachetools


class _EvictingLRU(cachetools.LRUCache):
    def __init__(self, maxsize: int, on_evict: Callable):
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self):
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


class TableCache:
    def __init__(self, name: str, read: Callable[[int], object], write: Callable[[int, object], None],
                 capacity: int, barrier: Callable[[], None] | None = None):
        """read(offset) loads and decodes a table; write(offset, table) encodes and stores
        it; barrier() is called before any write-back."""
        self.name = name
        self._read = read
        self._write = write
        self._barrier = barrier
        self._dirty: set[int] = set()
        self._tables = _EvictingLRU(max(2, capacity), self._evicted)

    def get(self, offset: int):
        table = self._tables.get(offset)
        if table is None:
            table = self._read(offset)
            self._tables[offset] = table
        return table

    def mark_dirty(self, offset: int, table) -> None:
        """Record that `table` (stored at `offset`) changed. Callers pass the table back
        because it may have been evicted while they held it."""
        if self._tables.get(offset) is not table:
            self._tables[offset] = table
        self._dirty.add(offset)

    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def write_dirty(self) -> None:
        """Write every dirty table back (not fsynced: the caller orders its fsyncs)."""
        if not self._dirty:
            return
        if self._barrier:
            self._barrier()
        for offset in sorted(self._dirty):
            self._write(offset, self._tables[offset])
        self._dirty.clear()

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster is no longer metadata (never written back)."""
        self._dirty.discard(offset)
        self._tables.pop(offset, None)

    def __len__(self) -> int:
        return len(self._tables)

    def _evicted(self, offset: int, table) -> None:
        if offset in self._dirty:
            if self._barrier:
                self._barrier()
            self._write(offset, table)
            self._dirty.discard(offset)
