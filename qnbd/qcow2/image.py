"""A qcow2 image as a BlockDevice: open and close, the order of a flush, the feature bits
that guard writes (dirty, corrupt, autoclear). What QEMU's block/qcow2.c does; the work
itself is done by the parts it wires together, each handed only what it needs:

  storage   qnbd/block/storage.py   every byte written, and when it is synced
  header    header.py, header_update.py
  refcount  refcount.py             host cluster management
  tables    tables.py               L1 table and L2 cache
  mapping   mapping.py              reads and block status
  writer    writer.py               writes, copy-on-write, zeroes, discard, releases
  bitmaps   bitmap_lifecycle.py     persistent dirty bitmaps (rule 9)

See docs/DESIGN.md, "Rules of the qcow2 format" (the rules cited as "rule N").
"""

import dataclasses
import errno
import functools
import logging

from .. import fileio
from ..block.plan import WritePlan
from ..block.storage import Barrier, Storage, sync_all
from ..errors import ImageError, IOFailure
from ..lock import lock_image
from . import header as hdr
from ..block.check_result import FIX_ALL, Progress
from .bitmap_lifecycle import PersistentBitmaps
from .check import check_storage
from .compression import compress
from .extended_mapping import ExtendedMapper
from .extended_writer import ExtendedWriter
from .header_update import HeaderWriter
from .layout import Layout
from .mapping import Mapper
from .metadata_map import MetadataMap
from .refcount import Refcounts
from .snapshot_update import SnapshotFailure, SnapshotUpdater
from .snapshots import (Snapshot, find as find_snapshot, find_by_id_or_name, next_id,
                        read_table as read_snapshot_table)
from .tables import ClusterTables
from .writer import ClusterWriter

log = logging.getLogger("qnbd.qcow2")

DEFAULT_L2_CACHE_BYTES = 4 << 20  # covers 32 GiB of a 64 KiB-cluster image
DEFAULT_REFCOUNT_CACHE_BYTES = 1 << 20


