"""A QED image as a BlockDevice: open and close, NEED_CHECK around metadata changes, the
order of a flush. What QEMU's block/qed.c does; the work is done by:

  storage   qnbd/block/storage.py   every byte written, and when it is synced
  header    header.py               fields, feature bits
  tables    tables.py               L1 table, L2 cache, append-only allocation
  mapping   mapping.py              reads and block status
  writer    writer.py               writes, copy-on-write, zeroes, discard
  check     check.py                consistency check and repair

docs/DESIGN.md rule 12 (qed_spec.txt, "Consistency checking"): QED_F_NEED_CHECK is set,
and durable, before the first metadata change (a new cluster, a new L2 table, an entry
changed) since the image was last consistent on disk; it is cleared once a flush has
made every change durable, and nothing is in flight then, since the engine runs one
request at a time. A crash can therefore leave the image inconsistent (leaked clusters,
tables past the end of the file) only with NEED_CHECK set, and opening such an image
read-write checks and repairs it first, as QEMU does.
"""

import errno
import logging

from .. import fileio
from ..block.storage import Barrier, Storage
from ..errors import ImageError, IOFailure
from ..lock import lock_image
from . import header as hdr
from .check import repair_storage
from .mapping import Mapper
from .tables import Tables
from .writer import Writer

log = logging.getLogger("qnbd.qed")

DEFAULT_L2_CACHE_BYTES = 4 << 20  # 16 default tables (256 KiB each): 32 GiB mapped


class QedImage:
    format = "qed"
    supports_fast_zero = True

    @classmethod
    def open(cls, path: str, read_only: bool = True, *, open_backing=None,
             l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES, force_share: bool = False,
             **_other_format_options):
        """open_backing(image_path, name, fmt) opens the backing file the header names
        (qnbd/block/chain.py applies the policy, loop and depth rules)."""
        file = fileio.open_file(path, writable=not read_only)
        try:
            lock_image(file, not read_only, force_share)  # rule 11, before any read
            storage = Storage(file)
            h = hdr.read(storage, path)
            if h.need_check and not read_only:
                h = repair(storage, path)
            image = cls(path, storage, h, read_only, l2_cache_bytes)
        except BaseException:
            file.close()
            raise
        try:
            if h.backing_file is not None:
                image.mapper.backing = image.backing = open_backing(
                    path, h.backing_file, h.backing_format)
        except BaseException:
            image.close()
            raise
        return image

    def __init__(self, path: str, storage: Storage, h: hdr.Header, read_only: bool,
                 l2_cache_bytes: int):
        self.path = path
        self.storage = storage
        self.header = h
        self.read_only = read_only
        self.size = h.image_size
        self.cluster_size = h.cluster_size
        self.backing = None
        self._closed = False
        self._failed = False
        self.tables = Tables(storage, h, max(2, l2_cache_bytes // h.table_bytes))
        self.table_caches = (self.tables.l2_cache,)
        self.mapper = Mapper(self.tables)
        self.writer = Writer(self.tables, self.mapper, h.image_size, self._before_metadata)

    # -- NEED_CHECK (rule 12) ----------------------------------------------------------

    def _before_metadata(self) -> None:
        """Called before any metadata change: from here until the next completed flush
        the image on disk may be inconsistent, so NEED_CHECK must be durable first."""
        h = self.header
        if not h.need_check:
            hdr.write_features(self.storage, h, h.features | hdr.F_NEED_CHECK,
                               Barrier.NEED_CHECK)

    # -- the BlockDevice contract ------------------------------------------------------

    def read(self, offset: int, length: int):
        return self.mapper.read(offset, length)

    def read_parts(self, offset: int, length: int) -> list:
        return self.mapper.read_parts(offset, length)

    def block_status(self, offset: int, length: int):
        length = min(length, self.size - offset)
        return self.mapper.extents(offset, self.mapper.status_span(offset, length))

    def layer_status(self, offset: int, length: int):
        return self.mapper.layer_status(offset, min(length, self.size - offset), self.path)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._check_writable()
        self._guarded(self.writer.write, offset, memoryview(data).cast("B"))
        self._after_update(fua)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        self._check_writable()
        self._guarded(self.writer.write_zeroes, offset, length, may_trim, fast)
        self._after_update(fua)

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self._guarded(self.writer.discard, offset, length)
        self._after_update(fua)

    def _check_writable(self) -> None:
        if self.read_only:
            raise IOFailure("the image is open read-only", errno.EPERM)
        if self._failed:
            raise IOFailure("an earlier write failed part-way; writes are refused until "
                            "the image is reopened (and checked)")
        h = self.header
        if h.autoclear_features & ~hdr.KNOWN_AUTOCLEAR:
            hdr.clear_autoclear(self.storage, h)

    def _guarded(self, op, *args) -> None:
        """An I/O error in the middle of an update or a flush may leave the in-memory
        tables ahead of the file: the image takes no more writes and NEED_CHECK is not
        cleared, so the next read-write open checks it. (Refusals such as NotFast or a
        damaged entry come before anything changes and do not count.)"""
        try:
            op(*args)
        except OSError as e:
            self._failed = True
            raise IOFailure(f"I/O error: {e.strerror}", e.errno or errno.EIO) from None

    def _after_update(self, fua: bool) -> None:
        if fua:
            self.flush()

    # -- flush and close ---------------------------------------------------------------

    def flush(self) -> None:
        """Dirty tables in dependency order (data, L2 tables, L1 entries), fsync; then
        NEED_CHECK is cleared: every change is durable and none is in flight. The clear
        itself needs no sync: lost in a crash, it only costs a check."""
        if self.read_only or self._closed:
            return
        if self._failed:
            raise IOFailure("an earlier write failed part-way; metadata is not written back")
        self._guarded(self._flush)

    def _flush(self) -> None:
        # A failed fsync may have dropped writes it was to make durable (Linux marks
        # the pages clean): _guarded then stops the image, so that no later flush
        # clears NEED_CHECK over them.
        self.tables.write_dirty()
        self.storage.sync(Barrier.FLUSH)
        h = self.header
        if h.need_check:
            hdr.write_features(self.storage, h, h.features & ~hdr.F_NEED_CHECK, None)

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self._failed:
                self.flush()
                self.storage.sync(Barrier.HEADER)  # a clean shutdown: no check next time
        finally:
            self._closed = True
            self.storage.close()
            if self.backing is not None:
                self.backing.close()


def repair(storage: Storage, path: str) -> hdr.Header:
    """qed_spec.txt, "Consistency checking": an image with NEED_CHECK set may have been
    left inconsistent by a crash; before it is written again it is checked and repaired
    (tables past the end of the file dropped, leaked clusters at the end cut off) and,
    when nothing is left but leaks, NEED_CHECK is cleared. An image with damage no
    repair can fix is refused and left as it is."""
    result = repair_storage(storage, path)
    if result.check_errors or result.corruptions:
        raise ImageError(f"'{path}' needs a check and could not be repaired "
                         f"({result.corruptions} corruptions, {result.check_errors} errors "
                         "remain)")
    log.warning("%s: repaired an image left with NEED_CHECK set: %d corruptions and %d "
                "leaked clusters fixed, %d leaked clusters left", path, result.corruptions_fixed,
                result.leaks_fixed, result.leaks)
    return hdr.read(storage, path)
