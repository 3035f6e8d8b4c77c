"""Block status down a backing chain, as qemu-img map reports it (qemu-img.c,
get_block_status): each run is described by the first layer that decides its content,
with that layer's depth, and whether any layer did (`present`)."""

from typing import NamedTuple


class MapEntry(NamedTuple):
    start: int
    length: int
    depth: int
    present: bool  # allocated in some layer (BDRV_BLOCK_ALLOCATED)
    zero: bool
    data: bool
    offset: int | None  # host offset in `file`, when the run lies there as it reads
    file: str | None


def chain_status(device, offset: int, length: int, depth: int = 0):
    """MapEntry runs covering at least a prefix of [offset, offset + length)."""
    pos = offset
    for e in device.layer_status(offset, length):
        if e.data or e.zero:
            yield MapEntry(pos, e.length, depth, True, e.zero, e.data, e.host_offset, e.file)
        else:
            yield from _below(device, pos, e.length, depth)
        pos += e.length


def _below(device, offset: int, length: int, depth: int):
    """A run this layer leaves to its backing file. Without one, or past its end, the run
    reads as zeros at this depth, unallocated (bdrv_co_block_status adds
    BDRV_BLOCK_ZERO there, not BDRV_BLOCK_ALLOCATED)."""
    backing = device.backing
    end = offset + length
    if backing is not None and offset < backing.size:
        covered = min(end, backing.size)
        while offset < covered:
            for entry in chain_status(backing, offset, covered - offset, depth + 1):
                yield entry
                offset += entry.length
    if offset < end:
        yield MapEntry(offset, end - offset, depth, False, True, False, None, None)
