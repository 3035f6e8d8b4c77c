"""READ data sent straight from the page cache to a unix socket (docs/DESIGN.md, "I/O
model", "Zero-copy replies").

Copying a READ's bytes out of the page cache into a buffer, then into the socket, was
most of the server's CPU per read (perf, randread-4k on tmpfs: 50% of it in the kernel's
copy out of the page cache). sendfile(2) to an AF_UNIX stream socket copies nothing:
the socket's buffers take references to the file's pages (MSG_SPLICE_PAGES, Linux 6.5+;
on older kernels it copies once, which is still one copy less). The client copies
them out when it reads.

That is safe only while those pages keep the bytes the reply stands for. A write in
place, or a cluster freed and reused, would change a reply already "sent" but not yet
read by the client. So a write, zero or discard on the export waits until the client
has read every spliced byte (the socket's SIOCOUTQ, the bytes the peer has not taken,
is 0: see ReadPool.may_mutate). Only AF_UNIX: on TCP, SIOCOUTQ counts unacknowledged
bytes, and over loopback an acknowledged page may still wait in the peer's receive
queue. Only files whose reads never wait for a disk (no RWF_NOWAIT: tmpfs), since
sendfile cannot be told not to block the event loop; disk files keep the read pool.

While a connection splices, it writes every reply itself (`Splicer.send`), the uvloop
transport only reads: a reply's header and its spliced data must follow each other in
the stream, and uvloop cannot queue a file range behind the bytes it buffers. What the
socket cannot take at once waits here, HostReads still unread (no copy), until the
socket is writable again (a watcher on a duplicate of its descriptor); past the
connection's reply budget the connection pauses as it does for the transport.
"""

import collections
import fcntl
import os
import socket
import struct
import termios

from ..block.plan import HostRead

_OUTQ = struct.Struct("i")
# READs shorter than this are copied as before: a 4 KiB copy out of the page cache costs
# less than the sendfile call and the separate header write (randread-4k, quiet machine:
# 14-15 us of CPU a read copied, 22-23 us spliced; 1 MiB: 0.27 ms spliced, 1.4 ms copied).
SPLICE_MIN = 64 << 10
# Buffers per writev: well under the kernel's UIO_MAXIOV (1024).
_IOV = 256


def spliceable(sock) -> bool:
    return sock is not None and sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM


def memory_backed(piece) -> bool:
    """Whether sendfile of this HostRead cannot wait for a disk: a plain File on which
    RWF_NOWAIT was refused (tmpfs), so every read of it was inline and blocking anyway."""
    file = piece.file
    if getattr(file, "read_cached", None) is None or file.direct:
        return False
    if not getattr(file, "nowait_known", True):   # one byte read to find out (read_cached records it)
        file.read_cached(memoryview(bytearray(1)), piece.offset)
    return not file.nowait


class Splicer:
    """One connection's writer. `fd` is a duplicate of the socket's descriptor, owned
    here: the unread count can be asked for until `close`, even after the transport has
    closed its own (whose number may be reused meanwhile)."""

    def __init__(self, loop, sock, limit: int, on_full, on_room, on_error):
        self.loop = loop
        self.fd = os.dup(sock.fileno())
        self.queue: collections.deque = collections.deque()   # pieces not yet written
        self.queued = 0          # their bytes
        self.limit = limit       # the reply budget: past it, on_full(); on_room() below it
        self.full = False
        self.watching = False    # a writer callback waits for room in the socket
        self.on_full, self.on_room, self.on_error = on_full, on_room, on_error
        self.on_empty = None     # called once the queue is written (closing)
        self.spliced = False     # pages of a file may be in the socket, unread by the peer

    def unread(self) -> bool:
        """Whether spliced bytes may still be unread by the client (or wait here)."""
        if self.queue:
            return True
        if not self.spliced or self.fd < 0:
            return False
        buf = fcntl.ioctl(self.fd, termios.TIOCOUTQ, b"\0\0\0\0")
        if _OUTQ.unpack(buf)[0]:
            return True
        self.spliced = False
        return False

    def close(self) -> None:
        """The connection is gone: nothing more is written."""
        if self.watching:
            self.loop.remove_writer(self.fd)
            self.watching = False
        self.queue.clear()
        self.queued = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.spliced = False

    def send(self, pieces: list) -> None:
        """Write reply pieces (bytes, and HostReads of memory-backed files) in order."""
        if self.fd < 0:
            return
        self.queue.extend(pieces)
        self.queued += sum(len(p) for p in pieces)
        if not self.watching:
            self._drain()
        if self.queued > self.limit and not self.full:
            self.full = True
            self.on_full()

    def _writable(self) -> None:
        self._drain()
        if self.full and self.queued <= self.limit // 2:
            self.full = False
            self.on_room()

    def _drain(self) -> None:
        """Write queued pieces until the socket is full or they are all written."""
        queue = self.queue
        try:
            while queue and self._write_head():
                pass
        except OSError as e:
            self.close()
            self.on_error(e)
            return
        if queue and not self.watching:
            self.loop.add_writer(self.fd, self._writable)
            self.watching = True
        elif not queue:
            if self.watching:
                self.loop.remove_writer(self.fd)
                self.watching = False
            if self.on_empty is not None:
                self.on_empty()

    def _write_head(self) -> bool:
        """Write from the head of the queue; False when the socket took less than asked.
        OSError: the socket broke or the file failed, maybe after a reply's header went
        out: the session must end (a hard disconnect, as proto.md asks of a read that
        fails after its reply began)."""
        queue = self.queue
        piece = queue[0]
        if piece.__class__ is HostRead:
            try:
                n = os.sendfile(self.fd, piece.file.fd, piece.offset, piece.length)
            except BlockingIOError:
                return False
            if n == 0:   # past the end of the file: the rest reads as zeros
                queue[0] = bytes(piece.length)
                return True
            self.spliced = True
            self.queued -= n
            if n < piece.length:
                queue[0] = HostRead(piece.file, piece.offset + n, piece.length - n)
                return True   # the next call finds out whether more fits
            queue.popleft()
            return True
        batch = []
        for p in queue:
            if p.__class__ is HostRead or len(batch) == _IOV:
                break
            batch.append(p)
        try:
            n = os.writev(self.fd, batch)
        except BlockingIOError:
            return False
        self.queued -= n
        for p in batch:
            if n < len(p):
                if n:
                    queue[0] = memoryview(p)[n:]
                return False
            n -= len(p)
            queue.popleft()
        return True
