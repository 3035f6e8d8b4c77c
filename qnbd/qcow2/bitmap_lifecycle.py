"""The life cycle of an image's persistent bitmaps (docs/DESIGN.md rule 9); their on-disk
structures are in bitmap_format.py.

Open: read the directory and the tables (bounded by qemu's constraints), never the bits:
a usable bitmap's data is paged on demand (bitmap_data.py). Read-write: set in_use on disk
(durable) before any write.
While open: `mark` dirties the enabled (auto) bitmaps for every write, zero and discard.
Clean close: `store` writes the chunks that changed to new clusters (unchanged chunks keep
their clusters), new tables, then a new directory, then points the header at it
(Barrier.BEFORE_HEADER: data, tables, directory and their refcounts durable first, rule 2),
and only then hands back the old tables, data and directory for release (rule 3: the
header no longer names them).
"""

import logging
from array import array
from collections.abc import Callable

from ..block.storage import Barrier, Storage
from ..errors import ImageError
from . import bitmap_format as bm
from . import header as hdr
from ..block.bitmap_data import ChunkReader, DirtyBitmap
from .header_update import HeaderWriter
from .layout import Layout
from .metadata_map import MetadataMap
from .refcount import Refcounts

log = logging.getLogger("qnbd.qcow2")


class PersistentBitmaps:
    def __init__(self, storage: Storage, header_writer: HeaderWriter, layout: Layout,
                 metadata: MetadataMap, refcounts: Refcounts, read_only: bool):
        self.storage = storage
        self.header_writer = header_writer
        self.header = header_writer.header
        self.layout = layout
        self.metadata = metadata
        self.refcounts = refcounts
        self.read_only = read_only
        self.entries: list[bm.DirectoryEntry] = []  # directory order, as stored next
        self.loaded: dict[str, DirtyBitmap] = {}
        self._on_disk: dict[str, tuple[int, array]] = {}  # name -> (table offset, table)
        self._reader = ChunkReader(storage, layout.cluster_size)
        self._directory: tuple[int, int] | None = None  # (offset, size) on disk
        self._drop_extension = False
        self._changed = False
        self._tracking: list[DirtyBitmap] = []
        self._load()
        if not read_only and self.loaded:
            self._mark_in_use()

    # -- loading -----------------------------------------------------------------------

    def _load(self) -> None:
        h = self.header
        ext = h.extension(hdr.EXT_BITMAPS)
        if ext is None:
            return
        if not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            # qcow2.rst: without the autoclear bit the extension must be considered
            # inconsistent (a program without bitmap support wrote the image).
            log.warning("%s: bitmaps extension is inconsistent (autoclear bit clear); "
                        "its bitmaps are ignored", self.storage.path)
            self._drop_extension = not self.read_only
            self._changed = self._drop_extension
            return
        storage = self.storage
        file_size = storage.size()
        cs = self.layout.cluster_size
        disk_size = self.layout.size
        self.entries = bm.read_directory(storage, ext, disk_size, cs, file_size)
        _nb, size, offset = bm.parse_extension(ext)
        self._directory = (offset, size)
        self.metadata.add_range(offset, size)
        for entry in self.entries:
            table = bm.read_table(storage, entry, cs, file_size)
            self._on_disk[entry.name] = (entry.table_offset, table)
            self.metadata.add_range(entry.table_offset, entry.table_size * 8)
            for data in bm.data_clusters(table):
                self.metadata.add_range(data, cs)
            if entry.usable:
                self.loaded[entry.name] = DirtyBitmap(entry, disk_size, cs, self._reader,
                                                      table)
        self._retrack()

    def _retrack(self) -> None:
        self._tracking = [b for b in self.loaded.values() if b.entry.auto]

    def _mark_in_use(self) -> None:
        """Rule 9: in_use is on disk before the first write can change the disk."""
        for i, entry in enumerate(self.entries):
            if entry.name in self.loaded:
                entry = entry._replace(flags=entry.flags | bm.FLAG_IN_USE)
                self.entries[i] = entry
        offset, _size = self._directory
        self.storage.pwrite(bm.encode_directory(self.entries), offset)
        self.storage.sync(Barrier.BITMAPS_IN_USE)
        self._changed = True

    # -- use ---------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        for bitmap in self._tracking:
            bitmap.set_range(offset, length)

    def get(self, name: str) -> DirtyBitmap:
        """A consistent bitmap by name, for export; one-line errors as qemu-nbd's."""
        if name in self.loaded:
            return self.loaded[name]
        if any(e.name == name for e in self.entries):
            raise ImageError(f"Bitmap '{name}' is inconsistent and cannot be used")
        raise ImageError(f"Bitmap '{name}' is not found")

    def describe(self) -> list[bm.DirectoryEntry]:
        return list(self.entries)

    # -- operations (qemu-img bitmap) ----------------------------------------------------

    def _require_writable(self) -> None:
        if self.read_only:
            raise ImageError("bitmap operations need the image opened read-write")

    def add(self, name: str, granularity: int | None = None, disabled: bool = False) -> None:
        self._require_writable()
        layout = self.layout
        if granularity is None:
            # qemu's default: the cluster size, at least 4 KiB.
            granularity = max(4096, layout.cluster_size)
        gbits = bm.check_new_bitmap(name, granularity, self.entries, layout.version,
                                    layout.size, layout.cluster_size)
        flags = bm.FLAG_IN_USE | (0 if disabled else bm.FLAG_AUTO)
        entry = bm.DirectoryEntry(name, 0, bm.table_entries(layout.size, granularity,
                                                            layout.cluster_size), flags, gbits)
        self.entries.append(entry)
        self.loaded[name] = DirtyBitmap(entry, layout.size, layout.cluster_size)
        self._changed = True
        self._retrack()

    def remove(self, name: str) -> None:
        self._require_writable()
        self._entry_index(name)
        self.entries = [e for e in self.entries if e.name != name]
        self.loaded.pop(name, None)
        self._changed = True
        self._retrack()

    def clear(self, name: str) -> None:
        self._require_writable()
        self.get(name).clear()
        self._changed = True

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._require_writable()
        bitmap = self.get(name)
        flags = (bitmap.entry.flags | bm.FLAG_AUTO) if enabled else \
            (bitmap.entry.flags & ~bm.FLAG_AUTO)
        bitmap.entry = bitmap.entry._replace(flags=flags)
        self.entries[self._entry_index(name)] = bitmap.entry
        self._changed = True
        self._retrack()

    def merge(self, name: str, source: DirtyBitmap) -> None:
        self._require_writable()
        self.get(name).merge_from(source)
        self._changed = True

    def check_resizable(self) -> None:
        """qcow2_truncate_bitmaps_check: every bitmap must be loaded to follow a resize
        (one left in use, or unusable, would keep a table of the old size)."""
        if any(e.name not in self.loaded for e in self.entries):
            raise ImageError("Cannot resize qcow2 with persistent bitmaps that were not "
                             "loaded")

    def resize(self, size: int) -> None:
        """The loaded bitmaps follow the image's new size; stored on close, as any
        change (their tables are allocated anew there, at the new size)."""
        for bitmap in self.loaded.values():
            bitmap.resize(size)
            self._changed = True

    def _entry_index(self, name: str) -> int:
        for i, e in enumerate(self.entries):
            if e.name == name:
                return i
        raise ImageError(f"Bitmap '{name}' is not found")

    # -- storing -----------------------------------------------------------------------

    def store(self) -> list[tuple[int, int]]:
        """Write the bitmaps and a new directory and switch the header to it; returns
        the old tables, data and directory, (offset, length) each, for the caller to
        release. Every cluster is allocated before anything is written: an allocation
        refused as inconsistent (it would land on metadata) then leaves the file as it
        was. Data clusters of unchanged chunks are named by the new tables too: never
        rewritten, never released (the old tables and the new ones agree on them)."""
        if not self._changed:
            return []
        writes: list[tuple[int, Callable[[], bytes]]] = []  # (offset, what to write there)
        new_entries = []
        tables: dict[str, array] = {}
        for entry in self.entries:
            bitmap = self.loaded.get(entry.name)
            if bitmap is None:
                new_entries.append(entry)  # inconsistent or unusable: kept untouched
                continue
            table = array("Q", bitmap.table_to_store(lambda chunk: self._place_chunk(chunk,
                                                                                     writes)))
            tables[entry.name] = table
            table_offset = self._place(bm.encode_table(table), writes) if table else 0
            new_entries.append(bitmap.entry._replace(
                table_offset=table_offset, table_size=len(table),
                flags=bitmap.entry.flags & ~bm.FLAG_IN_USE))
        kept = {e.name for e in new_entries if e.name not in self.loaded}
        releases = self._old_clusters(kept, tables)
        h = self.header
        if new_entries:
            directory = bm.encode_directory(new_entries)
            offset = self._place(directory, writes)
            h.set_extension(hdr.EXT_BITMAPS, bm.BITMAPS_EXT.pack(len(new_entries), 0,
                                                                 len(directory), offset))
            h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
        else:
            h.set_extension(hdr.EXT_BITMAPS, None)
            h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        for offset, produce in writes:
            data = produce()
            self.storage.pwrite(data, offset)
            self.metadata.add_range(offset, len(data))
        self.refcounts.cache.flush(Barrier.BEFORE_HEADER)
        self.header_writer.rewrite()
        self._after_store(new_entries, tables)
        return [(offset, length) for offset, length in releases if length]

    def _old_clusters(self, kept: set[str], tables: dict[str, array]) -> list[tuple[int, int]]:
        """What the stored directory stops naming: old directory, old tables, and their
        data clusters that no new table reuses."""
        cs = self.layout.cluster_size
        reused = {d for t in tables.values() for d in bm.data_clusters(t)}
        releases = [self._directory] if self._directory else []
        for name, (table_offset, table) in self._on_disk.items():
            if name in kept:
                continue
            releases.append((table_offset, len(table) * 8))
            releases.extend((d, cs) for d in bm.data_clusters(table) if d not in reused)
        return releases

    def _after_store(self, entries: list[bm.DirectoryEntry], tables: dict[str, array]) -> None:
        """The stored state becomes the base: released clusters may now be reused for
        guest data, so nothing read from them may stay cached."""
        self._reader.forget()
        self.entries = entries
        for entry in entries:
            bitmap = self.loaded.get(entry.name)
            if bitmap is not None:
                bitmap.entry = entry
                bitmap.stored(tables[entry.name])
                self._on_disk[entry.name] = (entry.table_offset, tables[entry.name])
        self._on_disk = {e.name: self._on_disk[e.name] for e in entries
                         if e.name in self._on_disk}
        self._directory = None
        ext = self.header.extension(hdr.EXT_BITMAPS)
        if ext is not None:
            _nb, size, offset = bm.parse_extension(ext)
            self._directory = (offset, size)
        self._retrack()
        self._changed = False

    def _place_chunk(self, produce: Callable[[], bytes], writes: list) -> int:
        """Allocate a data cluster for a chunk whose bytes `produce()` gives at write time."""
        offset = self.refcounts.allocate(1)
        writes.append((offset, produce))
        return offset

    def _place(self, data: bytes, writes: list) -> int:
        """Allocate clusters for `data` (zero-padded) and queue its write."""
        cs = self.layout.cluster_size
        count = max(1, -(-len(data) // cs))
        offset = self.refcounts.allocate(count)
        padded = data + bytes(count * cs - len(data))
        writes.append((offset, lambda: padded))
        return offset
