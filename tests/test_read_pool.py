"""Reads off the event loop (docs/DESIGN.md, "I/O model"; qnbd/nbd/reads.py): page-cache
misses are read in worker threads and answered as they complete, with nothing a client
can see changed but the speed."""

import asyncio
import errno
import os
import random
import subprocess

import nbd
import pytest

from nbdserver import serve  # noqa: F401 (fixture)
from qnbd.block.plan import HostRead
from qnbd.nbd.reads import ReadPool

MiB = 1 << 20
SIZE = 16 * MiB


def evict(path):
    """Drop the file's pages from the page cache, so reads of it miss (RWF_NOWAIT fails)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def image(tmp_path):
    """A fully allocated qcow2 image with random data, on the disk (tmp_path), and that
    data as the model."""
    raw = tmp_path / "src.raw"
    data = bytearray(random.Random(7).randbytes(SIZE))
    raw.write_bytes(data)
    path = str(tmp_path / "img.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
                    "cluster_size=4096", str(raw), path], check=True)
    return path, data


@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_reads_writes_and_trims_keep_request_order_semantics(image, serve,  # noqa: F811
                                                                       structured):
    """Reads that miss go to the pool while writes, zeroes and trims are pipelined behind
    them: every read returns what the requests sent before it left there, exactly as if
    they had run one by one (a write waits for the reads out before it runs)."""
    path, model = image
    server = serve(path, "-f", "qcow2", "--discard", "unmap")
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(server.uri)
    rng = random.Random(3)
    for _round in range(6):
        evict(path)
        expected = []
        for _ in range(64):
            offset = rng.randrange(0, SIZE // 4096) * 4096
            length = rng.choice([512, 4096, 12288, 65536])
            length = min(length, SIZE - offset)
            kind = rng.random()
            if kind < 0.75:
                buf = nbd.Buffer(length)
                cookie = h.aio_pread(buf, offset)
                expected.append((cookie, buf, bytes(model[offset:offset + length])))
            elif kind < 0.9:
                data = rng.randbytes(length)
                h.aio_pwrite(data, offset)
                model[offset:offset + length] = data
            elif kind < 0.95:
                h.aio_zero(length, offset)
                model[offset:offset + length] = bytes(length)
            else:
                # Whole clusters (4 KiB) read as zeros after; partial ones keep their
                # data (discard is advisory). Offsets are cluster-aligned.
                h.aio_trim(length, offset)
                whole = length // 4096 * 4096
                model[offset:offset + whole] = bytes(whole)
        while h.aio_in_flight():
            h.poll(-1)
        for cookie, buf, want in expected:
            assert h.aio_command_completed(cookie)
            assert buf.to_bytearray() == want, f"read {cookie}"
        h.flush()
    # And the image holds what the model says, read back after the server's flush.
    h.shutdown()
    server.stop()
    out = path + ".out"
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, out], check=True)
    with open(out, "rb") as f:
        assert f.read() == bytes(model)


def test_pool_replies_never_land_inside_a_streamed_simple_reply(image, serve):  # noqa: F811
    """With simple replies a READ over STREAM_CHUNK sends one header, then its data over
    several loop turns: a reply completed by the pool meanwhile waits until it is done."""
    path, model = image
    server = serve(path, "-f", "qcow2")
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(server.uri)
    rng = random.Random(5)
    for _round in range(4):
        evict(path)
        expected = []
        for i in range(48):
            if i % 8 == 4:
                offset, length = rng.randrange(0, 4) * MiB, 12 * MiB
            else:
                offset, length = rng.randrange(0, SIZE // 4096) * 4096, 4096
            buf = nbd.Buffer(length)
            expected.append((h.aio_pread(buf, offset), buf, model[offset:offset + length]))
        while h.aio_in_flight():
            h.poll(-1)
        for cookie, buf, want in expected:
            assert h.aio_command_completed(cookie)
            assert buf.to_bytearray() == want
    h.shutdown()


class _File:
    """A file whose reads always miss the page cache; preadinto may fail."""

    nowait = True
    direct = False

    def __init__(self, data: bytes, fail: bool = False):
        self.data = data
        self.fail = fail

    def read_cached(self, view, offset):
        return 0, False

    def preadinto(self, view, offset):
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        n = max(0, min(len(view), len(self.data) - offset))
        view[:n] = self.data[offset:offset + n]
        return n


def test_pool_fills_misses_and_holds_writes_until_done():
    loop = asyncio.new_event_loop()
    try:
        pool = ReadPool(loop, workers=2)
        export = object()
        f = _File(b"abcdefgh")
        pieces = [b"hdr", HostRead(f, 2, 4), HostRead(f, 6, 4)]   # the second runs past EOF
        result = loop.create_future()
        assert not pool.fill(pieces, export, result.set_result)
        resumed = []

        def resume():
            # Until the held writes have had their turn, a miss is read inline.
            more = [HostRead(f, 0, 2)]
            resumed.append((pool.fill(more, export, None), more))

        assert not pool.may_mutate(export, resume)
        assert loop.run_until_complete(result) is None
        assert pieces == [b"hdr", bytearray(b"cdef"), bytearray(b"gh\0\0")]
        assert resumed == [(True, [bytearray(b"ab")])] and pool.may_mutate(export, None)
        loop.run_until_complete(asyncio.sleep(0))
        assert not pool.gate.exports
        assert pool.out_bytes == 0
        pool.shutdown()
    finally:
        loop.close()


def test_pool_failure_is_reported_and_memory_bound_reads_inline():
    loop = asyncio.new_event_loop()
    try:
        pool = ReadPool(loop, workers=1, max_out_bytes=8)
        bad = _File(b"x" * 64, fail=True)
        result = loop.create_future()
        assert not pool.fill([HostRead(bad, 0, 8)], object(), result.set_result)
        error = loop.run_until_complete(result)
        assert isinstance(error, OSError) and error.errno == errno.EIO
        # Past the byte budget a miss is read inline, blocking, as before the pool.
        pieces = [HostRead(_File(b"y" * 64), 0, 16)]
        assert pool.fill(pieces, object(), None)
        assert pieces == [bytearray(b"y" * 16)]
        pool.shutdown()
    finally:
        loop.close()


@pytest.mark.parametrize("nowait", [True, False])
def test_large_reads_go_to_a_thread_even_when_cached(tmp_path, nowait):
    """A read of THREAD_BYTES or more is copied in a worker thread (beside the loop), from
    a file that can tell a page-cache hit and from one that cannot (tmpfs); a smaller hit
    is read inline."""
    from qnbd import fileio
    from qnbd.nbd.reads import THREAD_BYTES

    path = tmp_path / "f"
    data = random.Random(5).randbytes(2 * THREAD_BYTES)
    path.write_bytes(data)
    f = fileio.open_file(str(path), writable=False)
    f.nowait = f.nowait and nowait
    loop = asyncio.new_event_loop()
    try:
        pool = ReadPool(loop, workers=1)
        small = [HostRead(f, 5, 4096)]
        assert pool.fill(small, object(), None) and small == [data[5:4101]]
        pieces = [b"hdr", HostRead(f, 7, THREAD_BYTES)]
        result = loop.create_future()
        assert not pool.fill(pieces, object(), result.set_result)
        assert loop.run_until_complete(result) is None
        assert pieces == [b"hdr", data[7:7 + THREAD_BYTES]]
        assert pool.threads.started and pool.out_bytes == 0
        pool.shutdown()
    finally:
        loop.close()
        f.close()


def test_transmission_plans_holds_writes_and_answers_failed_reads():
    """The sans-I/O side: with plans on, a READ's reply carries the engine's HostReads in
    place of its bytes; a write is held while may_mutate says no; a read whose HostReads
    failed is answered with an error chunk."""
    from qnbd.nbd import protocol as p
    from qnbd.nbd.transmission import Transmission
    from test_nbd_core import MemDevice, chunk_replies, compact, session

    f = _File(bytes(range(256)) * 64)

    class PlanDevice(MemDevice):
        def read_plan(self, offset, length):
            return [(length, HostRead(f, offset, length))]

    tx = Transmission(session(structured=True, device=PlanDevice()))
    tx.plans = True
    allowed = []
    tx.may_mutate = lambda: bool(allowed)
    tx.receive_data(compact(p.CMD_READ, 512, 1024, cookie=1)
                    + compact(p.CMD_WRITE, 0, 4, cookie=2, payload=b"abcd")
                    + compact(p.CMD_READ, 0, 4, cookie=3))
    pieces = tx.next_output()
    assert [x for x in pieces if isinstance(x, HostRead)][0].offset == 512
    assert tx.planned.cookie == 1
    assert tx.next_output() is None and not tx.finished    # the write is held
    allowed.append(1)
    assert chunk_replies(b"".join(tx.next_output()))[0][2] == 2
    tx.next_output()
    failed = tx.read_failed(tx.planned, OSError(5, "Input/output error"))
    (flags, rtype, cookie, _payload), = chunk_replies(b"".join(failed))
    assert cookie == 3 and rtype == p.REPLY_TYPE_ERROR and flags & p.REPLY_FLAG_DONE
