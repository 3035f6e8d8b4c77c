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


# -- write plans --------------------------------------------------------------------------
#
# The mirror of a read plan: an engine maps and allocates a guest write on the caller's
# thread (the event loop) and answers with the `HostWrite`s that put the guest's bytes
# in its files, plus what to do once they are there. The server performs the HostWrites
# (inline, or in a worker thread: qnbd/nbd/writes.py), then calls `commit()` on the loop:
# only then do the L2 entries that map new clusters change (docs/DESIGN.md rule 4), so a
# crash or a failed write never leaves a mapping to data that was not written. On a
# failure it calls `abort()`: nothing is mapped, and what was allocated for the write is
# queued for release. The engines stay free of threads and asyncio.


class HostWrite:
    """`buffers` written contiguously into `file` (a qnbd.fileio.File) at `offset`."""

    __slots__ = ("file", "offset", "buffers")

    def __init__(self, file, offset: int, buffers: list):
        self.file = file
        self.offset = offset
        self.buffers = buffers

    def perform(self) -> None:
        """Blocking; safe in any thread (it touches the file and nothing else)."""
        self.file.pwritev(self.buffers, self.offset)


class WritePlan:
    """HostWrites, and the steps to run on the loop once they all succeeded (`commit`)
    or one failed (`abort`). Built by an engine; `run()` is the whole write, inline."""

    __slots__ = ("writes", "_commits", "_aborts")

    def __init__(self):
        self.writes: list[HostWrite] = []
        self._commits: list = []
        self._aborts: list = []

    def on_commit(self, step) -> None:
        self._commits.append(step)

    def on_abort(self, step) -> None:
        self._aborts.append(step)

    def commit(self) -> None:
        for step in self._commits:
            step()

    def abort(self) -> None:
        for step in self._aborts:
            step()

    def run(self) -> None:
        try:
            for w in self.writes:
                w.perform()
        except BaseException:
            self.abort()
            raise
        self.commit()


def write_plan(device, offset: int, data, fua: bool):
    """The device's plan for a guest write, or None where it has none (the caller then
    writes synchronously, device.write)."""
    own = getattr(device, "write_plan", None)
    return None if own is None else own(offset, data, fua)
