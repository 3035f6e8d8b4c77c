"""Performing read plans off the event loop (docs/DESIGN.md, "I/O model").

The transmission core answers a READ with reply pieces in which the engine's HostReads
(qnbd/block/plan.py) stand in for their bytes. `ReadPool.fill` reads each one inline with
preadv2(RWF_NOWAIT): a page-cache hit costs what it always did and the reply goes out in
this turn. A miss parks its reply; the reply is written when its reads complete (NBD lets
replies leave in any order). The RWF_NOWAIT attempt has already started the disk read,
so parked reads are retried on the loop (every millisecond and whenever a connection has
work) rather than handed to a thread each: measured on a cold 4 KiB random read load,
a thread per miss cost ~90 us of CPU a read (futex wake-ups, GIL hand-offs) against
~30 us retried on the loop, and ~44 us reading inline at queue depth 1. A read still
missing after MAX_RETRIES ticks is waited for by a small pool of worker threads
(os.preadv releases the GIL): the kernel may have declined to start it. Where the server
has an io_uring (uring.py: by default, and with --aio=io_uring), a miss goes to the ring
instead of being parked: the kernel completes it and the loop hears of it through an
eventfd, with neither retries nor threads.

What keeps it safe:
- A HostRead names a host cluster the mapping found. It stays that cluster's data only
  while no write, zero or discard runs on the export (a discard may free the cluster and
  a later write reuse it), so those wait while reads of their export are out
  (`may_mutate`), and while one waits no new read leaves the loop (it cannot starve).
- Memory is bounded: at most MAX_OUT_BYTES of reads are out at once; past that a miss is
  read inline, blocking, as before. Each buffer belongs to its reply until sent (and
  is reused only once nothing refers to it: buffers.py).
- `shutdown` waits for the reads still out (the ring's too) before the images are closed.
"""

from ..block.plan import HostRead
from .buffers import Buffers
from .uring import open_ring
from .workers import Gate, Held, Workers

WORKERS = 16
MAX_OUT_BYTES = 16 << 20
# A miss parks its reply: the RWF_NOWAIT attempt has already started the disk read
# (filemap_get_pages issues the readahead before it answers EAGAIN), so retrying it on the
# loop, every RETRY_S and when a connection has work (at most every POLL_GAP_S), finds
# the data once it has arrived, without a thread switch per read. After MAX_RETRIES a worker thread waits for
# it instead (the kernel may have declined to start the read, e.g. under memory pressure).
# 1 ms: uvloop's timers count whole milliseconds (a shorter delay would poll every loop
# iteration, burning a shared core).
RETRY_S = 0.001
MAX_RETRIES = 20
POLL_GAP_S = 0.0002
# A read this large goes to a worker thread at once, cached or not: copying it is work
# enough to be worth a hand-off, and done there it runs beside the loop, on the other
# core, while the loop sends replies (1 MiB reads: 414 MiB/s threaded, 307 inline). So
# does every read of an O_DIRECT file (there is no page cache to retry). Not 256 KiB
# ones (nbdcopy's): the hand-off (a futex wake-up to post the job, one to return it)
# costs about what their copy does, and a 4-connection copy leaves no core free for
# the thread: 2246 us of server CPU per MiB inline against 3359 threaded (bench-cpu,
# same rate; buffers branch, bench/RESULTS.md).
THREAD_BYTES = 512 << 10
# With a ring, after a miss the next RING_RUN reads go to it without the RWF_NOWAIT try
# (the ring tries the page cache itself before it waits): misses come in runs, and a
# miss tried first cost ~35 us more CPU a read than one sent straight to the ring
# (cold 4 KiB reads at QD16: the failed preadv2 starts the disk read, the ring's read
# finds it again). One read in RING_RUN + 1 is still tried inline, to see the cache warm.
RING_RUN = 32


