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
(os.preadv releases the GIL): the kernel may have declined to start it.

What keeps it safe:
- A HostRead names a host cluster the mapping found. It stays that cluster's data only
  while no write, zero or discard runs on the export (a discard may free the cluster and
  a later write reuse it), so those wait while reads of their export are out
  (`may_mutate`), and while one waits no new read leaves the loop (it cannot starve).
- Memory is bounded: at most MAX_OUT_BYTES of reads are out at once; past that a miss is
  read inline, blocking, as before. Each buffer belongs to its reply until sent.
- `shutdown` waits for the reads still out before the images are closed.
"""

import collections
import queue
import threading

from ..block.plan import HostRead

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
# How long a write waits for other connections' clients to read spliced replies.
SPLICE_WAIT_S = 1.0
# A read this large goes to a worker thread at once, cached or not: copying it is work
# enough to be worth a hand-off, and done there it runs beside the loop, on the other
# core, while the loop sends replies (multi-connection copies, 1 MiB reads). So does
# every read of an O_DIRECT file (there is no page cache to retry).
THREAD_BYTES = 128 << 10


class _Export:
    __slots__ = ("out", "waiters", "draining", "spliced", "holders", "since")

    def __init__(self):
        self.out = 0           # replies with reads in the pool
        self.waiters = []      # callables to run once `out` drops to 0 (and `spliced` read)
        self.draining = False  # those run in this loop turn: no read may leave meanwhile
        self.spliced = set()   # Splicers (splice.py) whose sockets may hold its pages
        self.holders = set()   # the Splicers of the connections whose writes wait
        self.since = 0.0       # loop time when the first of those began to wait

    def unread(self, now: float) -> set:
        """The Splicers still holding unread pages that a waiting write must wait for:
        its own connection's always (its client sees its requests run one by one); the
        others' for SPLICE_WAIT_S at most: their READs are concurrent with this write
        (any outcome is theirs), and a client that does not read its replies must not
        hold another's writes forever."""
        late = now - self.since >= SPLICE_WAIT_S
        return {s for s in self.spliced
                if (not late or s in self.holders) and s.unread()}


