"""The raw format: files as block devices (exports of `-f raw`, raw backing files), and
their creation and info as qemu-img does them.

Sizes are whole sectors, as in qemu's block layer (bdrv_getlength counts 512-byte
sectors, rounding up): a 1000-byte file is a 1024-byte device whose tail reads zeros and
grows the file when written.

A raw image whose format was probed rather than given (qemu's bs->probed, block/raw-format.c)
is guarded as qemu guards it (docs/DESIGN.md rule 14): requests are aligned to 512 bytes
(raw_refresh_limits: request_alignment 512, which an NBD server advertises as its minimum
block size), a write may not make the first sector look like another format (the image
would open as that format next time: raw_co_pwritev returns EPERM); qnbd/formats.py warns
in qemu's words when it opens one writable.
"""

import errno
import os
from collections.abc import Callable

from ..errors import ImageError, IOFailure, NotFast
from ..fileio import File, open_file
from ..lock import create_locked, lock_image
from .base import HOLE, ZERO, Extent, LayerExtent
from .plan import HostWrite, WritePlan

_ZERO_CHUNK = bytes(1 << 20)
SECTOR = 512  # qemu-img rounds the size of a new raw image up to whole sectors
# qemu-img create -f raw -o keys: the size is the only one (qnbd/block/options.py)
CREATE_OPTIONS: dict = {}


def _sectors(size: int) -> int:
    return -(-size // SECTOR) * SECTOR


def create_raw(path: str, size: int | None, **options) -> int:
    """Create (or truncate) `path` as an all-zero sparse file; returns its size."""
    if "backing_file" in options or "backing_fmt" in options:
        raise ImageError("Backing file not supported for file format 'raw'")
    if size is None:
        raise ImageError("Image creation needs a size parameter")
    size = _sectors(size)
    create_sparse(path, size)
    return size


def create_sparse(path: str, size: int) -> None:
    """`path` emptied (locked as qemu-img create locks it) and grown to `size` zeros,
    taking no space: a raw image, or a qcow2 image's external data file."""
    f = create_locked(path)
    try:
        f.truncate(size)
    except OSError as e:
        raise ImageError(f"Could not resize '{path}': {e.strerror}") from None
    finally:
        f.close()


def raw_info(path: str, file, st) -> dict:
    """qemu-img info of a raw file."""
    return {"virtual-size": _sectors(st.st_size), "filename": path, "format": "raw",
            "actual-size": st.st_blocks * 512, "dirty-flag": False}


class RawDevice:
    supports_fast_zero = True
    backing = None

    def __init__(self, path: str, read_only: bool = True, force_share: bool = False,
                 probed: Callable[[bytes], bool] | None = None):
        """probed: given when the format was probed; tells whether a first sector still
        probes as raw."""
        self.path = path
        self.read_only = read_only
        self.probed = probed
        self.request_alignment = SECTOR if probed else 1
        self.file: File = open_file(path, writable=not read_only)
        try:
            lock_image(self.file, not read_only, force_share, metadata=False)  # rule 11
        except BaseException:
            self.file.close()
            raise
        self.size = _sectors(self.file.size())

    def read(self, offset: int, length: int) -> bytes:
        data = self.file.pread(length, offset)
        if len(data) < length:  # a file shorter than its advertised size reads zeros
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._check_writable()
        self._check_block0(offset, data, len(data))
        self.file.pwrite(data, offset)
        if fua:
            self.file.fsync()

    def write_plan(self, offset: int, data, fua: bool = False) -> WritePlan | None:
        """`write` as a plan (plan.py): one HostWrite in place, the FUA flush at its
        commit. None with O_DIRECT (partial blocks are read, modified and written)."""
        if self.file.direct:
            return None
        self._check_writable()
        self._check_block0(offset, data, len(data))
        plan = WritePlan()
        plan.writes.append(HostWrite(self.file, offset, [data]))
        if fua:
            plan.on_commit(self.file.fsync)
        return plan

    def write_zeroes(self, offset, length, may_trim=False, fast=False, fua=False):
        self._check_writable()
        self._check_block0(offset, None, length)
        if may_trim or fast:
            # Punching a hole zeroes without writing data; if the filesystem cannot,
            # a fast request must fail rather than write.
            if self.file.punch_hole(offset, length):
                if fua:
                    self.file.fsync()
                return
            if fast:
                raise NotFast()
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.file.pwrite(memoryview(_ZERO_CHUNK)[:n], offset)
            offset += n
        if fua:
            self.file.fsync()

    def discard(self, offset, length, fua=False):
        self._check_writable()
        self._check_block0(offset, None, length)
        self.file.punch_hole(offset, length)
        if fua:
            self.file.fsync()

    def resize(self, size: int) -> None:
        """qemu-img resize of a raw file: truncate. Shrinking is refused over data (qemu
        would drop it): only holes may be cut off."""
        self._check_writable()
        if size < self.size:
            try:
                data = os.lseek(self.file.fd, size, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only holes from `size` on
                    raise ImageError(f"could not look for data in '{self.path}': "
                                     f"{e.strerror}") from None
            else:
                if data < self.size:
                    raise ImageError(f"'{self.path}' holds data at offset {data}, past the "
                                     "new size: nothing was changed (qnbd only shrinks "
                                     "over an unallocated tail)")
        self.file.truncate(size)
        self.file.fsync()
        self.size = size

    def flush(self):
        if not self.read_only:
            self.file.fsync()

    def layer_status(self, offset, length):
        """qemu's raw driver over file-posix: every byte is allocated and lies at its own
        offset; holes read as zeros."""
        return [LayerExtent(e.length, not e.flags & ZERO, bool(e.flags & ZERO), offset,
                            self.path) for e in self.block_status(offset, length)]

    def block_status(self, offset, length):
        """Data/hole runs from SEEK_DATA/SEEK_HOLE; holes read as zeros. Every byte of a
        raw file is allocated at depth 1, holes included: qemu counts a protocol-level zero
        as allocated (BDRV_BLOCK_ZERO implies BDRV_BLOCK_ALLOCATED in bdrv_co_block_status),
        so qemu-nbd -A answers depth 1 for a raw export and N for a raw base at level N."""
        end = min(offset + length, self.size)
        fd = self.file.fd
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here to EOF
                return [Extent(end - offset, HOLE | ZERO, 1)]
            return [Extent(end - offset, 0, 1)]
        if data > offset:
            return [Extent(min(data, end) - offset, HOLE | ZERO, 1)]
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
        return [Extent(min(hole, end) - offset, 0, 1)]

    def close(self):
        if self.file.fd >= 0:
            self.flush()
            self.file.close()

    def _check_writable(self):
        if self.read_only:
            raise IOFailure("the device is read-only", errno.EPERM)

    def _check_block0(self, offset: int, data, length: int) -> None:
        """The first sector as it would be after writing `data` (None: zeros) at
        `offset` must still probe as raw (docs/DESIGN.md rule 14). qemu checks data
        writes only; zeroing can make a sector probe too (a magic that ends in a zero
        byte, "QED\\0"), so it is checked as well."""
        if self.probed is None or offset >= SECTOR or length <= 0:
            return
        head = bytearray(self.read(0, SECTOR))
        n = min(length, SECTOR - offset)
        head[offset:offset + n] = bytes(n) if data is None else bytes(memoryview(data)[:n])
        if not self.probed(bytes(head)):
            raise IOFailure(f"Image format was not specified for '{self.path}' and probing "
                            "guessed raw: a write that would make block 0 probe as another "
                            "format is refused (specify -f raw to remove the restriction)",
                            errno.EPERM)
