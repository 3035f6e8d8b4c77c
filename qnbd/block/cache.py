"""A write-back cache of cluster-sized metadata tables (qcow2 L2 tables and refcount
blocks; QED L2 tables), shared by the format engines.

Modelled on QEMU's block/qcow2-cache.c: write ordering is a property of the caches
(docs/DESIGN.md, "Durability"). A cache names what its tables may point to: other caches
(`after`, e.g. L2 tables after refcount blocks) and storages holding data written for it
(`data`, e.g. guest data written before the L2 entry that maps it). Before it writes back
any dirty table, it writes the dirty tables of the caches it comes after, then issues its
`barrier`: one fsync of every storage involved that has unsynced writes. So whoever
causes a write-back (a flush, an eviction, a caller) cannot get the order wrong.
Eviction of a dirty table writes it back, so memory stays bounded by `capacity` tables
whatever the image size.

Each cache counts its hits and misses (issue 15, metrics): two integers, as cheap as the
lookup. `caches_behind` finds the caches a served device goes through.
"""

from collections.abc import Callable

import cachetools

from .storage import Barrier, Storage, sync_all


class _EvictingLRU(cachetools.LRUCache):
    def __init__(self, maxsize: int, on_evict: Callable):
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self):
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


class TableCache:
    def __init__(self, name: str, storage: Storage, read: Callable[[int], object],
                 encode: Callable[[object], bytes], capacity: int, *,
                 barrier: Barrier | None = None, after: tuple = (), data: tuple = ()):
        """read(offset) loads and decodes a table, encode(table) gives its bytes. With a
        `barrier`, the tables of the caches in `after` and the writes to the storages in
        `data` are made durable before any table of this cache is written."""
        self.name = name
        self.storage = storage
        self._read = read
        self._encode = encode
        self._barrier = barrier
        self._after = after
        self._sync = tuple({id(s): s for s in (*(c.storage for c in after), *data)}.values())
        self._dirty: set[int] = set()
        self._tables = _EvictingLRU(max(2, capacity), self._evicted)
        self.hits = 0
        self.misses = 0   # tables read from the storage

    def get(self, offset: int):
        table = self._tables.get(offset)
        if table is None:
            self.misses += 1
            table = self._read(offset)
            self._tables[offset] = table
        else:
            self.hits += 1
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
        """Write every dirty table back, after what they depend on (not fsynced: a
        cache's own writes become durable at the next barrier of whoever depends on it,
        or at `flush`)."""
        if not self._dirty:
            return
        self._before_write()
        for offset in sorted(self._dirty):
            self.storage.pwrite(self._encode(self._tables[offset]), offset)
        self._dirty.clear()

    def flush(self, barrier: Barrier) -> None:
        """Write back and make durable: what a cache that depends on this one needs."""
        self.write_dirty()
        self.storage.sync(barrier)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster is no longer metadata (never written back)."""
        self._dirty.discard(offset)
        self._tables.pop(offset, None)

    def __len__(self) -> int:
        return len(self._tables)

    def _before_write(self) -> None:
        if self._barrier is None:
            return
        for cache in self._after:
            cache.write_dirty()
        sync_all(self._sync, self._barrier)

    def _evicted(self, offset: int, table) -> None:
        if offset in self._dirty:
            self._before_write()
            self.storage.pwrite(self._encode(table), offset)
            self._dirty.discard(offset)


def caches_behind(device) -> list[TableCache]:
    """The table caches a device's reads and writes go through: each image's own
    (`table_caches`, set by the engines) down its backing chain. Devices that wrap another
    one (a window, an overlay) answer `table_caches` with the caches behind it; a
    point-in-time view answers none, its reads are counted by the live device's."""
    out: list[TableCache] = []
    while device is not None:
        out += getattr(device, "table_caches", ())
        device = getattr(device, "backing", None)
    return out
