"""The BlockDevice contract between exports and storage engines.

Offsets and lengths are bytes. Engines check nothing about request bounds beyond what
protects the image: callers (the NBD layer) validate ranges against `size` first.
Failures raise `qnbd.errors.IOFailure` carrying an errno (EIO, ENOSPC, EPERM, ENOTSUP),
which the NBD layer maps onto its error codes.
"""

from typing import NamedTuple, Protocol

# Extent flags: the same bit values as NBD's base:allocation context (proto.md,
# "base:allocation metadata context"), so the server can pass them through unchanged.
HOLE = 1  # not allocated in any layer: reads are not backed by storage
ZERO = 2  # reads as zeros


class Extent(NamedTuple):
    """A run of bytes with one status.

    depth: 0 = not allocated in any layer of the chain, 1 = allocated in this image,
    2 = in its backing file, and so on (qemu:allocation-depth, qemu docs/interop/nbd.rst).
    """

    length: int
    flags: int
    depth: int


class LayerExtent(NamedTuple):
    """What one layer of a chain says about a run of bytes, without looking below it:
    qemu's bdrv_block_status() of one node (include/block/block-common.h, BDRV_BLOCK_*).
    Neither data nor zero means "not allocated here": the backing file decides.

    host_offset: where the bytes lie, contiguously, in the file `file` (None when they
    do not lie as they read, e.g. compressed clusters).
    compressed: the bytes are stored compressed (BDRV_BLOCK_COMPRESSED).
    """

    length: int
    data: bool
    zero: bool
    host_offset: int | None
    file: str | None
    compressed: bool = False


class BlockDevice(Protocol):
    size: int
    read_only: bool
    backing: "BlockDevice | None"  # the layer below, whose data shows where this one has none
    # True when write_zeroes(fast=True) can ever succeed (NBD_FLAG_SEND_FAST_ZERO).
    supports_fast_zero: bool

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes."""

    def write(self, offset: int, data, fua: bool = False) -> None:
        """Write `data`; with fua, data and the metadata that reaches it are durable on return."""

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        """Make the range read as zeros. may_trim: space may be released. fast: raise
        NotFast instead of writing zero data."""

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        """Advisory: release space where possible. Content of whole discarded clusters
        reads as zeros afterwards; partial clusters are left as they were."""

    def flush(self) -> None:
        """Everything acknowledged so far is durable on return."""

    def read_parts(self, offset: int, length: int) -> list[tuple[int, bytes | None]]:
        """Optional: the range as (length, data) pieces, data None where the range reads
        as zeros for certain, in one pass (see read_parts() below for devices without)."""

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least [offset, offset+length), at most to `size`;
        the first starts at `offset`. May stop early but returns at least one extent."""

    def layer_status(self, offset: int, length: int) -> list[LayerExtent]:
        """This layer alone, from `offset`: extents covering at least a prefix of the
        range (qemu-img map and convert -B walk the chain themselves)."""

    def close(self) -> None:
        """Flush and release; the image is left clean."""


def read_parts(device, offset: int, length: int) -> list[tuple[int, bytes | None]]:
    """(length, data) pieces covering the range, data None where block status says the
    device reads zeros; a device's own read_parts() does it in one pass."""
    own = getattr(device, "read_parts", None)
    if own is not None:
        return own(offset, length)
    parts = []
    end = offset + length
    while offset < end:
        extent = device.block_status(offset, end - offset)[0]
        n = min(extent.length, end - offset)
        parts.append((n, None if extent.flags & ZERO else device.read(offset, n)))
        offset += n
    return parts
