"""Edges of the io_uring read path (qnbd/nbd/uring.py) found by reviewing it: each test
failed on the code before its fix.

The reads here come from a pipe: a read of it stays in the ring until the test writes
the bytes, which is what a slow disk (a stalled NFS or iSCSI device) does to a read."""

import asyncio
import os
import select
import signal

import pytest

from qnbd import fileio
from qnbd.block.plan import HostRead
from qnbd.nbd.reads import ReadPool


class _PipeFile(fileio.File):
    """A file whose reads always miss the page cache (so they go to the ring) and which
    completes them only when the test writes into the pipe."""

    def read_cached(self, view, offset):
        return 0, False


@pytest.fixture
def pipe_file():
    r, w = os.pipe()
    f = _PipeFile("pipe", r, False)
    yield f, w
    os.close(w)
    f.close()


def test_shutdown_waits_for_the_ring_through_a_signal(pipe_file):
    f, w = pipe_file
    loop = asyncio.new_event_loop()
    old = signal.getsignal(signal.SIGALRM)
    pool = ReadPool(loop, workers=1, aio="io_uring")
    try:
        pieces = [HostRead(f, 0, 4096)]
        assert not pool.fill(pieces, object(), lambda error: None)
        loop.run_until_complete(asyncio.sleep(0.01))   # submitted; it waits for the pipe
        assert pool.ring.out
        # The signal arrives while shutdown waits; its handler lets the read complete,
        # as the disk eventually does.
        signal.signal(signal.SIGALRM, lambda *_: os.write(w, b"x" * 4096))
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        pool.shutdown()
        assert not pool.ring.out and pieces[0] == b"x" * 4096
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if pool.ring.out:   # close gave up: let the read end, then drain
            os.write(w, b"y" * 4096)
            pool.ring.close()
        loop.close()


def test_a_failing_completion_callback_loses_no_other_completion(pipe_file):
    f, w = pipe_file
    loop = asyncio.new_event_loop()
    pool = ReadPool(loop, workers=1, aio="io_uring")
    ring = pool.ring
    finished = []

    def finish(job, error):
        finished.append(job)
        if len(finished) == 1:
            raise RuntimeError("a bug in a reply callback")

    ring.finish = finish
    try:
        views = [memoryview(bytearray(100)) for _ in range(2)]
        assert ring.read_all([(f, views[0], 0)], "a")
        assert ring.read_all([(f, views[1], 0)], "b")
        ring._flush()
        os.write(w, b"z" * 200)   # both reads complete
        select.select([ring.efd], [], [], 5)
        with pytest.raises(RuntimeError):   # uvloop logs it and carries on
            ring._reap()
        loop.run_until_complete(asyncio.sleep(0.05))   # the loop would reap again
        assert sorted(finished) == ["a", "b"] and not ring.out
    finally:
        ring.out.clear()   # else close() below would wait forever if one was lost
        pool.shutdown()
        loop.close()


def test_cold_reads_in_waves_all_complete(tmp_path_factory):
    """Keep the ring full of cold reads of a 64 MiB file, as busy clients do: every
    read must complete with the file's bytes, none may stay in the ring for seconds."""
    import random
    import tempfile
    import time

    from qnbd.nbd.uring import OUT_MAX, Ring

    size = 64 << 20
    d = tempfile.mkdtemp(prefix="qnbd-uring-review-", dir="/var/tmp")
    path = os.path.join(d, "f")
    data = random.Random(5).randbytes(size)
    with open(path, "wb") as out:
        out.write(data)
    f = fileio.open_file(path, writable=False)
    os.fsync(f.fd)

    def evict():
        os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    evict()
    loop = asyncio.new_event_loop()
    rng = random.Random(1)
    reads = {}
    wrong = []

    def finish(job, error):
        view, offset = reads.pop(job)
        if error is not None or view != data[offset:offset + len(view)]:
            wrong.append(offset)

    ring = Ring(loop, finish)
    try:
        total, sent, progress = 2000, 0, (time.monotonic(), 0)
        while sent < total or reads:
            while sent < total and len(ring.out) < OUT_MAX:
                length = rng.choice([512, 4096, 12288, 65536, 100000])
                offset = rng.randrange(0, size - length)
                reads[sent] = (memoryview(bytearray(length)), offset)
                assert ring.read_all([(f, reads[sent][0], offset)], sent)
                sent += 1
                if sent % 500 == 0:
                    evict()   # the cache is shared with other images, other tenants
            loop.run_until_complete(asyncio.sleep(0.005))
            done = sent - len(reads)
            if done != progress[1]:
                progress = (time.monotonic(), done)
            assert time.monotonic() - progress[0] < 5, \
                f"{len(ring.out)} reads stuck in the ring after {done} completed"
        assert not wrong
    finally:
        ring.close()   # io_uring_wait_cqe runs the task work: this reaps them
        loop.close()
        f.close()
        import shutil
        shutil.rmtree(d, ignore_errors=True)
