"""Payload buffers from a pool (issue 17, qnbd/nbd/buffers.py): large READ replies and
WRITE payloads reuse buffers that earlier requests are done with, never one that a
queued reply, the TLS layer or a worker thread still refers to, and the pool keeps a
bounded amount of memory."""

import os
import random
import subprocess
import time

import nbd
import pytest

from ctlutil import ControlClient, control_path
from nbdserver import serve  # noqa: F401 (fixture)
from peers import qemu_img, qemu_io
from qnbd.nbd.buffers import KEEP_BYTES, MIN_BYTES, Buffers
from tlsutil import make_pki

MiB = 1 << 20
SIZE = 64 * MiB
CHUNK = 256 << 10


# --- the pool alone ---


def test_a_buffer_still_referred_to_is_never_handed_out_again():
    pool = Buffers()
    first = pool.take(MiB)
    queued = memoryview(first)[5:]   # what uvloop keeps of a piece it could not send
    first_id = id(first)
    del first
    second = pool.take(MiB)
    assert id(second) != first_id and pool.reused == 0
    queued.release()
    third = pool.take(MiB)   # `first`, done with now
    assert id(third) == first_id and pool.reused == 1
    second_id = id(second)
    del second
    assert id(pool.take(MiB)) == second_id and pool.reused == 2
    assert len(pool.take(MIN_BYTES - 1)) == MIN_BYTES - 1   # small ones: not pooled
    assert pool.taken == 4


def test_buffers_a_stalled_client_holds_do_not_stop_reuse_of_the_others():
    """Eight buffers still queued for a client that stopped reading must not keep the
    others from reuse (the review of the pool: a busy buffer stayed in front of the
    idle ones, and the scan looked at the first eight only: 0 of 100 reused)."""
    pool = Buffers()
    stalled = [pool.take(MiB) for _ in range(8)]   # its unread 1 MiB replies
    for _ in range(100):   # another client's 1 MiB requests, one at a time
        pool.take(MiB)
    assert len(stalled) == 8
    assert pool.reused >= 95, (pool.reused, pool.kept)


def test_pool_keeps_a_bounded_amount():
    pool = Buffers(keep_bytes=8 * MiB)
    held = [pool.take(MiB) for _ in range(20)]   # all in use at once
    assert pool.kept == 8 * MiB and all(len(b) == MiB for b in held)
    del held
    for size in (MiB, 3 * MiB, 2 * MiB, MiB + 4096):   # a client changing request sizes
        for _ in range(10):
            pool.take(size)
        assert pool.kept <= 8 * MiB
    assert pool.reused >= 30
    pool.trim()
    assert pool.kept == 0


# --- through the server ---


