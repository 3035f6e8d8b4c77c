"""Edges of the asyncio side of a connection (qnbd/nbd/connection.py) found by
reviewing it: each test states the guarantee and failed on the code before its fix."""

import errno
import os

from inprocess import (MiB, RecordingTransport, close_pooled, pooled_connections,
                       read_request)
from peers import qemu_img, qemu_io
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from test_write_pool import KiB, loop, replies, request, spin, wait  # noqa: F401


def test_a_read_error_on_the_loop_is_an_eio_reply(tmp_path, loop, monkeypatch):  # noqa: F811
    """proto.md: an I/O error costs the request an error reply, never the session. A
    FLUSH, then a 64 KiB READ whose data is read on the loop and fails with EIO: the
    FLUSH is answered, the READ gets EIO (as a large one does through a worker thread),
    and the session goes on."""
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "qcow2", "write -P 0x11 0 1M")
    export = Export.open(ExportConfig(image=path, format="qcow2"))
    real_preadv, real_pread = os.preadv, os.pread
    failing = [False]

    def ours(fd):
        return failing[0] and os.readlink(f"/proc/self/fd/{fd}") == path

    def preadv(fd, buffers, offset, *flags):   # the data reads of this image fail
        if ours(fd):
            raise OSError(errno.EIO, "injected")
        return real_preadv(fd, buffers, offset, *flags)

    def pread(fd, n, offset):
        if ours(fd):
            raise OSError(errno.EIO, "injected")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pread", pread)
    (a,), server = pooled_connections(loop, export)
    try:
        a.data_received(read_request(1, MiB, 4096))   # the L2 table is cached now
        wait(loop, lambda: len(a.transport.data) >= 16 + 4096)
        failing[0] = True   # only data reads are left to fail
        a.data_received(request(p.CMD_FLUSH, 2) + read_request(3, 0, 64 * KiB))
        wait(loop, lambda: len(a.transport.data) >= 16 + 4096 + 32)
        assert [(c, e) for c, e, _d in replies(a.transport.data, {1: 4096})] \
            == [(1, 0), (2, 0), (3, p.EIO)]
        failing[0] = False
        a.data_received(read_request(4, 0, 4096))
        wait(loop, lambda: len(a.transport.data) >= 16 + 4096 + 48 + 4096)
        assert replies(a.transport.data, {1: 4096, 4: 4096})[3] == (4, 0, b"\x11" * 4096)
    finally:
        close_pooled(server, export)


class ClosingTransport(RecordingTransport):
    """As uvloop's: once closed, a write raises (UVHandle._ensure_alive)."""

    def writelines(self, pieces):
        if self.closed:
            raise RuntimeError("unable to perform operation: the handler is closed")
        super().writelines(pieces)


def test_a_turn_queued_before_the_connection_was_lost_writes_nothing(tmp_path,  # noqa: F811
                                                                   loop):
    """A client pipelines more than one turn of READs and drops: the queued turn must
    not write to the closed transport (a traceback in the server's log)."""
    path = str(tmp_path / "disk.raw")
    qemu_img("create", "-q", "-f", "raw", path, "8M")
    export = Export.open(ExportConfig(image=path, format="raw"))
    (a,), server = pooled_connections(loop, export)
    a.transport = ClosingTransport()
    failures = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    try:
        a.data_received(b"".join(read_request(i, 0, MiB) for i in range(8)))
        assert a.scheduled   # 4 MiB made: the rest waits for the next turn
        a.transport.closed = True   # the peer dropped: uvloop closes, then reports it
        a.connection_lost(None)
        spin(loop, 0.05)
        assert not failures, failures[0].get("exception")
    finally:
        close_pooled(server, export)
