"""Raw files as block devices (exports of `-f raw`, and raw backing files)."""

import errno
import os

from ..errors import IOFailure, NotFast
from ..fileio import File, open_file
from ..lock import lock_image
from .base import HOLE, ZERO, Extent

_ZERO_CHUNK = bytes(1 << 20)


class RawDevice:
    supports_fast_zero = True

    def __init__(self, path: str, read_only: bool = True, force_share: bool = False):
        self.path = path
        self.read_only = read_only
        self.file: File = open_file(path, writable=not read_only)
        try:
            lock_image(self.file, not read_only, force_share, metadata=False)  # rule 11
        except BaseException:
            self.file.close()
            raise
        self.size = self.file.size()

    def read(self, offset: int, length: int) -> bytes:
        data = self.file.pread(length, offset)
        if len(data) < length:  # a file shorter than its advertised size reads zeros
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._check_writable()
        self.file.pwrite(data, offset)
        if fua:
            self.file.fsync()

    def write_zeroes(self, offset, length, may_trim=False, fast=False, fua=False):
        self._check_writable()
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
        self.file.punch_hole(offset, length)
        if fua:
            self.file.fsync()

    def flush(self):
        if not self.read_only:
            self.file.fsync()

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
