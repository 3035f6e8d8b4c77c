"""A window of a block device: the bytes from `offset`, `size` long (qemu's raw format
driver with its offset and size options, which is what qemu-nbd --offset puts over the
image: BlockdevOptionsRaw in qapi/block-core.json)."""

from ..errors import ImageError
from .base import Extent, read_parts
from .cache import caches_behind


class Window:
    def __init__(self, device, offset: int, size: int | None = None):
        if offset > device.size:
            raise ImageError(f"Offset ({offset}) cannot be greater than size of the "
                             f"containing file ({device.size})")
        if size is None:
            size = device.size - offset
        if offset + size > device.size:
            raise ImageError(f"The sum of offset ({offset}) and size ({size}) has to be "
                             f"smaller or equal to the actual size of the containing file "
                             f"({device.size})")
        self.device, self.offset, self.size = device, offset, size
        self.read_only = device.read_only
        self.supports_fast_zero = device.supports_fast_zero

    @property
    def table_caches(self):
        return caches_behind(self.device)

    def read(self, offset, length):
        return self.device.read(self.offset + offset, length)

    def read_parts(self, offset, length):
        return read_parts(self.device, self.offset + offset, length)

    def write(self, offset, data, fua=False):
        self.device.write(self.offset + offset, data, fua=fua)

    def write_zeroes(self, offset, length, may_trim=False, fast=False, fua=False):
        self.device.write_zeroes(self.offset + offset, length, may_trim=may_trim,
                                 fast=fast, fua=fua)

    def discard(self, offset, length, fua=False):
        self.device.discard(self.offset + offset, length, fua=fua)

    def flush(self):
        self.device.flush()

    def block_status(self, offset, length):
        """The device's extents, cut at the end of the window."""
        left = self.size - offset
        out = []
        for extent in self.device.block_status(self.offset + offset, min(length, left)):
            n = min(extent.length, left)
            out.append(Extent(n, extent.flags, extent.depth))
            left -= n
            if not left:
                break
        return out

    def close(self):
        self.device.close()
