"""Read plans: what a read needs, for the server to execute (docs/DESIGN.md, "I/O model").

An engine maps a guest range on the caller's thread (the event loop: mapping needs no
locks there) and answers with pieces `(length, data)`: data None where the range reads as
zeros for certain, bytes already made (compressed clusters, backing files), or a
`HostRead` naming a host range of one of its files. The server performs the HostReads:
inline when the page cache has the bytes, else in a worker thread, so a disk is driven
at the queue depth the clients give it. The engines stay free of threads and asyncio.

A HostRead stays valid only while nothing frees or rewrites the cluster it names: the
server runs no write, zero or discard on an export while reads of it are out (see
qnbd/nbd/reads.py).
"""

from .base import read_parts


class HostRead:
    """`length` bytes of `file` (a qnbd.fileio.File) at `offset`; past the file's end
    they read as zeros, as the engines' own reads do."""

    __slots__ = ("file", "offset", "length")

    def __init__(self, file, offset: int, length: int):
        self.file = file
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytearray:
        """The bytes, blocking: for callers without a pool."""
        buf = bytearray(self.length)
        self.file.preadinto(buf, self.offset)
        return buf


def read_plan(device, offset: int, length: int) -> list:
    """The device's own plan, or its materialized parts (read_parts) where it has none."""
    own = getattr(device, "read_plan", None)
    if own is not None:
        return own(offset, length)
    return read_parts(device, offset, length)
