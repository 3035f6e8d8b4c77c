"""Writes off the event loop (docs/DESIGN.md, "I/O model"; qnbd/block/plan.py write plans,
qnbd/nbd/writes.py): a large WRITE's data is written in a worker thread and mapped only
once it is there; nothing that must see it overtakes it, and a failed one maps nothing."""

import asyncio
import errno
import json
import os
import random
import struct
import tempfile
import threading
import time

import nbd
import pytest

from inprocess import close_pooled, pooled_connections, read_request
from nbdserver import RawClient, serve  # noqa: F401 (fixture)
from peers import check_clean, qemu_img, qemu_io, run
from qnbd import fileio
from qnbd.block.plan import HostWrite
from qnbd.block.storage import Storage
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from qnbd.nbd.reads import THREAD_BYTES
from qnbd.nbd.writes import PLAN_BYTES, WritePool

KiB = 1024
MiB = 1 << 20


def request(cmd, cookie, offset=0, length=0, payload=b""):
    if payload:
        length = len(payload)
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload


def replies(raw: bytes, read_lengths: dict) -> list:
    """Simple replies as (cookie, error, data), in the order they were sent."""
    out, pos = [], 0
    while pos < len(raw):
        magic, error, cookie = struct.unpack_from(">IIQ", raw, pos)
        assert magic == p.SIMPLE_REPLY_MAGIC
        pos += 16
        n = read_lengths.get(cookie, 0) if not error else 0
        out.append((cookie, error, bytes(raw[pos:pos + n])))
        pos += n
    return out


def spin(loop, seconds: float) -> None:
    """Let the loop run for a while (the test then checks what did not happen)."""
    loop.run_until_complete(asyncio.sleep(seconds))


def wait(loop, until):
    """Run the loop until `until()` holds (at most 10 s)."""
    deadline = time.monotonic() + 10
    while not until():
        assert time.monotonic() < deadline, "timed out"
        loop.run_until_complete(asyncio.sleep(0.005))


@pytest.fixture
def image(tmp_path):
    """A 4 MiB qcow2 image (64 KiB clusters) with a pattern in its first MiB."""
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "qcow2", "write -P 0x11 0 1M")
    return path


@pytest.fixture
def held_writes(monkeypatch):
    """HostWrites wait for `release.set()` before they write."""
    release = threading.Event()
    real = HostWrite.perform

    def perform(self):
        assert release.wait(10)
        real(self)

    monkeypatch.setattr(HostWrite, "perform", perform)
    return release


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def allocated(export, offset, length) -> bool:
    return any(e.data or e.host_offset is not None
               for e in export.device.layer_status(offset, length))


def test_flush_and_reads_wait_for_the_writes_before_them(image, loop, held_writes):
    """Two connections of one export: a large WRITE from each goes out at once (they
    touch different clusters); a FLUSH and a READ behind them are answered only after
    both completed, and until then no L2 entry maps the new data (rule 4)."""
    export = Export.open(ExportConfig(image=image, format="qcow2"))
    (a, b), server = pooled_connections(loop, export, 2)
    try:
        one, two = random.randbytes(MiB), random.randbytes(256 * KiB)
        a.data_received(request(p.CMD_WRITE, 1, 2 * MiB, payload=one))
        b.data_received(request(p.CMD_WRITE, 4, 1 * MiB, payload=two)
                        + request(p.CMD_FLUSH, 5))
        a.data_received(request(p.CMD_FLUSH, 2) + read_request(3, 2 * MiB + 4096, 8192))
        spin(loop, 0.2)
        assert len(server.writes.gate.exports[export].out) == 2
        assert not a.transport.data and not b.transport.data
        assert not allocated(export, 1 * MiB, 2 * MiB)   # nothing mapped yet
        held_writes.set()
        wait(loop, lambda: len(a.transport.data) == 3 * 16 + 8192
             and len(b.transport.data) == 2 * 16)
        got = replies(a.transport.data, {3: 8192})
        assert [c for c, _e, _d in got] == [1, 2, 3]   # the flush after the write's reply
        assert all(e == 0 for _c, e, _d in got)
        assert got[2][2] == one[4096:4096 + 8192]
        assert [c for c, _e, _d in replies(b.transport.data, {})] == [4, 5]
        assert not server.writes.gate.exports and server.writes.out_bytes == 0
    finally:
        close_pooled(server, export)
    qemu_img("check", image)
    out = qemu_io(image, "qcow2", "read -P 0x11 0 1M", "read -P 0 3M 1M").stdout
    assert "verification failed" not in out


