"""Block status down a backing chain, as qemu-img map reports it (qemu-img.c,
get_block_status): each run is described by the first layer that decides its content,
with that layer's depth, and whether any layer did (`present`)."""

from typing import NamedTuple

from .base import ZERO, LayerExtent


class MapEntry(NamedTuple):
    start: int
    length: int
    depth: int
    present: bool  # allocated in some layer (BDRV_BLOCK_ALLOCATED)
    zero: bool
    data: bool
    offset: int | None  # host offset in `file`, when the run lies there as it reads
    file: str | None
    compressed: bool = False  # stored compressed (BDRV_BLOCK_COMPRESSED)


def chain_status(device, offset: int, length: int, depth: int = 0):
    """MapEntry runs covering at least a prefix of [offset, offset + length)."""
    pos = offset
    for e in _layer_status(device, offset, length):
        if e.data or e.zero:
            yield MapEntry(pos, e.length, depth, True, e.zero, e.data, e.host_offset, e.file,
                           e.compressed)
        else:
            yield from _below(device, pos, e.length, depth, e.host_offset, e.file)
        pos += e.length


def _layer_status(device, offset: int, length: int) -> list[LayerExtent]:
    """The device's own layer_status; for devices without one (no backing file: NBD
    and other protocols, windows, formats without the query), what block status says,
    with no host offsets: allocated at depth 1, else neither data nor zero."""
    own = getattr(device, "layer_status", None)
    if own is not None:
        return own(offset, length)
    return [LayerExtent(e.length, e.depth == 1 and not e.flags & ZERO,
                        e.depth == 1 and bool(e.flags & ZERO), None, None)
            for e in device.block_status(offset, length)]


def _below(device, offset: int, length: int, depth: int, host: int | None = None,
           file: str | None = None):
    """A run this layer leaves to its backing file. Without one, or past its end, the run
    reads as zeros at this depth, unallocated (bdrv_co_block_status adds
    BDRV_BLOCK_ZERO there, not BDRV_BLOCK_ALLOCATED), still at the host offset this
    layer gave it, if any (qcow2 subclusters unallocated in an allocated cluster)."""
    backing = getattr(device, "backing", None)
    start, end = offset, offset + length
    if backing is not None and offset < backing.size:
        covered = min(end, backing.size)
        while offset < covered:
            for entry in chain_status(backing, offset, covered - offset, depth + 1):
                yield entry
                offset += entry.length
    if offset < end:
        yield MapEntry(offset, end - offset, depth, False, True, False,
                       None if host is None else host + offset - start, file)
