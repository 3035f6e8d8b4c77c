"""Creating, applying and deleting internal snapshots: qcow2.rst, "Snapshots"; what
qemu's block/qcow2-snapshot.c does, ordered so that every crash leaves either the old
snapshot table or the new one (docs/DESIGN.md rule 15).

A snapshot is a copy of the active L1 table; every cluster it reaches (L2 tables, data,
compressed data) takes one more reference per path, as qemu counts them (an L2 table
shared by two L1 tables counts its data clusters twice). COPIED (rule 5) is only kept
true in the active tables: it says "refcount 1", so it is cleared where a snapshot starts
to share a cluster and set again where a deleted snapshot stops sharing one.

Those flag changes and the refcounts they describe sit in different clusters: no
ordering makes both agree at every instant. So create and delete set the dirty bit
(v3), durably, before the first such change and clear it once everything is written:
a crash in between leaves a dirty image whose refcounts and flags any read-write open
(ours, or qemu's) rebuilds, as with lazy refcounts (rule 6). The snapshot table itself
changes by one header write (`HeaderWriter.switch_snapshot_table`). Applying needs no
dirty bit: the applied layer shares everything with its snapshot, so no flag of it
says "refcount 1"; its new L1 table and size go live in one header write, then the old
layer's references are dropped (rule 3). v2 images have no dirty bit: there, as with
qemu, a crash inside create or delete can leave flags that qemu-img check reports, never
a lost reference (rule 15 says which flags, and why no data is at risk).
"""

import contextlib
import errno
from array import array
from collections.abc import Callable, Iterator

from ..block.check_result import Progress
from ..block.storage import Barrier, Storage
from ..errors import CorruptImage, IOFailure, ImageError
from . import header as hdr
from .entries import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                      decode_table, encode_table, run_end)
from .header_update import HeaderWriter
from .metadata_map import MetadataMap
from .refcount import Refcounts
from .snapshots import MAX_SNAPSHOTS, Snapshot, encode_table as encode_snapshots
from .tables import ClusterTables
from .writer import ClusterWriter

MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE (qcow2_validate_table of a snapshot)


class SnapshotFailure(IOFailure):
    """A snapshot operation refused or failed: `errno` is what qemu's driver returns
    (qemu-img prints its strerror); `verbatim`: qemu prints the message itself."""

    def __init__(self, message: str, code: int, verbatim: bool = False):
        super().__init__(message, code)
        self.verbatim = verbatim


