"""Copying one block device into another as qemu-img convert does (qemu-img.c,
convert_iteration_sectors and convert_co_write): block status decides what is read at
all, and only data that is not zero is written.

- Runs that read as zeros are not read. On a target that reads zeros already (new, and
  without a backing file) they are skipped, else written as zeroes (may unmap).
- Data runs are read and scanned in `sparse`-byte grains (qemu-img -S, 4 KiB by default):
  all-zero grains are treated as zero runs, so a target is as sparse as qemu-img makes it.
  sparse=0: nothing is scanned and every byte is written.
- With a target backing file (-B), only what the source's top layer holds is copied; the
  rest is left to the target's backing file, which must read as the source's does.
- Compressed output works on whole target clusters, each written once (a compressed
  write never goes over an allocated cluster): a cluster with any data is read whole
  from the source and written compressed, one a zero run covers entirely is zeroed.
"""

from dataclasses import dataclass

from ..errors import ImageError, printable
from .status import chain_status

CHUNK = 2 << 20  # qemu-img convert's buffer (IO_BUF_SIZE): reads and progress steps
DEFAULT_SPARSE = 4096

_DATA, _ZERO, _BACKING = range(3)


@dataclass
class CopyPlan:
    zero_init: bool  # the target reads zeros everywhere before the copy (new, no backing)
    target_has_backing: bool = False
    sparse: int = DEFAULT_SPARSE
    compress: bool = False


def copy(src, dst, plan: CopyPlan, progress) -> None:
    """Copy src's content into dst (at least as large); progress counts CHUNKs."""
    size = src.size
    progress.add_total(-(-size // CHUNK))
    copier = _Copier(src, dst, plan)
    pos = 0
    while pos < size:
        end = min(size, pos + CHUNK)
        for start, n, kind in _runs(src, pos, end, plan):
            copier.run(start, n, kind)
        pos = end
        progress.step()
    dst.flush()


def broken_bitmaps(src) -> list[str]:
    """Names of the source's persistent bitmaps that cannot be copied (left in use, or
    unusable); qemu-img convert --bitmaps checks them before it copies anything."""
    names = []
    for entry in src.bitmaps.describe():
        try:
            src.bitmaps.get(entry.name)
        except ImageError:
            names.append(entry.name)
    return names


def copy_bitmaps(src, dst, skip: list[str]) -> None:
    """qemu-img convert --bitmaps (convert_copy_bitmaps): after the data, each usable
    source bitmap is added to the target with its granularity and enabled state, then
    its dirty bits merged in, so the copy itself marks nothing. Bitmaps that are not
    persistent (a parallels image's, as qemu loads them) are not copied: current qemu
    copies nothing from such a source and succeeds (qemu 7.2 refused the source)."""
    if not getattr(src.bitmaps, "persistent", True):
        return
    existing = {e.name for e in dst.bitmaps.describe()}
    for entry in src.bitmaps.describe():
        if entry.name in skip:
            continue
        if entry.name in existing:
            name = printable(entry.name)
            raise ImageError(f"Failed to create bitmap {name}: Bitmap already exists: {name}")
        bitmap = src.bitmaps.get(entry.name)
        dst.bitmaps.add(entry.name, bitmap.granularity, disabled=not bitmap.entry.auto)
        dst.bitmaps.merge(entry.name, bitmap)


def _runs(src, pos: int, end: int, plan: CopyPlan):
    """(start, length, kind) of [pos, end), adjacent runs of one kind merged."""
    current = None
    while pos < end:
        for e in chain_status(src, pos, end - pos):
            if plan.target_has_backing and e.depth > 0:
                kind = _BACKING
            elif e.zero and plan.sparse:
                kind = _ZERO
            else:
                kind = _DATA
            if current is not None and current[2] == kind:
                current[1] += e.length
            else:
                if current is not None:
                    yield tuple(current)
                current = [pos, e.length, kind]
            pos += e.length
    if current is not None:
        yield tuple(current)


class _Copier:
    def __init__(self, src, dst, plan: CopyPlan):
        self.src = src
        self.dst = dst
        self.plan = plan
        self.cluster = getattr(dst, "cluster_size", 0) if plan.compress else 0
        self.written_until = 0  # compressed output: clusters before this are done
        self._zero_grain = bytes(plan.sparse)

    def run(self, start: int, n: int, kind: int) -> None:
        if kind == _BACKING:
            return
        if self.cluster:
            self._by_clusters(start, n, kind)
        elif kind == _ZERO:
            self._zero(start, n)
        else:
            self._data(start, n)

    def _zero(self, start: int, n: int) -> None:
        if self.plan.zero_init:
            return
        backing = self.dst.backing
        if backing is not None:
            # Past the end of the target's backing file, unallocated clusters read as
            # zeros already (qemu-img convert: post_zero).
            n = min(n, max(0, backing.size - start))
        if n:
            self.dst.write_zeroes(start, n, may_trim=True)

    def _data(self, start: int, n: int) -> None:
        data = self.src.read(start, n)
        grain = self.plan.sparse
        if not grain:
            self.dst.write(start, data)
            return
        view = memoryview(data)
        run_start, run_zero = start, None
        pos, end = start, start + n
        while pos < end:
            stop = min(end, (pos // grain + 1) * grain)  # grains at absolute offsets
            piece = view[pos - start:stop - start]
            zero = piece == (self._zero_grain if stop - pos == grain else bytes(stop - pos))
            if run_zero is not None and zero != run_zero:
                self._flush_run(run_start, view[run_start - start:pos - start], run_zero)
                run_start = pos
            run_zero = zero
            pos = stop
        self._flush_run(run_start, view[run_start - start:end - start], run_zero)

    def _flush_run(self, start: int, data: memoryview, zero: bool) -> None:
        if zero:
            self._zero(start, len(data))
        else:
            self.dst.write(start, data)

    def _by_clusters(self, start: int, n: int, kind: int) -> None:
        """Compressed output: every target cluster is written once and whole, compressed
        or as zeroes (a compressed write never goes over an allocated cluster). The
        clusters a zero run covers entirely are zeroed without reading the source; the
        ones it shares with other runs are read whole."""
        cs = self.cluster
        end = start + n
        if kind == _ZERO:
            first = -(-start // cs) * cs
            last = end if end == self.src.size else end // cs * cs  # a short last cluster
            if first < last:
                self._clusters(start, first)
                zero_from = max(first, self.written_until)
                if zero_from < last:
                    self._zero(zero_from, last - zero_from)
                    self.written_until = last
                self._clusters(last, end)
                return
        self._clusters(start, end)

    def _clusters(self, start: int, end: int) -> None:
        """Read and write whole the clusters [start, end) touches, unless done already."""
        cs = self.cluster
        pos = max(start // cs * cs, self.written_until)
        end = min(-(-end // cs) * cs, self.src.size)
        while pos < end:
            data = self.src.read(pos, min(cs, end - pos))
            if data.count(0) == len(data):
                self._zero(pos, len(data))
            else:
                # A short last cluster is padded unless it is the target's last too.
                self.dst.write_compressed(pos, bytes(data).ljust(min(cs, self.dst.size - pos),
                                                                 b"\0"))
            pos += cs
        self.written_until = max(self.written_until, pos)