class ReadPool:
    def __init__(self, loop, workers: int = WORKERS, max_out_bytes: int = MAX_OUT_BYTES):
        self.loop = loop
        self.workers = workers
        self.max_out_bytes = max_out_bytes
        self.out_bytes = 0
        # Worker threads, started with the first miss. Jobs go in through a SimpleQueue;
        # results come back through `results` and one wake-up of the loop per batch
        # (a thread pool executor's futures and a loop callback per read cost more than
        # the read itself on a cold 4 KiB one).
        self.threads: list[threading.Thread] = []
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.woken = False
        self.closed = False
        self.parked: list = []   # [missing, export, state, size, done, retries]
        # Exports whose files cannot tell a miss (no RWF_NOWAIT: tmpfs): their small
        # reads gain nothing from plans, so connections plan only reads of THREAD_BYTES.
        self.inline: set = set()
        self.timer = None
        self.polled = 0.0   # loop time of the last retry of the parked reads
        self.exports: dict[object, _Export] = {}
        self.splice_timer = None

    def _state(self, export) -> _Export:
        state = self.exports.get(export)
        if state is None:
            state = self.exports[export] = _Export()
        return state

    def may_mutate(self, export, resume, own=None) -> bool:
        """Whether a write, zero or discard may run on `export` now; if not, `resume` is
        called once the reads out on it have completed and its clients have read the
        bytes spliced to them (splice.py; `own` is the asking connection's Splicer)."""
        state = self.exports.get(export)
        if own is not None and (own.spliced or own.queue):
            # Its own unread replies count even if a wait by another write gave up on
            # them (SPLICE_WAIT_S) and dropped them from `spliced`.
            state = self._state(export)
            state.spliced.add(own)
        if state is None:
            return True
        if not state.waiters:
            state.since = self.loop.time()
        if state.spliced:
            state.spliced = state.unread(self.loop.time())
        if not state.out and not state.spliced:
            if not state.waiters and not state.draining:
                del self.exports[export]
            return True
        state.waiters.append(resume)
        if own is not None:
            state.holders.add(own)
        if state.spliced and self.splice_timer is None:
            self.splice_timer = self.loop.call_later(RETRY_S, self._spliced_read)
        return False

    def may_splice(self, export) -> bool:
        """Whether a READ of `export` may be spliced now: not while a write waits (it
        would wait for that reply too, and could be starved)."""
        state = self.exports.get(export)
        return not self.closed and (state is None or not (state.waiters or state.draining))

    def spliced(self, export, splicer) -> None:
        """`splicer` has sent pages of `export`'s files: writes wait until they are read."""
        self._state(export).spliced.add(splicer)

    def _spliced_read(self) -> None:
        """Poll the sockets that writes wait for (a client's read of them raises no
        event here); resume the writes once every spliced byte has been read."""
        self.splice_timer = None
        waiting = False
        for export, state in list(self.exports.items()):
            if not state.spliced or not state.waiters:
                continue
            state.spliced = state.unread(self.loop.time())
            if state.spliced:
                waiting = True
            elif not state.out:
                self._release(export, state)
        if waiting:
            self.splice_timer = self.loop.call_later(RETRY_S, self._spliced_read)

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
                # tests' file seams): blocking, as before, into a fresh bytes object
                # (uvloop keeps bytes it cannot send at once, but copies a bytearray).
                data = file.pread(piece.length, piece.offset)
                if len(data) < piece.length:   # past the end of the file: zeros
                    data += bytes(piece.length - len(data))
                pieces[i] = data
                continue
            buf = bytearray(piece.length)
            view = memoryview(buf)
            pieces[i] = buf
            if big or file.direct:
                missing.append((file, view, piece.offset))
                size += piece.length
                threaded = True
                continue
            got, complete = read_cached(view, piece.offset)
            if not complete:
                missing.append((file, view[got:], piece.offset + got))
                size += len(buf) - got
        if not missing:
            return True
        state = self._state(export)
        if (self.closed or state.waiters or state.draining
                or self.out_bytes + size > self.max_out_bytes):
            # Blocking, as before the pool: memory stays bounded, a waiting write runs.
            for file, view, offset in missing:
                file.preadinto(view, offset)
            return True
        state.out += 1
        self.out_bytes += size
        if threaded:
            self._to_thread((missing, export, state, size, done))
            return False
        self.parked.append([missing, export, state, size, done, 0])
        if self.timer is None:
            self.timer = self.loop.call_later(RETRY_S, self._tick)
        return False

    def _to_thread(self, job) -> None:
        if not self.threads:
            self._start()
        self.jobs.put(job)

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
                self._to_thread(tuple(job[:5]))
            else:
                self.parked.append(job)
        for (_missing, export, state, size, done, _n), error in finished:
            self._finish(export, state, size, done, error)

    def _start(self) -> None:
        for n in range(self.workers):
            t = threading.Thread(target=self._work, name=f"qnbd-read-{n}", daemon=True)
            t.start()
            self.threads.append(t)

    def _work(self) -> None:
        """A worker thread: blocking reads (short only at end of file, where the buffer
        keeps its zeros); os.preadv releases the GIL while it waits."""
        jobs, results = self.jobs, self.results
        while True:
            job = jobs.get()
            if job is None:
                return
            error = None
            try:
                for file, view, offset in job[0]:
                    file.preadinto(view, offset)
            except BaseException as e:   # reported to the request, never lost here
                error = e
            results.append((job, error))
            with self.lock:
                if self.woken:
                    continue   # a _completed call is queued and will take this one
                self.woken = True
            try:
                self.loop.call_soon_threadsafe(self._completed)
            except RuntimeError:   # the loop is closed: nobody waits for the reply
                pass

    def _completed(self) -> None:
        with self.lock:
            self.woken = False
        results = self.results
        while results:
            (_missing, export, state, size, done), error = results.popleft()
            self._finish(export, state, size, done, error)

    def _finish(self, export, state: _Export, size: int, done, error) -> None:
        self.out_bytes -= size
        state.out -= 1
        if not state.out:
            if state.spliced:
                state.spliced = state.unread(self.loop.time())
            if not state.spliced:
                self._release(export, state)
        done(error)

    def _release(self, export, state: _Export) -> None:
        """No read of `export` is out any more: run the writes that waited."""
        waiters, state.waiters = state.waiters, []
        state.holders = set()
        if waiters:
            # The held writes run in callbacks queued now (resume); until the
            # one queued after them, reads stay on the loop: none overtakes them.
            state.draining = True
            for resume in waiters:
                resume()
            self.loop.call_soon(self._drained, export, state)
        elif self.exports.get(export) is state:
            del self.exports[export]

    def _drained(self, export, state: _Export) -> None:
        state.draining = False
        if not state.out and not state.waiters and not state.spliced \
                and self.exports.get(export) is state:
            del self.exports[export]

    def shutdown(self) -> None:
        """Wait for every read still out (before the images close)."""
        self.closed = True
        for timer in (self.timer, self.splice_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.splice_timer = None
        self.parked = []   # nobody awaits their replies any more; no thread reads them
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        self.threads = []