class SnapshotUpdater:
    def __init__(self, storage: Storage, header_writer: HeaderWriter, tables: ClusterTables,
                 refcounts: Refcounts, metadata: MetadataMap, writer: ClusterWriter,
                 flush: Callable[[], None], abandon: Callable[[], None],
                 table_bytes: int):
        """flush(): the image's flush (dirty metadata in dependency order, the queued
        releases once their references are gone, then fsync); abandon(): nothing more
        may be written (an operation failed half-way: what memory holds is not to be
        trusted, what the disk holds is covered by the dirty bit or only leaks);
        table_bytes: the size of the snapshot table the header names."""
        self.abandon = abandon
        self.table_bytes = table_bytes
        self.storage = storage
        self.header_writer = header_writer
        self.header = header_writer.header
        self.tables = tables
        self.refcounts = refcounts
        self.metadata = metadata
        self.writer = writer
        self.flush = flush
        # One step per L2 table walked, the total known when an operation starts (so
        # that the bar only grows): the snapshot command draws it on a terminal.
        self.progress: Progress = Progress()

    @property
    def layout(self):
        return self.tables.layout  # replaced on resize and apply

    # -- the three operations ----------------------------------------------------------

    def create(self, snapshots: list[Snapshot], new: Snapshot) -> list[Snapshot]:
        """Add `new` (its l1 fields are filled here) after `snapshots`; returns the new
        list. qcow2_snapshot_create."""
        if len(snapshots) >= MAX_SNAPSHOTS:
            raise SnapshotFailure("too many snapshots", errno.EFBIG)
        h = self.header
        _check_l1_size(h.l1_size)
        self.flush()
        active = array("Q", self.tables.l1[:h.l1_size])
        # One more reference for everything the active tables reach; refused as a whole
        # (qemu: EINVAL) where a refcount would overflow.
        self._expect((active, 3))   # _check_room, _increment, _clear_copied
        references = self._references(active)
        self._check_room(references)
        with self._changing(dirty=True):
            self._increment(references)
            self._clear_copied(active, active_l1=True)
            l1_offset = self._write_l1(array("Q", (e & ~OFLAG_COPIED for e in active)))
            self.flush()  # refcounts, then L2 tables, then L1 entries (their barriers)
            table = snapshots + [new._replace(l1_offset=l1_offset, l1_size=h.l1_size)]
            self._switch_table(table)
        return table

    def apply(self, snapshot: Snapshot, size: int) -> int:
        """Make `snapshot` the active layer, at `size` bytes (the snapshot's disk size);
        returns the new L1 table's entry count. qcow2_snapshot_goto, preceded by the
        resize qemu does when the sizes differ, in one header write."""
        _check_l1_size(snapshot.l1_size)
        self.flush()
        needed = -(-size >> self.layout.table_shift)
        source = self._read_l1(snapshot)
        # _check_room, _increment, _clear_copied of the snapshot; _release_tables of
        # the layer it replaces.
        self._expect((source, 3), (self.tables.l1[:self.header.l1_size], 1))
        references = self._references(source)
        self._check_room(references)
        with self._changing(dirty=False):
            return self._apply(source, size, needed, references)

    def _apply(self, source: array, size: int, needed: int, references) -> int:
        self._increment(references)
        # The snapshot's L2 tables are shared from now on: no entry says refcount 1.
        # (Only the snapshot uses them yet, so a crash before the switch shows nothing.)
        self._clear_copied(source, active_l1=False)
        new_l1 = array("Q", (e & ~OFLAG_COPIED for e in source))
        new_l1.extend([0] * (needed - len(new_l1)))
        old_l1, old_offset, old_entries = self.tables.l1, self.tables.l1_offset, \
            self.header.l1_size
        l1_offset = self._write_l1(new_l1)
        self.refcounts.cache.write_dirty()
        self.tables.write_dirty()  # after the refcounts (BEFORE_L2)
        self.storage.sync(Barrier.BEFORE_HEADER)
        self.header_writer.switch_active(size, l1_offset, len(new_l1))
        self.tables.l1, self.tables.l1_offset = new_l1, l1_offset
        # Rule 3: the old layer's references go once the header no longer names them.
        self._release_tables(array("Q", old_l1[:old_entries]))
        if old_entries:
            self.writer.queue_release(old_offset, old_entries * 8)
        self.flush()
        return len(new_l1)

    def delete(self, snapshots: list[Snapshot], victim: Snapshot) -> list[Snapshot]:
        """Remove `victim` from the table, drop its references, and set COPIED again
        where the active layer is now alone. qcow2_snapshot_delete."""
        _check_l1_size(victim.l1_size)
        self.flush()
        source = self._read_l1(victim)
        # _release_tables of the victim, _set_copied of the active layer.
        self._expect((source, 1), (self.tables.l1[:self.header.l1_size], 1))
        table = [s for s in snapshots if s is not victim]
        with self._changing(dirty=True):
            self._switch_table(table)
            self._release_tables(source)
            if victim.l1_size:
                self.writer.queue_release(victim.l1_offset, victim.l1_size * 8)
            self.flush()
            self._set_copied()
            self.flush()
        return table

    # -- parts -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self, dirty: bool):
        """Around the changes of one operation: the dirty bit (v3, `dirty`) set durably
        before and cleared after a complete flush (left set when it was set before:
        lazy refcounts). If the operation fails half-way, nothing more is written and
        the dirty bit stays for the next read-write open to repair (rule 6)."""
        h = self.header
        owned = dirty and h.version >= 3 and not h.dirty
        if owned:
            self.header_writer.set_incompatible(hdr.INCOMPAT_DIRTY, True)
        try:
            yield
        except BaseException:
            self.abandon()
            raise
        if owned:
            self.header_writer.set_incompatible(hdr.INCOMPAT_DIRTY, False)

    def _read_l1(self, snapshot: Snapshot) -> array:
        raw = self.storage.pread(snapshot.l1_size * 8, snapshot.l1_offset)
        if len(raw) != snapshot.l1_size * 8:
            raise ImageError(f"snapshot '{snapshot.id}': its L1 table is past the end of "
                             "the file")
        return decode_table(raw)

    def _expect(self, *walks: tuple[array, int]) -> None:
        """The progress total: (L1 table, how many times it is walked) of an operation."""
        for l1, times in walks:
            self.progress.add_total(times * len(_allocated(l1)))

    def _l2_tables(self, l1) -> Iterator[tuple[int, int, int]]:
        """(index, entry, L2 table offset) of each L1 entry that has a table, one
        progress step each."""
        for table in _allocated(l1):
            yield table
            self.progress.step()

    def _descriptors(self, table: array) -> array:
        """The descriptor words of an L2 table: the table itself, or a copy of every
        other word with extended entries (their subcluster bitmaps never matter here:
        a descriptor alone says where its host cluster is)."""
        return table[0::2] if self.layout.extended_l2 else table

    def _store_descriptors(self, table: array, descriptors: array) -> None:
        """Changed _descriptors() back into their table (a copy only when extended)."""
        if self.layout.extended_l2:
            table[0::2] = descriptors

    def _runs_of_table(self, descriptors: array) -> Iterator[tuple[int, int, int]]:
        """(index, end index, host offset) of each run of descriptors that map host
        clusters one after another with the same flags (data and zero clusters that
        have a host cluster), found in bulk (entries.run_end); a compressed descriptor
        is a run of one, host offset -1. A preallocated table is one run."""
        cs = self.layout.cluster_size
        i, n = 0, len(descriptors)
        while i < n:
            e = descriptors[i]
            if e & OFLAG_COMPRESSED:
                yield i, i + 1, -1
                i += 1
                continue
            host = e & L2E_OFFSET_MASK
            j = run_end(descriptors, i, n, e, cs if host else 0)
            if host:
                yield i, j, host
            i = j

    def _references(self, l1: array) -> Callable[[], Iterator[tuple[int, int]]]:
        """The host ranges an L1 table reaches, one per reference: each L2 table, then
        the clusters its entries map, a run at a time (compressed data: every cluster
        it touches)."""
        layout = self.layout
        cs = layout.cluster_size

        def walk():
            for _i, _entry, offset in self._l2_tables(l1):
                yield offset, cs
                descriptors = self._descriptors(self.tables.l2_cache.get(offset))
                for i, j, host in self._runs_of_table(descriptors):
                    yield layout.compressed.host_range(descriptors[i]) if host < 0 \
                        else (host, (j - i) * cs)
        return walk

    def _runs(self, ranges) -> Iterator[tuple[int, int]]:
        """The clusters of the ranges as (first, count) runs, one reference each: a
        cluster reached twice in a row (compressed data sharing it) starts a new run."""
        cb = self.layout.cluster_bits
        start = end = -1
        for offset, length in ranges():
            first, last = offset >> cb, (offset + length - 1) >> cb
            if first != end:
                if end > start:
                    yield start, end - start
                start = first
            end = last + 1
        if end > start:
            yield start, end - start

    def _check_room(self, ranges) -> None:
        """Before anything changes: every cluster a table reaches is in the file (a
        damaged entry must not grow the refcount structures to its offset), and can
        take one more reference (qemu: EINVAL). Only a cluster reached several times
        (compressed data sharing it) can still overflow half-way."""
        top = self.refcounts.max_refcount
        cb = self.layout.cluster_bits
        end = -(-self.storage.size() >> cb)
        for first, count in self._runs(ranges):
            if first + count > end or first == 0:
                raise CorruptImage(f"a snapshot table reaches clusters 0x{first << cb:x}+"
                                   f"{count << cb}, not data or tables of the file")
            if self.refcounts.highest(first, count) >= top:
                raise SnapshotFailure(f"a refcount would exceed {top}", errno.EINVAL)

    def _increment(self, ranges) -> None:
        """+1 for every cluster of every range (checked by _check_room)."""
        for first, count in self._runs(ranges):
            self.refcounts.increment(first, count)

    def _clear_copied(self, l1: array, active_l1: bool) -> None:
        """No COPIED flag left in the tables `l1` reaches (nor in `l1` itself when it is
        the active table), a table at a time."""
        tables = self.tables
        for i, entry, offset in self._l2_tables(l1):
            table = tables.l2_cache.get(offset)
            descriptors = self._descriptors(table)
            cleared = array("Q", [e & ~OFLAG_COPIED for e in descriptors])
            if cleared != descriptors:
                descriptors[:] = cleared
                self._store_descriptors(table, descriptors)
                tables.l2_cache.mark_dirty(offset, table)
            if active_l1 and entry & OFLAG_COPIED:
                tables.set_l1(i, entry & ~OFLAG_COPIED)

    def _set_copied(self) -> None:
        """COPIED exactly where the refcount is 1, in the active tables (what qemu's
        qcow2_update_snapshot_refcount(..., 0) does after a delete); the refcounts of a
        run of descriptors read together."""
        tables, refcounts, layout = self.tables, self.refcounts, self.layout
        cb = layout.cluster_bits
        for i, entry, offset in self._l2_tables(tables.l1[:self.header.l1_size]):
            table = tables.l2_cache.get(offset)
            descriptors = self._descriptors(table)
            changed = False
            for first, end, host in self._runs_of_table(descriptors):
                if host < 0:
                    continue  # compressed: never COPIED (qcow2.rst)
                run = descriptors[first:end]
                counts = refcounts.counts(host >> cb, end - first)
                wanted = array("Q", [(e & ~OFLAG_COPIED) | (OFLAG_COPIED if n == 1 else 0)
                                     for e, n in zip(run, counts)])
                if wanted != run:
                    descriptors[first:end] = wanted
                    changed = True
            if changed:
                self._store_descriptors(table, descriptors)
                tables.l2_cache.mark_dirty(offset, table)
            want = OFLAG_COPIED if refcounts.get(offset >> cb) == 1 else 0
            if entry & OFLAG_COPIED != want:
                tables.set_l1(i, (entry & ~OFLAG_COPIED) | want)

    def _release_tables(self, l1: array) -> None:
        """Queue the drop of every reference an L1 table held (rule 3: applied by a
        flush, once what dropped them is durable), in runs of clusters, flushing as the
        queue grows."""
        cb = self.layout.cluster_bits
        for first, count in self._runs(self._references(l1)):
            self.writer.queue_release(first << cb, count << cb)
            if self.writer.too_many_releases():
                self.flush()

    def _write_l1(self, l1: array) -> int:
        """A new L1 table in free clusters; its offset (0 for an empty table)."""
        if not len(l1):
            return 0
        cs = self.layout.cluster_size
        nbytes = len(l1) * 8
        offset = self.refcounts.allocate(-(-nbytes // cs))
        self.storage.pwrite(encode_table(l1), offset)
        self.metadata.add_range(offset, nbytes)
        return offset

    def _switch_table(self, snapshots: list[Snapshot]) -> None:
        """Write the table in free clusters, make it and its refcounts durable, point the
        header at it (one write), then release the old one (qcow2_write_snapshots)."""
        h = self.header
        raw = encode_snapshots(snapshots, h.size)
        offset = 0
        if raw:
            cs = self.layout.cluster_size
            offset = self.refcounts.allocate(-(-len(raw) // cs))
            self.storage.pwrite(raw, offset)
            self.metadata.add_range(offset, len(raw))
        self.refcounts.cache.write_dirty()
        self.storage.sync(Barrier.BEFORE_HEADER)
        old_offset, old_count, old_bytes = h.snapshots_offset, h.nb_snapshots, \
            self.table_bytes
        self.header_writer.switch_snapshot_table(len(snapshots), offset)
        self.table_bytes = len(raw)
        if old_count and old_bytes:
            self.writer.queue_release(old_offset, old_bytes)


def _allocated(l1) -> list[tuple[int, int, int]]:
    """(index, entry, L2 table offset) of each entry of an L1 table that has a table."""
    return [(i, e, e & L1E_OFFSET_MASK) for i, e in enumerate(l1) if e & L1E_OFFSET_MASK]


def _check_l1_size(entries: int) -> None:
    if entries * 8 > MAX_L1_BYTES:
        raise ImageError("Snapshot L1 table too large")
