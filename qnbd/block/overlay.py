"""A throwaway copy-on-write overlay for `qnbd serve --snapshot` (qemu-nbd -s).

The base device is opened read-only; every write lands in an unlinked temporary file of
the same size, tracked per 64 KiB grain. Nothing written through the overlay ever reaches
the base image, and the temporary file disappears with the process.
"""

import os
import tempfile

from ..errors import NotFast
from ..fileio import File
from .base import Extent
from .cache import caches_behind
from .extents import first_extent
from .grainmap import GRAIN, GrainMap

_ZERO_GRAIN = bytes(GRAIN)


class SnapshotOverlay:
    supports_fast_zero = True
    read_only = False

    def __init__(self, base, tmpdir: str | None = None):
        self.base = base
        self.size = base.size
        fd, path = tempfile.mkstemp(prefix="qnbd-snapshot-", dir=tmpdir)
        os.unlink(path)
        self.file = File(path, fd, writable=True)
        self.file.truncate(self.size)
        # Held grains: their current content is in the overlay file.
        self.mine = GrainMap(self.size)

    def _runs(self, offset: int, length: int):
        return grain_runs(self.mine, offset, length)

    @property
    def table_caches(self):
        return caches_behind(self.base)

    def read(self, offset: int, length: int) -> bytes:
        return read_grains(self.mine, self.file, self.base, offset, length)

    def _take(self, offset: int, length: int) -> None:
        """Claim the grains of a range, copying base content into the parts of the edge
        grains the range does not cover (copy-on-write)."""
        if length == 0:
            return
        end = offset + length
        first, last = offset // GRAIN, (end - 1) // GRAIN
        for g in {first, last}:
            start = g * GRAIN
            n = min(GRAIN, self.size - start)
            if not self.mine[g] and not (offset <= start and start + n <= end):
                self.file.pwrite(self.base.read(start, n), start)
        self.mine.set(first, last + 1)

    def write(self, offset, data, fua=False):
        self._take(offset, len(data))
        self.file.pwrite(data, offset)

    def write_zeroes(self, offset, length, may_trim=False, fast=False, fua=False):
        self._take(offset, length)
        if self.file.punch_hole(offset, length):
            return
        if fast:
            raise NotFast()
        end = offset + length
        while offset < end:
            n = min(GRAIN, end - offset)
            self.file.pwrite(memoryview(_ZERO_GRAIN)[:n], offset)
            offset += n

    def discard(self, offset, length, fua=False):
        # Whole grains only, so partial grains keep their content (the contract's rule).
        start = -(-offset // GRAIN) * GRAIN
        end = min((offset + length) // GRAIN * GRAIN, self.size)
        if offset + length >= self.size:
            end = self.size
        if end > start:
            self.write_zeroes(start, end - start)

    def flush(self):
        """Nothing to make durable: the overlay dies with the process."""

    def block_status(self, offset, length):
        start, n, mine = next(self._runs(offset, length))
        if mine:
            return [Extent(n, 0, 1)]
        ext = first_extent(self.base, start, n)
        return [Extent(min(ext.length, n), ext.flags, ext.depth + 1 if ext.depth else 0)]

    def close(self):
        self.file.close()
        self.base.close()


def grain_runs(owned: GrainMap, offset: int, length: int):
    """(start, length, in the overlay file) runs of grains with the same owner (shared
    with the checkpoint view, qnbd/block/cbw.py)."""
    end = offset + length
    last = (end - 1) // GRAIN
    while offset < end:
        g = offset // GRAIN
        owner = owned[g]
        stop = owned.run_end(g, last)
        n = min(stop * GRAIN, end) - offset
        yield offset, n, owner
        offset += n


def read_grains(owned: GrainMap, file, base, offset: int, length: int) -> bytes:
    """The range read from the overlay `file` where its grains are owned, from `base`
    elsewhere."""
    parts = []
    for start, n, mine in grain_runs(owned, offset, length):
        if mine:
            data = file.pread(n, start)
            parts.append(data + bytes(n - len(data)))
        else:
            parts.append(base.read(start, n))
    return parts[0] if len(parts) == 1 else b"".join(parts)