class ReadPool:
    def __init__(self, loop, workers: int = WORKERS, max_out_bytes: int = MAX_OUT_BYTES,
                 buffers: Buffers | None = None, aio: str | None = None):
        self.loop = loop
        self.max_out_bytes = max_out_bytes
        self.buffers = buffers if buffers is not None else Buffers()   # the replies' data
        self.out_bytes = 0
        self.threads = Workers(loop, workers, "read", _read_job, self._read_done)
        self.closed = False
        self.parked: list = []   # [missing, export, state, size, done, retries]
        # Exports whose files cannot tell a miss (no RWF_NOWAIT: tmpfs): their small
        # reads gain nothing from plans, so connections plan only reads of THREAD_BYTES.
        self.inline: set = set()
        self.timer = None
        self.polled = 0.0   # loop time of the last retry of the parked reads
        self.gate = Gate(loop, int)   # per export: how many replies have reads out
        # --aio (serve_values.AIO_MODES): None is the default. RingUnavailable when
        # io_uring was asked for and cannot be had.
        self.ring = open_ring(loop, self._ring_done, aio)
        self.ring_run = 0   # reads left to send to the ring untried (RING_RUN)

    def may_mutate(self, export, resume) -> bool:
        """Whether a write, zero or discard may run on `export` now; if not, `resume` is
        called once the reads out on it have completed."""
        state = self.gate.get(export)
        if state is None or not state.out:
            return True
        state.waiters.append(resume)
        return False

    def fill(self, pieces: list, export, done) -> bool:
        """Put the bytes of every HostRead in `pieces` in its place. True when that is
        done here; False when some went to the pool: `done(error)` is then called on the
        loop once they are in place (error None) or have failed."""
        missing = []
        size = 0
        threaded = False
        for i, piece in enumerate(pieces):
            if piece.__class__ is not HostRead:
                continue
            file = piece.file
            read_cached = getattr(file, "read_cached", None)
            big = piece.length >= THREAD_BYTES
            if read_cached is None or not (file.nowait or big):
                if read_cached is not None:
                    self.inline.add(export)
                # Where no read can be told not to block (tmpfs answers EOPNOTSUPP; the
                # tests' file seams): blocking, as before, into the bytes object pread
                # makes (the transport may keep it unsent as long as it needs).
                data = file.pread(piece.length, piece.offset)
                if len(data) < piece.length:   # past the end of the file: zeros
                    data += bytes(piece.length - len(data))
                pieces[i] = data
                continue
            buf = self.buffers.take(piece.length)   # filled whole below (zeros past EOF)
            view = memoryview(buf)
            pieces[i] = buf
            if big or file.direct:
                missing.append((file, view, piece.offset))
                size += piece.length
                threaded = True
                continue
            if self.ring_run:
                self.ring_run -= 1
                missing.append((file, view, piece.offset))
                size += piece.length
                continue
            got, complete = read_cached(view, piece.offset)
            if not complete:
                if self.ring is not None:
                    self.ring_run = RING_RUN
                missing.append((file, view[got:], piece.offset + got))
                size += len(buf) - got
        if not missing:
            return True
        if (self.closed or not self.gate.open(export)
                or self.out_bytes + size > self.max_out_bytes):
            # Blocking, as before the pool: memory stays bounded, a waiting write runs.
            for file, view, offset in missing:
                file.preadinto(view, offset)
            return True
        state = self.gate.held(export)
        state.out += 1
        self.out_bytes += size
        if threaded:
            self.threads.submit((missing, export, state, size, done))
            return False
        if self.ring is not None and self.ring.read_all(
                missing, [len(missing), None, export, state, size, done]):
            return False
        self.parked.append([missing, export, state, size, done, 0])
        if self.timer is None:
            self.timer = self.loop.call_later(RETRY_S, self._tick)
        return False

    def _tick(self) -> None:
        self.timer = None
        self.poll(tick=True)
        if self.parked and self.timer is None:
            self.timer = self.loop.call_later(RETRY_S, self._tick)

    def poll(self, tick: bool = False) -> None:
        """Retry the parked reads; reply for those whose data has arrived. Only the
        timer's retries count towards MAX_RETRIES (a busy loop polls far more often).
        A connection's turn retries them only POLL_GAP_S after the last retry: each one
        is a syscall, and retrying every parked read on every incoming request cost more
        CPU than the reads (py-spy, cold 4 KiB reads at QD16)."""
        if not self.parked:
            return
        now = self.loop.time()
        if not tick and now - self.polled < POLL_GAP_S:
            return
        self.polled = now
        parked, self.parked = self.parked, []
        finished = []
        for job in parked:
            rest = []
            error = None
            try:
                for file, view, offset in job[0]:
                    got, complete = file.read_cached(view, offset)
                    if not complete:
                        rest.append((file, view[got:], offset + got))
            except Exception as e:   # reported to the request
                rest, error = [], e
            if not rest:
                finished.append((job, error))
                continue
            job[0] = rest
            job[5] += tick
            if job[5] > MAX_RETRIES:
                self.threads.submit(tuple(job[:5]))
            else:
                self.parked.append(job)
        for (_missing, export, state, size, done, _n), error in finished:
            self._finish(export, state, size, done, error)

    def _ring_done(self, job, error) -> None:
        """One read of a job in the ring completed: [reads left, first error, export,
        state, size, done]."""
        job[0] -= 1
        if job[1] is None:
            job[1] = error
        if not job[0]:
            _n, error, export, state, size, done = job
            self._finish(export, state, size, done, error)

    def _read_done(self, job, error) -> None:
        _missing, export, state, size, done = job
        self._finish(export, state, size, done, error)

    def _finish(self, export, state: Held, size: int, done, error) -> None:
        self.out_bytes -= size
        state.out -= 1
        self.gate.settle(export, state)
        done(error)

    def shutdown(self) -> None:
        """Wait for every read still out (before the images close)."""
        self.closed = True
        if self.ring is not None:
            self.ring.close()   # the kernel writes into no buffer after this
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.parked = []   # nobody awaits their replies any more; no thread reads them
        self.threads.stop()   # nor the results of those done meanwhile


def _read_job(job) -> None:
    """In a worker thread: blocking reads (short only at end of file, where the buffer
    keeps its zeros); os.preadv releases the GIL while it waits."""
    for file, view, offset in job[0]:
        file.preadinto(view, offset)