def test_a_refused_request_waits_for_no_write_out(image, loop, held_writes):
    """A READ past the end of the export is refused by its checks: it touches no data,
    so its error comes back while the write before it is still out (a valid READ would
    wait for it)."""
    export = Export.open(ExportConfig(image=image, format="qcow2"))
    (a,), server = pooled_connections(loop, export)
    try:
        a.data_received(request(p.CMD_WRITE, 1, 2 * MiB, payload=bytes(MiB))
                        + read_request(2, 4 * MiB, 4096))
        wait(loop, lambda: len(a.transport.data) == 16)
        (cookie, error, _), = replies(a.transport.data, {})
        assert (cookie, error) == (2, p.EINVAL)
        assert server.writes.gate.exports[export].out   # the first is still out
        held_writes.set()
        wait(loop, lambda: len(a.transport.data) == 32)
        assert [e for _c, e, _d in replies(a.transport.data, {})] == [p.EINVAL, 0]
    finally:
        close_pooled(server, export)


def test_overlapping_writes_wait_and_disjoint_ones_do_not(image, loop, held_writes):
    """A WRITE touching a cluster of a write still out waits for it; one that touches
    none goes out beside it, or runs inline when small; the result is the requests' in
    order (64 KiB clusters)."""
    export = Export.open(ExportConfig(image=image, format="qcow2"))
    (a, b, c), server = pooled_connections(loop, export, 3)
    model = bytearray(b"\x11" * MiB + bytes(3 * MiB))
    try:
        first = random.randbytes(256 * KiB)                 # clusters 0-3
        a.data_received(request(p.CMD_WRITE, 1, 0, payload=first))
        model[0:256 * KiB] = first
        spin(loop, 0.1)
        small = random.randbytes(4 * KiB)                   # cluster 4: inline, at once
        b.data_received(request(p.CMD_WRITE, 2, 260 * KiB, payload=small))
        model[260 * KiB:264 * KiB] = small
        wait(loop, lambda: len(b.transport.data) == 16)
        far = random.randbytes(128 * KiB)                   # cluster 32+: out beside
        c.data_received(request(p.CMD_WRITE, 4, 2 * MiB, payload=far))
        model[2 * MiB:2 * MiB + 128 * KiB] = far
        over = random.randbytes(128 * KiB)                  # clusters 3-5: waits
        b.data_received(request(p.CMD_WRITE, 3, 200 * KiB, payload=over))
        model[200 * KiB:328 * KiB] = over
        spin(loop, 0.2)
        state = server.writes.gate.exports[export]
        assert len(state.out) == 2 and state.waiters
        assert len(b.transport.data) == 16 and not a.transport.data
        held_writes.set()
        wait(loop, lambda: len(a.transport.data) == 16 and len(b.transport.data) == 32
             and len(c.transport.data) == 16)
        for conn in (a, b, c):
            assert all(e == 0 for _c, e, _d in replies(conn.transport.data, {}))
        assert export.read(0, 4 * MiB) == model
    finally:
        close_pooled(server, export)
    qemu_img("check", image)


