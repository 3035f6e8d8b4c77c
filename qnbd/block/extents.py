"""Block-status pieces every format with a backing chain shares: extents merged as they
are appended, and the extents of a backing file seen through an image (qemu's
allocation depth counted one layer down; past the backing file's end, zeros that count
as allocated in it)."""

from .base import HOLE, ZERO, Extent


def append_extent(extents: list, e: Extent) -> None:
    if extents and extents[-1].flags == e.flags and extents[-1].depth == e.depth:
        extents[-1] = Extent(extents[-1].length + e.length, e.flags, e.depth)
    else:
        extents.append(e)


def backing_extents(backing, offset: int, length: int):
    """Extents of [offset, offset+length) read through to `backing`, one layer down."""
    end = offset + length
    covered = min(end, backing.size)
    while offset < covered:
        extents = backing.block_status(offset, covered - offset)
        if not extents:
            break
        for e in extents:
            n = min(e.length, covered - offset)
            yield Extent(n, e.flags, e.depth + 1 if e.depth else 0)
            offset += n
            if offset >= covered:
                break
    if end > offset:
        # Past a short backing file's end: zeros that count as allocated in it, at its
        # depth (qemu's bdrv_co_common_block_status_above, as qemu-nbd -A reports them).
        yield Extent(end - offset, HOLE | ZERO, 2)
