"""Zero-copy READ replies (qnbd/nbd/splice.py, docs/DESIGN.md "I/O model"): data of
memory-backed files goes from the page cache to a unix socket by sendfile, and no write
changes it before the client has read it."""

import os
import random
import socket
import subprocess
import tempfile
import time

import nbd
import pytest
import uvloop

from nbdserver import serve  # noqa: F401 (fixture)
from qnbd.block.plan import HostRead
from qnbd.fileio import File
from qnbd.nbd.splice import Splicer

MiB = 1 << 20


@pytest.fixture
def shm_dir():
    """tmpfs: RWF_NOWAIT is refused there, so reads of it are spliced."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = tempfile.mkdtemp(prefix="qnbd-splice-", dir="/dev/shm")
    yield path
    subprocess.run(["rm", "-rf", path], check=True)


def _file(path, data: bytes) -> File:
    with open(path, "wb") as f:
        f.write(data)
    return File(path, os.open(path, os.O_RDWR), True)


def _recv_all(sock, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "connection closed early"
        got += chunk
    return bytes(got)


def test_spliced_bytes_are_the_page_cache_until_read(shm_dir):
    """sendfile hands the socket the file's pages, not a copy: a write before the peer
    reads shows through. That is what the server must hold writes for (unread())."""
    f = _file(os.path.join(shm_dir, "f"), b"a" * 8192)
    loop = uvloop.new_event_loop()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        splicer = Splicer(loop, ours, 1 << 20, None, None, None)
        splicer.send([b"hdr:", HostRead(f, 4096, 4096), b":end"])
        assert not splicer.queue and splicer.spliced
        assert splicer.unread()
        os.pwrite(f.fd, b"b" * 4096, 4096)
        assert _recv_all(peer, 4 + 4096 + 4) == b"hdr:" + b"b" * 4096 + b":end"
        assert not splicer.unread()
        splicer.close()
    finally:
        ours.close()
        peer.close()
        os.close(f.fd)
        loop.close()


def test_a_full_socket_queues_in_order_and_pauses_the_connection(shm_dir):
    """More than the socket takes: the rest waits in the splicer (HostReads unread),
    the connection is told to pause past its budget and to resume once written, and
    the peer gets every piece in order, zeros past the end of the file."""
    data = random.Random(1).randbytes(8 * MiB)
    f = _file(os.path.join(shm_dir, "f"), data)
    loop = uvloop.new_event_loop()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    events = []
    pieces, expected = [], b""
    for i in range(8):
        head = b"reply %d:" % i
        pieces += [head, HostRead(f, i * MiB, MiB)]
        expected += head + data[i * MiB:(i + 1) * MiB]
    pieces += [b"tail:", HostRead(f, 8 * MiB - 100, 300)]
    expected += b"tail:" + data[-100:] + bytes(200)
    try:
        splicer = Splicer(loop, ours, 2 * MiB, lambda: events.append("full"),
                          lambda: events.append("room"), events.append)
        splicer.send(pieces)
        assert splicer.queue and splicer.unread()
        assert events == ["full"]
        got = bytearray()

        def take():
            try:
                got.extend(peer.recv(1 << 20))
            except BlockingIOError:
                pass
            if len(got) < len(expected):
                loop.call_soon(take)
            else:
                loop.stop()
        peer.setblocking(False)
        loop.call_soon(take)
        loop.run_forever()
        assert bytes(got) == expected
        assert events == ["full", "room"]
        assert not splicer.queue and not splicer.watching and not splicer.unread()
        splicer.close()
    finally:
        ours.close()
        peer.close()
        os.close(f.fd)
        loop.close()


@pytest.fixture
def shm_image(shm_dir):
    raw = os.path.join(shm_dir, "src.raw")
    model = random.Random(5).randbytes(16 * MiB)
    with open(raw, "wb") as f:
        f.write(model)
    path = os.path.join(shm_dir, "img.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
                   check=True)
    return path, raw, bytearray(model)


def test_served_reads_of_tmpfs_match_qemu_img(shm_image, serve):  # noqa: F811
    """Through the server on a unix socket: every byte as qemu-img sees the image, by
    one client and by nbdcopy over four connections (multi-conn)."""
    path, raw, _model = shm_image
    server = serve(path, "-f", "qcow2", "-e", "4")
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, server.uri],
                   check=True, capture_output=True)
    copy = os.path.join(os.path.dirname(path), "copy.raw")
    subprocess.run(["nbdcopy", "--connections=4", server.uri, copy], check=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, copy],
                   check=True, capture_output=True)


@pytest.mark.parametrize("structured", [True, False])
def test_a_write_waits_until_the_spliced_read_before_it_is_read(shm_image, serve,  # noqa: F811
                                                                structured):
    """READ then WRITE of the same range, pipelined, the client reading nothing until
    both are sent: the READ returns the old data (as if run one by one), though its
    reply's pages are the ones the WRITE rewrites in place, and the WRITE runs once the
    client has taken the READ's reply."""
    path, _raw, model = shm_image
    server = serve(path, "-f", "qcow2")
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(server.uri)
    rng = random.Random(9)
    try:
        for _ in range(8):
            offset = rng.randrange(0, len(model) // 4096) * 4096
            length = rng.choice([4096, 65536, 1 << 20])
            offset = min(offset, len(model) - length)
            new = rng.randbytes(length)
            buf = nbd.Buffer(length)
            read = h.aio_pread(buf, offset)
            write = h.aio_pwrite(new, offset)
            time.sleep(0.1)   # a write not held would have run by now
            while h.aio_in_flight():
                h.poll(-1)
            assert h.aio_command_completed(read) and h.aio_command_completed(write)
            assert buf.to_bytearray() == model[offset:offset + length]
            model[offset:offset + length] = new
            assert h.pread(length, offset) == model[offset:offset + length]
    finally:
        h.shutdown()


def test_a_client_that_does_not_read_holds_others_writes_only_briefly(shm_image, serve):  # noqa: F811
    """Connection A leaves a large spliced READ reply unread; B's write of the same range
    waits for it at most SPLICE_WAIT_S (their requests are concurrent: either outcome is
    A's to see), never for as long as A does not read. A's own write after that read
    still waits until A has taken it."""
    path, _raw, model = shm_image
    server = serve(path, "-f", "qcow2", "-e", "2")
    a = nbd.NBD()
    a.connect_uri(server.uri)
    b = nbd.NBD()
    b.connect_uri(server.uri)
    try:
        buf = nbd.Buffer(4 * MiB)
        a.aio_pread(buf, 0)   # more than the socket holds: part of it waits in the server
        time.sleep(0.2)
        t0 = time.monotonic()
        b.pwrite(b"x" * 4096, 0)
        assert time.monotonic() - t0 < 10
        assert b.pread(4096, 0) == b"x" * 4096
        # A's own write after its read still waits for A to take that reply.
        a.aio_pwrite(b"y" * 4096, 0)
        time.sleep(0.2)
        while a.aio_in_flight():
            a.poll(-1)
        assert buf.to_bytearray()[:4096] in (model[:4096], b"x" * 4096)
        assert buf.to_bytearray()[4096:] == model[4096:4 * MiB]
        assert a.pread(4096, 0) == b"y" * 4096
    finally:
        a.shutdown()
        b.shutdown()