def test_failed_data_write_answers_eio_and_maps_nothing(image, loop, monkeypatch):
    """A HostWrite that fails: the WRITE answers EIO, no L2 entry maps the range, the
    clusters allocated for it are released at the next flush (qemu-img check: no leak),
    and the export goes on working."""
    real = HostWrite.perform
    failing = [True]

    def perform(self):
        if failing[0]:
            raise OSError(errno.EIO, "injected")
        real(self)

    monkeypatch.setattr(HostWrite, "perform", perform)
    export = Export.open(ExportConfig(image=image, format="qcow2"))
    (a,), server = pooled_connections(loop, export)
    try:
        # Unaligned, across clusters past the end of the file: partial clusters too.
        a.data_received(request(p.CMD_WRITE, 1, 2 * MiB + 1000, payload=b"\x77" * 300 * KiB))
        wait(loop, lambda: len(a.transport.data) == 16)
        (cookie, error, _),  = replies(a.transport.data, {})
        assert (cookie, error) == (1, p.EIO)
        assert not allocated(export, 2 * MiB, MiB)
        failing[0] = False
        a.data_received(request(p.CMD_WRITE, 2, 3 * MiB, payload=b"\x66" * 256 * KiB)
                        + request(p.CMD_FLUSH, 3))
        wait(loop, lambda: len(a.transport.data) == 48)
        assert [e for _c, e, _d in replies(a.transport.data, {})] == [p.EIO, 0, 0]
    finally:
        close_pooled(server, export)
    check_clean(image)
    mapped = json.loads(qemu_img("map", "--output=json", image).stdout)
    assert not any(m["data"] for m in mapped if m["start"] < 3 * MiB
                   and m["start"] + m["length"] > 2 * MiB)
    out = qemu_io(image, "qcow2", "read -P 0x66 3M 256k", "read -P 0 2M 1M").stdout
    assert "verification failed" not in out


def test_write_waits_for_a_read_out_and_a_read_for_a_write_out(image, loop, monkeypatch,
                                                               held_writes):
    """A large READ in a worker thread holds a WRITE of the export until it has its bytes
    (the old ones); a READ arriving while a WRITE is out is answered after it (the new
    ones)."""
    release_read = threading.Event()
    real = fileio.File.preadinto

    def preadinto(self, buf, offset):
        if threading.current_thread() is not threading.main_thread():
            assert release_read.wait(10)
        return real(self, buf, offset)

    monkeypatch.setattr(fileio.File, "preadinto", preadinto)
    export = Export.open(ExportConfig(image=image, format="qcow2"))
    (a, b), server = pooled_connections(loop, export, 2)
    new = random.randbytes(THREAD_BYTES)
    try:
        a.data_received(read_request(1, 0, THREAD_BYTES))
        spin(loop, 0.1)
        b.data_received(request(p.CMD_WRITE, 2, 0, payload=new))
        spin(loop, 0.2)
        assert not a.transport.data and not b.transport.data
        assert not server.writes.gate.exports   # held before it was planned
        release_read.set()
        held_writes.set()
        wait(loop, lambda: a.transport.data and b.transport.data)
        assert replies(a.transport.data, {1: THREAD_BYTES}) == [(1, 0, b"\x11" * THREAD_BYTES)]
        assert replies(b.transport.data, {}) == [(2, 0, b"")]
        # Now the other way round.
        held_writes.clear()
        newer = random.randbytes(THREAD_BYTES)
        b.data_received(request(p.CMD_WRITE, 3, 0, payload=newer))
        spin(loop, 0.1)
        assert server.writes.gate.exports[export].out
        a.data_received(read_request(4, 4096, 4096))
        spin(loop, 0.2)
        assert len(a.transport.data) == 16 + THREAD_BYTES   # nothing more yet
        held_writes.set()
        wait(loop, lambda: len(a.transport.data) == 2 * 16 + THREAD_BYTES + 4096)
        assert replies(a.transport.data, {1: THREAD_BYTES, 4: 4096})[1] == \
            (4, 0, newer[4096:8192])
    finally:
        held_writes.set()
        close_pooled(server, export)


