"""Copy-before-write: point-in-time views of a live device (issue 15, checkpoints), as
qemu's copy-before-write filter with a fleecing image does it (block/copy-before-write.c),
in one object.

`CopyBeforeWrite` wraps the live device while views exist. Before a write, a zero write
or a discard changes a range, each view saves the grains of that range it has not saved
yet (the old bytes, read from the device) into its temporary overlay; then the change
goes through. A `PointInTime` view reads saved grains from its overlay and every other
grain from the live device, which has not changed there since the view was made: the
view shows the device exactly as it was at its creation, while writers go on.

Everything runs on the event loop, one request at a time (docs/DESIGN.md "I/O model"), so
a view made between two requests is exact with respect to both. The overlay is an
unlinked temporary file (as `serve -s`'s, block/overlay.py): nothing needs to survive a
crash, the view dies with the process. Memory: one byte per grain of the regions
written since the view was made (qnbd/block/grainmap.py), never sized by the image.
"""

import os
import tempfile

from ..fileio import File
from .base import Extent
from .extents import first_extent
from .grainmap import GRAIN, GrainMap
from .overlay import grain_runs, read_grains

# Saved per copy step: a write over a long range copies in pieces this large.
COPY_CHUNK = 4 << 20


class PointInTime:
    """A read-only device: `source` as it was when this was created."""

    read_only = True
    supports_fast_zero = False

    def __init__(self, source, tmpdir: str | None = None):
        self.source = source
        # Looked through for bitmaps (qnbd/export.py `_bitmap`): the view offers the live
        # image's bitmaps, whose bits say what changed before this instant.
        self.base = source
        self.size = source.size
        fd, path = tempfile.mkstemp(prefix="qnbd-checkpoint-", dir=tmpdir)
        os.unlink(path)
        self.file = File(path, fd, writable=True)
        self.saved = GrainMap(self.size)   # the grains in the file
        self.copied = 0

    def preserve(self, offset: int, length: int) -> int:
        """Save the grains of [offset, offset+length) not saved yet; bytes copied."""
        end = min(offset + length, self.size)
        if offset >= end:
            return 0
        first, last = offset // GRAIN, (end - 1) // GRAIN
        saved = self.saved
        copied = 0
        # Runs of unsaved grains (none, the common case once a region was touched),
        # copied in pieces of COPY_CHUNK.
        g = saved.first_clear(first, last + 1)
        while g >= 0:
            stop = min(saved.run_end(g, last), g + COPY_CHUNK // GRAIN)
            start = g * GRAIN
            n = min(stop * GRAIN, self.size) - start
            self.file.pwrite(self.source.read(start, n), start)
            saved.set(g, stop)
            copied += n
            g = saved.first_clear(stop, last + 1)
        self.copied += copied
        return copied

    def _runs(self, offset: int, length: int):
        return grain_runs(self.saved, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        return read_grains(self.saved, self.file, self.source, offset, length)

    def block_status(self, offset: int, length: int):
        start, n, mine = next(self._runs(offset, min(length, self.size - offset)))
        if mine:
            return [Extent(n, 0, 1)]   # data: always a safe answer for saved bytes
        ext = first_extent(self.source, start, n)
        return [Extent(min(ext.length, n), ext.flags, ext.depth)]

    def flush(self) -> None:
        """Nothing to make durable: the view is temporary."""

    def close(self) -> None:
        self.file.close()


class CopyBeforeWrite:
    """The live device, wrapped while point-in-time views of it exist: every change is
    preceded by the views saving what it overwrites. Everything else is the device's."""

    def __init__(self, device, on_copy=None):
        self.device = device
        self.views: list[PointInTime] = []
        self.on_copy = on_copy   # called with the bytes each change made the views copy

    def __getattr__(self, name):
        return getattr(self.device, name)

    def _preserve(self, offset: int, length: int) -> None:
        copied = 0
        for view in self.views:
            copied += view.preserve(offset, length)
        if copied and self.on_copy is not None:
            self.on_copy(copied)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._preserve(offset, len(data))
        self.device.write(offset, data, fua=fua)

    def write_plan(self, offset: int, data, fua: bool = False):
        """The device's write plan (plan.py), once the views have saved what it will
        overwrite (read now, before any of its HostWrites runs); None where the device
        has none (then `write`)."""
        own = getattr(self.device, "write_plan", None)
        if own is None:
            return None
        self._preserve(offset, len(data))
        return own(offset, data, fua)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        self._preserve(offset, length)
        self.device.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._preserve(offset, length)
        self.device.discard(offset, length, fua=fua)
