"""Reads that miss the page cache through io_uring (qnbd/nbd/uring.py; docs/DESIGN.md,
"I/O model"; issue 17), and `serve --aio`.

Images live on the disk (/var/tmp), never tmpfs: there a read cannot miss. Whether the
server's reads went through a ring is read from the kernel: /proc/PID/fdinfo of an
io_uring descriptor counts its completions (CqTail)."""

import asyncio
import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile

import nbd
import pytest

from nbdserver import Server, serve_cmd, short_tmpdir, wait_for_socket
from peers import as_qnbd, both, run
from qnbd import fileio
from qnbd.block.plan import HostRead
from qnbd.nbd.reads import ReadPool
from qnbd.nbd.uring import ENTRIES
from test_read_pool import evict

MiB = 1 << 20
SIZE = 16 * MiB
NOURING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nouring.py")


def ring_completions(pid: int) -> int | None:
    """Completions posted to the server's read ring (None: it has none). uvloop's libuv
    may have rings of its own; ours is the one with ENTRIES submission queue entries."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[io_uring]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:
            continue
        if int(info["SqMask"], 16) == ENTRIES - 1:
            return int(info["CqTail"])
    return None


def random_file(directory, seed: int, size: int):
    """A file of `size` random bytes: (its path, the bytes)."""
    path = os.path.join(directory, "f")
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


@pytest.fixture
def disk_dir():
    d = tempfile.mkdtemp(prefix="qnbd-uring-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def image(disk_dir):
    """A fully allocated qcow2 image of random data on the disk, its raw twin, the data."""
    raw = os.path.join(disk_dir, "src.raw")
    data = bytearray(random.Random(11).randbytes(SIZE))
    with open(raw, "wb") as f:
        f.write(data)
    path = os.path.join(disk_dir, "img.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, path)
    return path, raw, data


def start(path, *options, prefix=(), env=None) -> Server:
    sock = os.path.join(short_tmpdir(), "nbd.sock")
    server = Server(["-k", sock, "-t", *options, "-f", "qcow2", path], sock, prefix=prefix,
                    env=env)
    wait_for_socket(sock, server.proc)
    return server


def cold_reads(server, path, model, count=256, writes=False):
    """`count` random reads at queue depth 16 of an evicted image; with `writes`, every
    eighth request is a write of a range that reads before it also read (it must wait for
    them: they read the data from before it). Returns the model after."""
    evict(path)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    rng = random.Random(count)
    expected = []
    for i in range(count):
        while h.aio_in_flight() >= 16:
            h.poll(-1)
        offset = rng.randrange(0, SIZE // 4096 - 4) * 4096
        if writes and i % 8 == 7:
            offset = expected[-1][2]
            data = rng.randbytes(4096)
            h.aio_pwrite(data, offset)
            model[offset:offset + 4096] = data
            continue
        length = rng.choice([512, 4096, 12288])
        buf = nbd.Buffer(length)
        expected.append((h.aio_pread(buf, offset), buf, offset, bytes(model[offset:offset + length])))
    while h.aio_in_flight():
        h.poll(-1)
    for cookie, buf, offset, want in expected:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == want, f"read at {offset}"
    h.shutdown()
    return model


@pytest.mark.parametrize("aio", [[], ["--aio=io_uring"]], ids=["default", "io_uring"])
def test_cold_reads_through_the_ring(image, aio):
    """Reads of an evicted image go through the ring and return the image's bytes, as
    qemu-img reads them through the server."""
    path, raw, model = image
    server = start(path, *aio)
    try:
        cold_reads(server, path, model)
        assert ring_completions(server.proc.pid) >= 32   # the misses went through it
        evict(path)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, server.uri)
    finally:
        code, err = server.stop()
    assert code == 0 and err == ""


def test_writes_wait_for_reads_in_the_ring(image):
    """A WRITE pipelined behind reads of the same range in the ring waits for them: they
    return the data from before it, later reads the new data, and the image holds it."""
    path, raw, model = image
    server = start(path, "--aio=io_uring")
    try:
        for _ in range(3):
            model = cold_reads(server, path, model, count=128, writes=True)
        assert ring_completions(server.proc.pid) > 0
    finally:
        code, err = server.stop()
    assert code == 0 and err == ""
    out = path + ".out"
    run("qemu-img", "convert", "-O", "raw", path, out)
    with open(out, "rb") as f:
        assert f.read() == bytes(model)
    run("qemu-img", "check", path)


def test_shutdown_with_reads_in_the_ring(image):
    """SIGTERM while cold reads are out: the server answers or drops them, waits for the
    ring and exits cleanly (no buffer is freed under the kernel)."""
    path, _raw, model = image
    server = start(path, "--aio=io_uring")
    evict(path)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    rng = random.Random(4)
    for _ in range(64):
        h.aio_pread(nbd.Buffer(4096), rng.randrange(0, SIZE // 4096) * 4096)
    h.poll(0)
    code, err = server.stop()
    assert code == 0 and "Traceback" not in err


def _pool_fill(pool, pieces, loop):
    result = loop.create_future()
    if pool.fill(pieces, object(), result.set_result):
        return None
    return loop.run_until_complete(result)


def test_pool_ring_fills_misses_with_zeros_past_the_end(disk_dir):
    """ReadPool with a ring: misses of an evicted file go to it; the part of a read past
    the end of the file reads as zeros (the buffer's old bytes must not show)."""
    path, data = random_file(disk_dir, 2, 64 * 1024 + 100)
    f = fileio.open_file(path, writable=False)
    loop = asyncio.new_event_loop()
    try:
        pool = ReadPool(loop, workers=1, aio="io_uring")
        evict(path)
        pieces = [b"hdr", HostRead(f, 4096, 8192), HostRead(f, 64 * 1024, 4096)]
        assert _pool_fill(pool, pieces, loop) is None
        assert pieces == [b"hdr", data[4096:12288], data[64 * 1024:] + bytes(4096 - 100)]
        assert not pool.parked and not pool.threads.started and not pool.ring.out
        assert pool.out_bytes == 0 and not pool.gate.exports
        # A ring read that stops at the end of the file zeroes the rest of its buffer.
        done = []
        view = memoryview(bytearray(b"\xff" * 4096))
        assert pool.ring.read_all([(f, view, len(data) - 10)], "job")
        pool.ring.finish = lambda job, error: done.append((job, error))
        while not done:
            loop.run_until_complete(asyncio.sleep(0.001))
        assert done == [("job", None)] and bytes(view) == data[-10:] + bytes(4086)
        pool.shutdown()
    finally:
        loop.close()
        f.close()


class _MissingFile(fileio.File):
    """A file whose page-cache reads always miss, so every read goes to the ring."""

    def read_cached(self, view, offset):
        return 0, False


def test_pool_ring_reports_eio_to_the_request():
    """The kernel's EIO for a read in the ring (/proc/self/mem at an unmapped address)
    answers the request with that error; the pool's accounting is released."""
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    f = _MissingFile("/proc/self/mem", fd, False)
    loop = asyncio.new_event_loop()
    try:
        pool = ReadPool(loop, workers=1, aio="io_uring")
        error = _pool_fill(pool, [HostRead(f, 0, 4096)], loop)
        assert isinstance(error, OSError) and error.errno == errno.EIO
        assert pool.out_bytes == 0 and not pool.gate.exports and not pool.ring.out
        pool.shutdown()
    finally:
        loop.close()
        f.close()


def test_pool_shutdown_waits_for_the_ring(disk_dir):
    """shutdown right after misses went to the ring (not even submitted yet): it returns
    once the kernel has filled every buffer, and no reply is delivered after."""
    path, data = random_file(disk_dir, 3, 4 * MiB)
    f = fileio.open_file(path, writable=False)
    loop = asyncio.new_event_loop()
    try:
        pool = ReadPool(loop, workers=1, aio="io_uring")
        evict(path)
        offsets = random.Random(1).sample(range(0, 4 * MiB, 4096), 64)
        pieces = [HostRead(f, o, 4096) for o in offsets]
        delivered = []
        assert not pool.fill(pieces, object(), delivered.append)
        assert pool.ring.out
        pool.shutdown()
        assert not pool.ring.out and delivered == []
        assert pieces == [data[o:o + 4096] for o in offsets]
    finally:
        loop.close()
        f.close()


def test_ring_is_one_per_server_and_threads_has_none(image):
    path, _raw, model = image
    server = start(path, "--aio=threads")
    try:
        cold_reads(server, path, model, count=64)
        assert ring_completions(server.proc.pid) is None
    finally:
        server.stop()


# --- where io_uring cannot be set up ---

@pytest.mark.parametrize("error", [errno.EPERM, errno.ENOSYS])
def test_default_falls_back_silently_where_seccomp_refuses_io_uring(image, error):
    path, raw, model = image
    server = start(path, prefix=[sys.executable, NOURING, str(error)])
    try:
        cold_reads(server, path, model, count=64)
        assert ring_completions(server.proc.pid) is None
    finally:
        code, err = server.stop()
    assert code == 0 and err == ""


def test_aio_io_uring_where_seccomp_refuses_it_fails_at_start(image):
    """One line and exit status 1, in qemu's words (block/io_uring.c: "failed to init
    linux io_uring ring", with the reason as qemu 9 and later give it). qemu-nbd 7.2
    fails the same way; qemu-nbd 10 warns and falls back to its thread pool instead."""
    path = image[0]
    sock = os.path.join(short_tmpdir(), "s")
    args = ["-k", sock, "--aio=io_uring", "-f", "qcow2", path]
    ours = run(sys.executable, NOURING, "1", *serve_cmd(*args), check=False, timeout=30)
    assert ours.returncode == 1 and ours.stdout == ""
    assert ours.stderr == ("qnbd serve: Unable to use io_uring: failed to init linux "
                           "io_uring ring: Operation not permitted\n")
    try:
        qemu = run(sys.executable, NOURING, "1", "qemu-nbd", *args, check=False, timeout=3)
    except subprocess.TimeoutExpired:   # qemu-nbd 10: serving on its thread pool
        return
    prefix = f"qemu-nbd: Failed to blk_new_open '{path}': "
    assert qemu.returncode == 1 and qemu.stderr.startswith(prefix)
    assert ours.stderr.startswith(as_qnbd("qemu-nbd: " + qemu.stderr[len(prefix):].strip()))


def test_aio_io_uring_without_the_binding_fails_at_start(image, tmp_path):
    (tmp_path / "liburing.py").write_text("raise ImportError('blocked by the test')\n")
    sock = os.path.join(short_tmpdir(), "s")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    ours = run(*serve_cmd("-k", sock, "--aio=io_uring", "-f", "qcow2", image[0]),
               check=False, timeout=30, env=env)
    assert ours.returncode == 1 and ours.stderr == (
        "qnbd serve: Unable to use io_uring: the liburing module cannot be imported: "
        "blocked by the test\n")
    # The default quietly does without.
    server = start(image[0], env=env)
    assert server.stop() == (0, "")


def test_aio_native_needs_cache_direct_as_qemu_nbd(image):
    path = image[0]
    sock = os.path.join(short_tmpdir(), "s")
    qemu, ours = both("-k", sock, "--aio=native", "-f", "qcow2", path)
    assert qemu.returncode == ours.returncode == 1
    assert ours.stderr == as_qnbd(qemu.stderr.replace(f"Failed to blk_new_open '{path}': ", ""))
    # With O_DIRECT it serves (those reads go to worker threads).
    server = start(path, "--aio=native", "--cache=none")
    try:
        cold_reads(server, path, image[2], count=32)
    finally:
        assert server.stop() == (0, "")


class _CountingFile(fileio.File):
    tries = 0

    def read_cached(self, view, offset):
        self.tries += 1
        return super().read_cached(view, offset)


def test_after_a_miss_reads_go_to_the_ring_untried(disk_dir):
    """A miss sends the next RING_RUN reads straight to the ring (the failed RWF_NOWAIT
    try is what a cold read cost most); the one after is tried inline again."""
    from qnbd.nbd.reads import RING_RUN

    path, data = random_file(disk_dir, 6, 8 * MiB)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    f = _CountingFile(path, fd, False)
    loop = asyncio.new_event_loop()
    try:
        pool = ReadPool(loop, workers=1)
        evict(path)
        offsets = random.Random(8).sample(range(0, 8 * MiB, 4096), RING_RUN + 2)
        for n, offset in enumerate(offsets):
            pieces = [HostRead(f, offset, 4096)]
            assert _pool_fill(pool, pieces, loop) is None
            assert pieces == [data[offset:offset + 4096]]
            assert f.tries == (1 if n <= RING_RUN else 2), n
        assert ring_completions(os.getpid()) >= RING_RUN
        pool.shutdown()
    finally:
        loop.close()
        f.close()