@pytest.fixture
def image(tmp_path):
    """A fully allocated qcow2 image of random data and that data as the model."""
    data = bytearray(random.Random(5).randbytes(SIZE))
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    path = str(tmp_path / "img.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), path)
    return path, data


def pool_counts(path: str) -> dict:
    return ControlClient(path).call("metrics")["result"]["buffers"]


def check_written(path: str, model: bytearray, tmp_path) -> None:
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(expected),
                        path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_large_requests_reuse_buffers_and_memory_stays_bounded(image, serve,  # noqa: F811
                                                               tmp_path):
    """Many 1 MiB reads and writes, in turn and pipelined: the pool hands out buffers
    earlier requests were done with, keeps at most KEEP_BYTES, and nothing once the
    last client has gone."""
    path, model = image
    ctl = control_path()
    server = serve(path, "-f", "qcow2", "--control", ctl)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    rng = random.Random(1)
    for i in range(100):
        offset = rng.randrange(0, SIZE - MiB, 4096)
        if i % 2:
            data = rng.randbytes(MiB)
            h.pwrite(data, offset)
            model[offset:offset + MiB] = data
        else:
            assert h.pread(MiB, offset) == model[offset:offset + MiB]
    counts = pool_counts(ctl)
    assert counts["taken"] >= 100 and counts["reused"] >= counts["taken"] - 4, counts
    # Pipelined: 64 MiB of reads and 32 MiB of writes out at once.
    bufs = []
    for i in range(96):
        offset = (i % 64) * MiB
        if i < 64:
            buf = nbd.Buffer(MiB)
            bufs.append((offset, buf, h.aio_pread(buf, offset)))
        else:
            h.aio_pwrite(nbd.Buffer.from_bytearray(model[offset:offset + MiB]), offset)
    while h.aio_in_flight():
        h.poll(-1)
        assert pool_counts(ctl)["kept_bytes"] <= KEEP_BYTES
    for offset, buf, _cookie in bufs:
        assert buf.to_bytearray() == model[offset:offset + MiB]
    assert pool_counts(ctl)["kept_bytes"] <= KEEP_BYTES
    h.shutdown()
    deadline = time.monotonic() + 10
    while pool_counts(ctl)["kept_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool_counts(ctl)["kept_bytes"] == 0
    server.stop()
    check_written(path, model, tmp_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")), {"alice": "/CN=alice"})


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_queued_replies_keep_their_bytes_while_others_reuse_buffers(image, serve,  # noqa: F811
                                                                   tmp_path, pki, tls):
    """A client pipelines reads and writes and does not read its replies for a while,
    so they wait in the server's transport (or TLS layer); meanwhile another client's
    reads and writes of the same size take buffers from the pool. Every byte the slow
    client then reads is its own data, and every write landed."""
    path, model = image
    ctl = control_path()
    options = ["--tls-creds", pki["server"]] if tls else []
    server = serve(path, "-f", "qcow2", "-e", "2", "--control", ctl, *options)

    def client():
        h = nbd.NBD()
        if tls:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(pki["alice"])
        h.connect_uri(server.uri)
        return h

    slow, busy = client(), client()
    rng = random.Random(2)
    # The slow client: reads of [0, 16 MiB) with writes of [48, 64 MiB) between them.
    reads = []
    for i in range(64):
        offset = i * CHUNK
        buf = nbd.Buffer(CHUNK)
        slow.aio_pread(buf, offset)
        reads.append((offset, buf))
        if i % 4 == 0:
            woff = 48 * MiB + i * CHUNK
            data = rng.randbytes(CHUNK)
            slow.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), woff)
            model[woff:woff + CHUNK] = data
    time.sleep(0.5)   # its replies are made and queued, unread
    before = pool_counts(ctl)["reused"]
    # The busy client: reads of [16, 32 MiB), writes of [32, 48 MiB), in turn.
    for i in range(128):
        offset = 16 * MiB + (i % 64) * CHUNK
        assert busy.pread(CHUNK, offset) == model[offset:offset + CHUNK]
        woff = 32 * MiB + (i % 64) * CHUNK
        data = rng.randbytes(CHUNK)
        busy.pwrite(data, woff)
        model[woff:woff + CHUNK] = data
    assert pool_counts(ctl)["reused"] - before >= 128, "the busy client reused no buffers"
    while slow.aio_in_flight():
        slow.poll(-1)
    for offset, buf in reads:
        assert buf.to_bytearray() == model[offset:offset + CHUNK], f"read at {offset}"
    for h in (slow, busy):
        h.shutdown()
    server.stop()
    check_written(path, model, tmp_path)


def test_reused_buffer_reads_zeros_past_the_end_of_the_file(tmp_path, serve):  # noqa: F811
    """A data cluster cut short by the end of the file reads as zeros past it (as qemu
    reads it), not as what an earlier request left in a reused buffer: 1 MiB reads (in a
    worker thread) and 256 KiB ones (from the page cache on the loop)."""
    path = str(tmp_path / "short.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, str(4 * MiB))
    qemu_io(path, "qcow2", f"write -P 0x5a {2 * MiB} {MiB}",   # lands first
            f"write -P 0xc3 0 {MiB}")                        # last in the file
    os.truncate(path, os.path.getsize(path) - 96 * 1024)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, str(expected))
    model = expected.read_bytes()
    assert model[MiB - 1] == 0 and model[0] == 0xc3   # the cut is what is tested
    server = serve(path, "-f", "qcow2")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for _ in range(4):
        for size in (MiB, CHUNK):
            for offset in range(2 * MiB, 3 * MiB, size):   # buffers full of 0x5a
                assert h.pread(size, offset) == model[offset:offset + size]
            offset = MiB - size
            assert h.pread(size, offset) == model[offset:MiB]
    h.shutdown()
