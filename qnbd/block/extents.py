"""Block-status pieces every format with a backing chain shares: extents merged as they
are appended, and the extents of a backing file seen through an image (qemu's
allocation depth counted one layer down; past the backing file's end, zeros that count
as allocated in it)."""

from .base import HOLE, ZERO, Extent

# What a caller that uses only the first extent asks for first (first_extent, and NBD's
# REQ_ONE): a qcow2 image of 512-byte clusters maps it with two L2 tables, one of 64 KiB
# clusters with one entry.
FIRST_WINDOW = 64 << 10


def append_extent(extents: list, e: Extent) -> None:
    if extents and extents[-1].flags == e.flags and extents[-1].depth == e.depth:
        extents[-1] = Extent(extents[-1].length + e.length, e.flags, e.depth)
    else:
        extents.append(e)


def first_extent(device, offset: int, length: int) -> Extent:
    """The first extent of device.block_status(offset, length), asking for FIRST_WINDOW
    bytes, then twice as many each time the extent reaches the end of what was asked:
    the engines map all they are asked for, so asking for the whole range to use one
    extent cost a walk of up to 64 L2 tables per extent (issue 17); this stays within
    twice what the extent needs. The extent may stop short of its true end (where the
    device answered less than it was asked): callers ask again from there."""
    end = offset + length
    window = FIRST_WINDOW
    first = None
    while offset < end:
        asked = min(window, end - offset)
        extents = device.block_status(offset, asked)
        e = extents[0]
        if first is None:
            first = e
        elif e.flags == first.flags and e.depth == first.depth:
            first = Extent(first.length + e.length, e.flags, e.depth)
        else:
            break
        offset += e.length
        if len(extents) > 1 or e.length < asked:
            break
        window *= 2
    return first


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
