"""The one seam for file access.

Every byte the engines read or write goes through a `File`. Tests replace `open_file`
(or wrap a `File`) to count calls or to simulate crashes: writes not yet fsynced can be
dropped or torn, as a power cut would.
"""

import contextlib
import contextvars
import errno
import fcntl
import functools
import os
import struct

from . import direct_io
from .errors import ImageError

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# fcntl.h (Linux): open-file-description locks. They belong to the open file, not to the
# process, so two opens in one process conflict as two processes do, and closing some
# other descriptor of the file does not drop them (POSIX record locks would). QEMU's
# image locks are OFD locks (block/file-posix.c, "locking=auto").
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# preadv2 flag: fail with EAGAIN instead of waiting for the disk (Linux 4.14+).
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# The most buffers one pwritev takes (sysconf: 1024 on Linux; POSIX's floor is 16).
_IOV_MAX = max(os.sysconf("SC_IOV_MAX"), 16)
# Whether open_file opens with O_DIRECT (serve --cache=none|directsync): set around the
# opening of a whole device, so that its backing chain and data file follow, as qemu's
# cache.direct is inherited by the children of a node.
_direct = contextvars.ContextVar("direct", default=False)


# struct flock (l_type, l_whence, l_start, l_len, l_pid): native mode aligns the fields
# as the C compiler does, and the final "0q" pads the end to the struct's alignment.
_FLOCK = struct.Struct("@hhqqi0q")


class File:
    """A positional-I/O file handle (no shared file offset)."""

    def __init__(self, path: str, fd: int, writable: bool):
        self.path = path
        self.fd = fd
        self.writable = writable
        # Whether preadv2(RWF_NOWAIT) works here (read_cached turns it off if not).
        self.nowait = _RWF_NOWAIT != 0
        # O_DIRECT: every transfer aligned through qnbd/direct_io.py.
        self.direct = False

    def use_direct(self) -> bool:
        """Switch to O_DIRECT; False (and buffered I/O) where the file system refuses."""
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False
        self.direct = True
        return True

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """Read up to `length` bytes; short only at end of file."""
        if self.direct:
            buf = bytearray(length)
            return bytes(memoryview(buf)[:direct_io.read(self.fd, memoryview(buf), offset)])
        data = os.pread(self.fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def preadinto(self, buf, offset: int) -> int:
        """Fill `buf` (a writable buffer) from `offset`; returns bytes read (short at EOF,
        past which `buf` is zeroed: it may be a reused one, qnbd/nbd/buffers.py)."""
        view = memoryview(buf)
        if self.direct:
            total = direct_io.read(self.fd, view, offset)
        else:
            total = 0
            while total < len(view):
                n = os.preadv(self.fd, [view[total:]], offset + total)
                if n == 0:
                    break
                total += n
        if total < len(view):
            view[total:] = bytes(len(view) - total)
        return total

    def read_cached(self, view: memoryview, offset: int) -> tuple[int, bool]:
        """Fill `view` from the page cache without waiting for the disk (preadv2 with
        RWF_NOWAIT; docs/DESIGN.md, "I/O model"): (bytes read, complete). Incomplete
        means the rest would block: finish it with preadinto(view[got:], offset + got),
        in a worker thread. Complete and short means end of file (the rest is zeroed).
        Where the file system cannot tell (EOPNOTSUPP, EINVAL, or no RWF_NOWAIT at all)
        the read is done here, blocking, as before, and every later one too."""
        if self.direct:
            return 0, False   # no page cache to hit: the read pool reads it in a thread
        total = 0
        size = len(view)
        while total < size and self.nowait:
            try:
                n = os.preadv(self.fd, [view[total:]], offset + total, _RWF_NOWAIT)
            except BlockingIOError:
                return total, False
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                self.nowait = False
                break
            if n == 0:   # the end of the file: zeros, as preadinto gives
                view[total:] = bytes(size - total)
                return total, True
            total += n
        if total < size:
            total += self.preadinto(view[total:], offset + total)
        return total, True

    def pwrite(self, data, offset: int) -> None:
        if self.direct:
            direct_io.write(self.fd, [data], offset)
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def pwritev(self, buffers: list, offset: int) -> None:
        if self.direct:
            direct_io.write(self.fd, buffers, offset)
            return
        if len(buffers) == 1:
            self.pwrite(buffers[0], offset)
            return
        # The kernel takes at most IOV_MAX buffers a call (EINVAL past it): a WRITE of
        # the advertised 32 MiB maximum gathers one per cluster, 2048 of 16 KiB ones.
        for first in range(0, len(buffers), _IOV_MAX):
            group = buffers[first:first + _IOV_MAX]
            total = sum(len(b) for b in group)
            written = os.pwritev(self.fd, group, offset)
            if written < total:  # rare: finish the remainder byte-exactly
                self.pwrite(memoryview(b"".join(group))[written:], offset + written)
            offset += total

    def fsync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Give the space back to the filesystem; the range then reads as zeros.
        Returns False (data untouched) where the filesystem cannot punch holes."""
        try:
            _fallocate()(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return False
        return True

    def lock_byte(self, offset: int) -> None:
        """Take a shared (read) lock on one byte. OSError when the file system refuses
        or another open file holds a conflicting lock."""
        self._ofd(F_OFD_SETLK, fcntl.F_RDLCK, offset)

    def unlock_byte(self, offset: int) -> None:
        self._ofd(F_OFD_SETLK, fcntl.F_UNLCK, offset)

    def byte_locked_elsewhere(self, offset: int) -> bool:
        """Whether another open file holds a lock on the byte, i.e. whether an exclusive
        lock would conflict (QEMU's qemu_lock_fd_test); our own locks never count."""
        return self._ofd(F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK

    def _ofd(self, command: int, lock_type: int, offset: int) -> int:
        """The l_type the kernel hands back. l_pid must be 0 for OFD locks."""
        request = _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0)
        return _FLOCK.unpack(fcntl.fcntl(self.fd, command, request))[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@functools.cache
def _fallocate():
    """fallocate(2) through ctypes: os.posix_fallocate cannot punch holes, fallocate with
    its mode argument can. ctypes.util (subprocess, tempfile, shutil) is imported here,
    by what punches holes, not by every tool that opens a file."""
    import ctypes
    import ctypes.util
    libc_fallocate = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).fallocate
    libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                               ctypes.c_longlong]

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if libc_fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return fallocate


def open_file(path: str, writable: bool) -> File:
    """Open `path` for positional I/O; errors become one-line ImageErrors."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(f"Could not open '{path}': {e.strerror}") from None
    file = File(path, fd, writable)
    if _direct.get() and not file.use_direct():
        import logging  # only here: the tools that open files need no logging (issue 17)
        logging.getLogger("qnbd.fileio").warning(
            "%s: the file system does not support O_DIRECT; using buffered I/O", path)
    return file


@contextlib.contextmanager
def direct_opens():
    """Files opened within use O_DIRECT where the file system allows it."""
    token = _direct.set(True)
    try:
        yield
    finally:
        _direct.reset(token)


def create_file(path: str) -> File:
    """Create `path` or open the existing file, for writing, never truncated here: an
    image is emptied only once locked (lock.create_locked); errors become one-line
    ImageErrors."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ImageError(f"Could not create '{path}': {e.strerror}") from None
    return File(path, fd, writable=True)