def test_pool_bounds_the_bytes_out_and_small_writes_stay_inline():
    pool = WritePool(None, max_out_bytes=MiB)
    export = object()
    assert not pool.may_plan(export, PLAN_BYTES - 1)
    assert pool.may_plan(export, PLAN_BYTES) and pool.may_plan(export, MiB)
    pool.out_bytes = MiB - PLAN_BYTES + 1
    assert not pool.may_plan(export, PLAN_BYTES)


def _stripes(conn_index: int, count: int, size: int, stripe: int):
    return [s for s in range(size // stripe) if s % count == conn_index]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_multi_conn_large_writes_with_reads_flushes_zeroes(tmp_path, serve, fmt):  # noqa: F811
    """Three libnbd connections of a multi-conn export pipeline large writes, reads,
    zeroes and flushes, each over its own 512 KiB stripes of the disk; with 1 MiB
    clusters two connections share every cluster, so their writes must wait for each
    other's. Each read returns what its connection's requests before it left; at the end
    qemu-img compare finds the model and qemu-img check no error."""
    size, stripe, count = 32 * MiB, 512 * KiB, 3
    path = str(tmp_path / f"img.{fmt}")
    opts = ["-o", "cluster_size=1M"] if fmt == "qcow2" else []
    qemu_img("create", "-q", "-f", fmt, *opts, path, str(size))
    server = serve(path, "-f", fmt, "-e", str(count))
    model = bytearray(size)
    handles = []
    rng = random.Random(17)
    expected = []
    for k in range(count):
        h = nbd.NBD()
        h.connect_uri(server.uri)
        handles.append((h, _stripes(k, count, size, stripe)))
    for _round in range(3):
        for _ in range(40):
            for h, stripes in handles:
                base = rng.choice(stripes) * stripe
                off = base + rng.randrange(0, stripe // 4096) * 4096
                n = min(rng.choice([128 * KiB, 256 * KiB, 512 * KiB, 4 * KiB]),
                        base + stripe - off)
                kind = rng.random()
                if kind < 0.55:
                    data = rng.randbytes(n)
                    h.aio_pwrite(data, off)
                    model[off:off + n] = data
                elif kind < 0.8:
                    buf = nbd.Buffer(n)
                    expected.append((h, h.aio_pread(buf, off), buf, bytes(model[off:off + n])))
                elif kind < 0.92:
                    h.aio_zero(n, off)
                    model[off:off + n] = bytes(n)
                else:
                    h.aio_flush()
        for h, _stripes_ in handles:
            while h.aio_in_flight():
                h.poll(-1)
        for h, cookie, buf, want in expected:
            assert buf.to_bytearray() == want, f"read {cookie} saw other data"
        expected.clear()
    for h, _ in handles:
        h.flush()
        h.shutdown()
    rc, err = server.stop()
    assert rc == 0, err
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    cmp = run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), path, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    if fmt == "qcow2":
        qemu_img("check", path)


def control_connection(server, answer):
    """A control-socket connection in process on `server`'s pools: `answer(line)` stands
    for the service's handling of each command line."""
    from types import SimpleNamespace

    from qnbd.control.service import ControlConnection

    service = SimpleNamespace(writes=server.writes, answer=answer, clients=set())
    control = ControlConnection(service)
    control.transport = SimpleNamespace(is_closing=lambda: False, write=lambda data: None,
                                        pause_reading=lambda: None,
                                        resume_reading=lambda: None)
    return control


def test_control_commands_wait_for_the_writes_out(image, loop, held_writes):
    """A control-socket command (a checkpoint splits the bitmaps there) runs only once
    no write is out: it sees every write sent before it completed."""
    export = Export.open(ExportConfig(image=image, format="qcow2"))
    (a,), server = pooled_connections(loop, export)
    seen = []

    def answer(line):
        seen.append((line, allocated(export, 2 * MiB, 256 * KiB)))
        return b"{}\n"

    control = control_connection(server, answer)
    try:
        a.data_received(request(p.CMD_WRITE, 1, 2 * MiB, payload=b"\x55" * 256 * KiB))
        spin(loop, 0.1)
        control.data_received(b'{"command": "checkpoint"}\n')
        spin(loop, 0.2)
        assert not seen
        held_writes.set()
        wait(loop, lambda: seen)
        assert seen == [(b'{"command": "checkpoint"}', True)]
    finally:
        close_pooled(server, export)


def test_shutdown_waits_for_the_writes_out_and_commits_them(image, loop, held_writes):
    """Shutdown (before the images close) waits for a write still out and installs its
    mapping: what the client sent is in the image, though nobody takes the reply."""
    export = Export.open(ExportConfig(image=image, format="qcow2"))
    (a,), server = pooled_connections(loop, export)
    data = random.randbytes(256 * KiB)
    try:
        a.data_received(request(p.CMD_WRITE, 1, 2 * MiB, payload=data))
        spin(loop, 0.1)
        assert server.writes.gate.exports and not allocated(export, 2 * MiB, len(data))
        threading.Timer(0.2, held_writes.set).start()
        server.writes.shutdown()
        assert not server.writes.gate.exports and allocated(export, 2 * MiB, len(data))
        assert not a.transport.data
    finally:
        held_writes.set()
        close_pooled(server, export)
    qemu_img("check", image)
    assert qemu_io(image, "qcow2", "read -v 2M 16").stdout.split(":")[1].split()[:16] == \
        [f"{b:02x}" for b in data[:16]]


def test_writes_never_wait_for_the_client_to_read(request, serve):  # noqa: F811
    """A client that sends a READ and then 16 MiB of WRITEs before reading any reply
    (legal: NBD replies may be read at any time) gets every reply. A write that waited
    for the client to take earlier replies (as the reverted zero-copy replies did, to
    keep spliced pages unchanged) deadlocks here: the server stops reading, the client
    stops in send. The writes go through the pool (1 MiB >= PLAN_BYTES). The image is
    on tmpfs where there is one: that design spliced only memory-backed files."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = tempfile.TemporaryDirectory(dir=shm)
    request.addfinalizer(work.cleanup)
    path = os.path.join(work.name, "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, str(64 * MiB))
    qemu_io(path, "qcow2", "write -P 7 0 1M")
    server = serve(path, "-f", "qcow2")
    c = RawClient(server.sock, timeout=30)
    c.go()
    count = 16

    def send():
        c.request(p.CMD_READ, 0, 1 * MiB, cookie=100)
        for i in range(count):
            c.request(p.CMD_WRITE, (4 + i) * MiB, MiB, cookie=i, payload=bytes([i]) * MiB)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(20)
    assert not sender.is_alive(), "the client could not send its writes: the server waits"
    assert c.simple_reply() == (0, 100) and c.recv(MiB) == b"\x07" * MiB
    assert sorted(c.simple_reply() for _ in range(count)) == [(0, i) for i in range(count)]
    for i in (0, count - 1):
        c.request(p.CMD_READ, (4 + i) * MiB, MiB, cookie=200 + i)
        assert c.simple_reply() == (0, 200 + i) and c.recv(MiB) == bytes([i]) * MiB
    c.close()


def test_storage_size_counts_a_write_only_while_it_is_out(tmp_path):
    """While a planned write is out the file is as long as its end for everyone on the
    loop (nothing allocates over it); once it failed, and no other is out, the file's
    own size holds again."""
    path = tmp_path / "f"
    path.write_bytes(b"\1" * 4096)
    storage = Storage(fileio.open_file(str(path), writable=True))
    try:
        storage.plan_opened()
        storage.plan_opened()
        storage.planned(8192, 4096)
        storage.planned(16384, 4096)
        assert storage.size() == 20480
        storage.landed(False)      # the other is still out
        assert storage.size() == 20480
        storage.landed(False)
        assert storage.size() == 4096
    finally:
        storage.file.close()