class Qcow2Image:
    format = "qcow2"
    supports_fast_zero = True

    @classmethod
    def open(cls, path: str, read_only: bool = True, *, open_backing=None,
             data_file_path=None, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
             refcount_cache_bytes: int = DEFAULT_REFCOUNT_CACHE_BYTES,
             force_share: bool = False, snapshot: str | None = None):
        """open_backing(image_path, name, fmt) opens the backing file the header names;
        data_file_path(image_path, name) resolves an external data file's name
        (qnbd/block/chain.py applies the policy, loop and depth rules to both).
        snapshot: an internal snapshot to show instead of the active layer, read-only
        (qemu-nbd -l, qemu's bdrv_snapshot_load_tmp), named as snapshots.find() reads it."""
        if snapshot is not None and not read_only:
            raise ImageError("an internal snapshot can only be loaded read-only")
        file = fileio.open_file(path, writable=not read_only)
        files = [file]
        try:
            lock_image(file, not read_only, force_share)  # rule 11, before any read
            storage = Storage(file)
            data_storage = storage
            h = hdr.read(storage)
            if h.external_data:
                data = _open_data_file(path, h, data_file_path, read_only, force_share)
                files.append(data)
                data_storage = Storage(data)
            if not read_only:
                repair_if_dirty(storage, path)
            image = cls(path, storage, read_only, l2_cache_bytes, refcount_cache_bytes,
                        data_storage, snapshot)
        except BaseException:
            for f in files:
                f.close()
            raise
        try:
            if image.header.backing_file:
                image.mapper.backing = image.backing = open_backing(
                    path, image.header.backing_file, image.header.backing_format)
            image.bitmaps = PersistentBitmaps(image.storage, image.header_writer, image.layout,
                                              image.metadata, image.refcounts, read_only)
        except BaseException:
            image.close()
            raise
        return image

    def __init__(self, path: str, storage: Storage, read_only: bool, l2_cache_bytes: int,
                 refcount_cache_bytes: int, data_storage: Storage,
                 snapshot: str | None = None):
        self.path = path
        self.storage = storage
        self.read_only = read_only
        self._closed = False
        self.backing = None
        self.bitmaps = None
        h = self.header = hdr.read(storage)
        self.layout = layout = Layout.of(h)
        self.version = h.version
        self.size = h.size
        self.cluster_size = cs = layout.cluster_size
        self._corrupt = h.corrupt
        self._write_prepared = False
        if not read_only:
            if h.corrupt:
                raise ImageError(f"'{path}' is marked corrupt; it can only be opened "
                                 "read-only until repaired (qemu-img check -r all)")
            if h.dirty:
                raise ImageError(f"'{path}' has the dirty bit set and needs repair "
                                 "(qemu-img check -r all) before it is opened read-write")
        # Guest data lives in the image file itself, or in an external data file (rule 13).
        self.data_storage = data_storage
        self._storages = (storage,) if data_storage is storage else (storage, data_storage)
        self.header_writer = HeaderWriter(storage, h)
        self.metadata = metadata = MetadataMap(layout.cluster_bits, self.mark_corrupt)
        metadata.add_range(0, cs)
        self.refcounts = Refcounts(storage, h, self.header_writer, metadata,
                                   self.mark_corrupt, refcount_cache_bytes // cs)
        self.snapshots = []
        table_bytes = 0
        if h.nb_snapshots:
            self.snapshots, table_bytes = read_snapshot_table(
                storage, h.snapshots_offset, h.nb_snapshots, cs, storage.size())
            metadata.add_range(h.snapshots_offset, table_bytes)
            for snap in self.snapshots:
                metadata.add_range(snap.l1_offset, snap.l1_size * 8)
        # A loaded snapshot is read through its own L1 table (qcow2_snapshot_load_tmp).
        self.loaded_snapshot = None if snapshot is None else find_snapshot(self.snapshots,
                                                                           snapshot)
        l1 = (h.l1_table_offset, h.l1_size) if self.loaded_snapshot is None else \
            (self.loaded_snapshot.l1_offset, self.loaded_snapshot.l1_size)
        self.tables = ClusterTables(storage, h, layout, self.refcounts, self.mark_corrupt,
                                    l2_cache_bytes // cs, self.data_storage, l1)
        self.table_caches = (self.tables.l2_cache, self.refcounts.cache)
        metadata.add_range(h.l1_table_offset, h.l1_size * 8)
        for offset in self.tables.l2_offsets():
            metadata.add(offset >> layout.cluster_bits)
        metadata.add_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
        for offset in self.refcounts.block_offsets():
            metadata.add(offset >> layout.cluster_bits)
        # Extended L2 entries have their own mapping and writing; the 64-bit entries'
        # hot paths stay free of the subcluster tests.
        mapper, writer = ((ExtendedMapper, ExtendedWriter) if layout.extended_l2
                          else (Mapper, ClusterWriter))
        self.mapper = mapper(layout, self.tables, self.data_storage, h.compression_type,
                             self.mark_corrupt)
        self.writer = writer(layout, self.tables, self.refcounts, self.mapper,
                             metadata, self.data_storage, h.data_file_raw)
        self.snapshot_updater = SnapshotUpdater(storage, self.header_writer, self.tables,
                                                self.refcounts, metadata, self.writer,
                                                self.flush, self._abandon, table_bytes)

    # -- corruption (rule 7) -----------------------------------------------------------

    def mark_corrupt(self, reason: str) -> None:
        """An inconsistency met at run time sets the corrupt bit; no more writes."""
        if self._corrupt:
            return
        self._corrupt = True
        if self.read_only:
            return  # nothing is marked: the IOFailure raised with `reason` says it all
        log.error("%s: %s; marking the image corrupt", self.path, reason)
        if self.version < 3:
            return
        try:
            self.header_writer.set_incompatible(hdr.INCOMPAT_CORRUPT, True)
        except OSError as e:
            log.error("%s: could not set the corrupt bit: %s", self.path, e)

    def _abandon(self) -> None:
        """A metadata operation failed half-way: memory no longer describes the disk, so
        nothing more is written, not even by close (the disk keeps what the operation's
        own ordering made safe: leaks, or a dirty bit for the next open to repair)."""
        if not self._corrupt:
            log.error("%s: an internal snapshot operation failed; the image is left "
                      "as it is on disk", self.path)
        self._corrupt = True

    # -- the BlockDevice contract ------------------------------------------------------

    def read(self, offset: int, length: int):
        return self.mapper.read(offset, length)

    def read_parts(self, offset: int, length: int) -> list:
        return self.mapper.read_parts(offset, length)

    def read_plan(self, offset: int, length: int) -> list:
        return self.mapper.read_plan(offset, length)

    def block_status(self, offset: int, length: int):
        length = min(length, self.size - offset)
        return self.mapper.extents(offset, self.mapper.status_span(offset, length))

    def layer_status(self, offset: int, length: int):
        return self.mapper.layer_status(offset, min(length, self.size - offset),
                                        self.data_storage.path)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self.bitmaps.mark(offset, len(view))
        self.writer.write(offset, view)
        self._after_update(fua)

    def write_plan(self, offset: int, data, fua: bool = False) -> WritePlan | None:
        """`write` as a plan (qnbd/block/plan.py) whose HostWrites another thread may
        perform; None with O_DIRECT files, whose partial blocks are read, modified and
        written back (qnbd/direct_io.py): two of those must not overlap."""
        if getattr(self.data_storage.file, "direct", False):
            return None
        self._check_writable()
        view = memoryview(data).cast("B")
        self.bitmaps.mark(offset, len(view))
        plan = self.writer.plan_write(offset, view)
        plan.on_commit(functools.partial(self._after_update, fua))
        return plan

    def write_compressed(self, offset: int, data) -> None:
        """One whole guest cluster at a cluster-aligned offset (the image's last cluster
        may be shorter; it is padded with zeros, as qemu pads it), stored compressed when
        that saves space and as an ordinary write otherwise (qcow2_co_pwritev_compressed).
        For qemu-img convert -c: the cluster must not be allocated yet."""
        cs = self.cluster_size
        if offset % cs or not (len(data) == cs or 0 < len(data) and
                               offset + len(data) == self.size):
            raise IOFailure("compressed writes take one whole, aligned cluster")
        if self.data_storage is not self.storage:
            # qcow2.rst "External data file": compressed clusters are not allowed.
            raise IOFailure("Compression is not supported with external data files",
                            errno.ENOTSUP)
        self._check_writable()
        packed = compress(bytes(data).ljust(cs, b"\0"), self.header.compression_type)
        if packed is None:
            self.write(offset, data)
            return
        self.bitmaps.mark(offset, len(data))
        self.writer.write_compressed(offset, packed)
        self._after_update(False)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        self._check_writable()
        self.bitmaps.mark(offset, length)
        self.writer.write_zeroes(offset, length, may_trim, fast)
        self._after_update(fua)

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self.bitmaps.mark(offset, length)
        self.writer.discard(offset, length)
        self._after_update(fua)

    def _check_writable(self) -> None:
        if self.read_only:
            raise IOFailure("the image is open read-only", errno.EPERM)
        if self._corrupt:
            raise IOFailure("the image is marked corrupt; writes are refused")
        if not self._write_prepared:
            self._prepare_first_write()

    def _prepare_first_write(self) -> None:
        """Rule 1: autoclear bits this engine does not keep true are cleared (durably)
        before the first write changes anything they describe. Rule 6: with lazy
        refcounts the dirty bit is set, durably, before any refcount update is deferred."""
        h = self.header
        stale = h.autoclear_features & ~hdr.MAINTAINED_AUTOCLEAR
        if stale and h.version >= 3:
            self.header_writer.clear_autoclear(stale)
        if h.lazy_refcounts and h.version >= 3 and not h.dirty:
            self.header_writer.set_incompatible(hdr.INCOMPAT_DIRTY, True)
        self._write_prepared = True

    def _after_update(self, fua: bool) -> None:
        if fua or self.writer.too_many_releases():
            self.flush()

    # -- resize ------------------------------------------------------------------------

    def resize(self, size: int) -> None:
        """qemu-img resize (qcow2_co_truncate, no preallocation). Shrinking is refused
        where it would drop anything this image holds (qemu would discard it): only an
        unallocated tail may be cut off. Growing extends the L1 table when it must and,
        where a longer backing file would show through the new space, makes that space
        read as zeros first (qemu: BDRV_REQ_ZERO_WRITE). An external data file is
        resized with the image (rule 13): grown first, and with data_file_raw the new
        clusters mapped to it; cut last. The header's size is written last, so a crash
        leaves the old size. Persistent bitmaps follow the new size (as qemu's): a grown
        end starts clean."""
        self._check_writable()
        old = self.size
        if size % 512:
            raise ImageError("The new size must be a multiple of 512")
        if self.snapshots and self.version < 3:
            # v2 snapshot entries do not record their disk size (qcow2_co_truncate).
            raise ImageError("Can't resize a v2 image which has snapshots")
        self.bitmaps.check_resizable()
        if size < old:
            self._check_tail_unallocated(size)
        self.flush()
        external = self.data_storage is not self.storage
        if external and size > old and self.data_storage.size() < \
                self._data_file_length(size):
            # qemu resizes the data file with the image; a raw one (preallocated) to
            # the end of the last cluster. Grown before anything maps the new space.
            self.data_storage.truncate(self._data_file_length(size))
        entries = -(-size >> self.layout.table_shift)
        if entries > len(self.tables.l1):
            self.writer.queue_release(*self.tables.grow_l1(entries, self.header_writer))
            self.metadata.add_range(self.tables.l1_offset, entries * 8)
        self._set_size(size)
        if size > old and self.backing is not None and self.backing.size > old:
            # Straight to the writer, as qemu zeroes inside qcow2_co_truncate: the new
            # space is not a guest write, the bitmaps do not mark it.
            self.writer.write_zeroes(old, min(size, self.backing.size) - old, False, False)
        if size > old and self.header.data_file_raw:
            self.writer.map_raw(old, size)
        self.flush()
        self.header_writer.set_size(size)
        if external and size < old:
            # Only an unallocated tail was cut off: nothing maps what goes.
            self.data_storage.truncate(self._data_file_length(size))
            sync_all(self._storages, Barrier.FLUSH)
        # Bitmaps are in use on disk while the image is open (rule 9): they are stored
        # at the new size on close.
        self.bitmaps.resize(size)

    def _data_file_length(self, size: int) -> int:
        """A raw data file reaches the end of the last (sub)cluster mapped, as qemu's
        preallocation extends it."""
        unit = self.layout.subcluster_size
        return -(-size // unit) * unit if self.header.data_file_raw else size

    def _check_tail_unallocated(self, size: int) -> None:
        """Nothing this image holds past `size` (its last cluster stays, whole)."""
        cs = self.cluster_size
        pos = min(-(-size // cs) * cs, self.size)
        while pos < self.size:
            for e in self.layer_status(pos, self.size - pos):
                if e.data or e.host_offset is not None:
                    raise ImageError(f"'{self.path}' holds data at offset {pos}, past the "
                                     "new size: nothing was changed (qnbd only shrinks "
                                     "over an unallocated tail)")
                pos += e.length

    def _set_size(self, size: int) -> None:
        """The parts this image wired share one Layout: they all get the new one."""
        self.size = size
        self.layout = dataclasses.replace(self.layout, size=size)
        for part in (self.tables, self.mapper, self.writer, self.bitmaps):
            part.layout = self.layout

    # -- internal snapshots (snapshot_update.py) --------------------------------------

    def _snapshots_writable(self) -> None:
        self._check_writable()
        if self.data_storage is not self.storage:
            # qcow2.rst "External data file": internal snapshots are not possible.
            raise SnapshotFailure("internal snapshots are not supported with an external "
                                  "data file", errno.ENOTSUP)

    def snapshot_create(self, name: bytes, date_ns: int, progress=None) -> Snapshot:
        """qemu-img snapshot -c: a new snapshot of the active layer, named `name` (names
        need not be unique), dated `date_ns` (ns since the epoch), with the next id."""
        self._snapshots_writable()
        sec, nsec = divmod(date_ns, 10**9)
        new = Snapshot(next_id(self.snapshots), name.decode("utf-8", "replace"), 0, 0,
                       sec, nsec, 0, 0, self.size, 0, raw_name=name)
        self.snapshot_updater.progress = progress or Progress()
        self.snapshots = self.snapshot_updater.create(self.snapshots, new)
        return self.snapshots[-1]

    def snapshot_apply(self, text: str, progress=None) -> Snapshot:
        """qemu-img snapshot -a: the snapshot with id `text`, else named `text`, becomes
        the active layer (its size too, as qemu resizes to it). Refused with bitmaps,
        whose bits would no longer describe the data (as qemu's bdrv_snapshot_goto)."""
        self._check_writable()
        if self.bitmaps.entries:
            raise SnapshotFailure("Device has active dirty bitmaps", errno.EBUSY,
                                  verbatim=True)
        self._snapshots_writable()
        snapshot = find_by_id_or_name(self.snapshots, text)
        if snapshot is None:
            raise SnapshotFailure(f"no snapshot '{text}'", errno.ENOENT)
        size = self.size if snapshot.disk_size is None else snapshot.disk_size
        self.snapshot_updater.progress = progress or Progress()
        self.snapshot_updater.apply(snapshot, size)
        self._set_size(size)
        return snapshot

    def snapshot_delete(self, snapshot: Snapshot, progress=None) -> None:
        """qemu-img snapshot -d of a snapshot found by the caller."""
        self._snapshots_writable()
        self.snapshot_updater.progress = progress or Progress()
        self.snapshots = self.snapshot_updater.delete(self.snapshots, snapshot)

    # -- flush and close ---------------------------------------------------------------

    def flush(self) -> None:
        """Rule 10: dirty metadata in dependency order (the caches order themselves),
        then fsync. Releases queued by earlier updates are applied once the references
        they drop are durable (rule 3)."""
        if self.read_only or self._closed:
            return
        if self._corrupt:
            # Rule 7: after an inconsistency, nothing more is written (as QEMU, which makes
            # the image inaccessible): dirty metadata may describe the damage.
            raise IOFailure("the image is marked corrupt; metadata is not written back")
        self.write_metadata()
        if self.writer.pending_releases:
            sync_all(self._storages, Barrier.BEFORE_RELEASE)
            self.writer.apply_releases()
            self.write_metadata()
        sync_all(self._storages, Barrier.FLUSH)

    def write_metadata(self) -> None:
        """Every dirty table written back, in dependency order; not yet synced."""
        self.refcounts.cache.write_dirty()
        self.tables.write_dirty()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self._corrupt:
                self.flush()
                if self.bitmaps is not None:
                    self.release_and_flush(self.bitmaps.store())
                if self.header.dirty:
                    # Rule 6: cleared only once every cache is written back and synced.
                    self.header_writer.set_incompatible(hdr.INCOMPAT_DIRTY, False)
        finally:
            self._closed = True
            for storage in self._storages:
                storage.close()
            if self.backing is not None:
                self.backing.close()

    def release_and_flush(self, releases) -> None:
        """Queue host ranges that lost their last reference (rule 3), then flush."""
        for offset, length in releases:
            self.writer.queue_release(offset, length)
        self.flush()


def _open_data_file(path: str, h: hdr.Header, data_file_path, read_only: bool,
                    force_share: bool):
    """The external data file (qcow2.rst, "External data file name"), locked as QEMU
    locks a data child: it holds guest data, not format metadata (rule 11)."""
    if h.data_file is None:
        raise ImageError(f"'{path}' uses an external data file but does not name it")
    if data_file_path is None:
        raise ImageError(f"'{path}' uses an external data file, which this open cannot "
                         "resolve")
    data = fileio.open_file(data_file_path(path, h.data_file), writable=not read_only)
    try:
        lock_image(data, not read_only, force_share, data_child=True)
    except BaseException:
        data.close()
        raise
    return data


def repair_if_dirty(storage: Storage, path: str) -> None:
    """Rule 6: refcounts of an image left dirty (lazy refcounts, not closed cleanly) may
    be too low; before it is written again they are checked and rebuilt, as QEMU does."""
    h = hdr.read(storage)
    if not h.dirty or h.corrupt:
        return  # a corrupt image is refused read-write anyway
    # Look before writing: damage to the tables themselves is no crash's doing (the image
    # may not be what its header says, e.g. a cleared extended-L2 bit), and "repairing"
    # it would rewrite metadata that may not be ours. Refused, untouched, as qemu-img
    # check -r all is the user's call.
    found = check_storage(storage, path, 0)
    if found.table_damage or found.check_errors:
        raise ImageError(f"'{path}' was left dirty and its tables are damaged "
                         f"({found.corruptions} corruptions, {found.check_errors} errors); "
                         "nothing was repaired, see 'qnbd check -r all'")
    result = check_storage(storage, path, FIX_ALL)
    if result.exit_code not in (0, 3) or result.leaks:
        raise ImageError(f"'{path}' was left dirty and could not be repaired "
                         f"({result.corruptions} corruptions, {result.check_errors} errors "
                         "remain)")
    log.warning("%s: repaired an image left dirty: %d corruptions and %d leaks fixed",
                path, result.corruptions_fixed, result.leaks_fixed)
