"""qemu's null-co protocol (`null-co://`, block/null.c): a device of a given size (default
1 GiB) whose writes are dropped. Its reads give zeros here; qemu leaves them undefined
unless read-zeroes=on, so block status says "hole" and only with read-zeroes also
"zero", as qemu's null_co_block_status does."""

from .base import HOLE, ZERO, Extent

DEFAULT_SIZE = 1 << 30


class NullDevice:
    supports_fast_zero = True

    def __init__(self, size: int = DEFAULT_SIZE, read_zeroes: bool = False,
                 read_only: bool = False, request_alignment: int = 1):
        self.size = size
        self.read_only = read_only
        self.flags = HOLE | ZERO if read_zeroes else HOLE
        self.request_alignment = request_alignment

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset, data, fua=False):
        pass

    def write_zeroes(self, offset, length, may_trim=False, fast=False, fua=False):
        pass

    def discard(self, offset, length, fua=False):
        pass

    def flush(self):
        pass

    def block_status(self, offset, length):
        return [Extent(min(length, self.size - offset), self.flags, 0)]

    def close(self):
        pass
