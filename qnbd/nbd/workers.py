"""Worker threads for the read and write pools (reads.py, writes.py; docs/DESIGN.md,
"I/O model"), and the per-export gate both pools keep their requests ordered with.

Jobs go in through a SimpleQueue; each runs `perform(job)` in a thread (os.preadv and
os.pwritev release the GIL), and the results come back through one deque and one
wake-up of the loop per batch: a thread pool executor's futures and a loop callback per
job cost more than a cold 4 KiB read itself. `finish(job, error)` then runs on the loop.
The threads start with the first job.
"""

import collections
import queue
import threading


class Workers:
    def __init__(self, loop, count: int, name: str, perform, finish):
        self.loop = loop
        self.count = count
        self.name = name
        self.perform = perform
        self.finish = finish
        self.threads: list[threading.Thread] = []
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.woken = False

    @property
    def started(self) -> bool:
        return bool(self.threads)

    def submit(self, job) -> None:
        if not self.threads:
            for n in range(self.count):
                t = threading.Thread(target=self._work, name=f"qnbd-{self.name}-{n}",
                                     daemon=True)
                t.start()
                self.threads.append(t)
        self.jobs.put(job)

    def _work(self) -> None:
        jobs, results, perform = self.jobs, self.results, self.perform
        while True:
            job = jobs.get()
            if job is None:
                return
            error = None
            try:
                perform(job)
            except BaseException as e:   # reported to the request, never lost here
                error = e
            results.append((job, error))
            # Not kept while waiting for the next one: a job refers to its buffers, which
            # are reused only once nothing does (buffers.py).
            job = error = None
            with self.lock:
                if self.woken:
                    continue   # a _completed call is queued and will take this one
                self.woken = True
            try:
                self.loop.call_soon_threadsafe(self._completed)
            except RuntimeError:   # the loop is closed: `stop` hands the result back
                pass

    def _completed(self) -> None:
        with self.lock:
            self.woken = False
        results, finish = self.results, self.finish
        while results:
            finish(*results.popleft())

    def stop(self) -> list:
        """Let the jobs queued run to their end, stop the threads, and return the
        (job, error) results the loop has not finished."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        self.threads = []
        left = list(self.results)
        self.results.clear()
        return left


class Held:
    """One export's jobs out in a pool, and the requests waiting for none to be."""
    __slots__ = ("out", "waiters", "draining")

    def __init__(self, out):
        self.out = out         # what the pool has out: a count, or plans by guest range
        self.waiters = []      # callables to run once `out` is empty
        self.draining = False  # those run in this loop turn: no job may leave meanwhile


class Gate:
    """Per export: what a pool has out and who waits for it (docs/DESIGN.md, "I/O
    model"). A request that must not overtake the jobs out waits (its resume goes in
    the export's Held `waiters`); while one waits, or while the waiters run, no new job
    leaves the loop (`open` is False), so a waiting request cannot starve. `settle`,
    after a job's end, resumes the waiters once none is out, each in a callback queued
    now; jobs may leave again only from the callback queued after them, so none
    overtakes them."""

    def __init__(self, loop, empty):
        self.loop = loop
        self.empty = empty     # makes a Held's `out`: int for a count, dict for a map
        self.exports: dict[object, Held] = {}

    def get(self, export):
        return self.exports.get(export)

    def held(self, export) -> Held:
        state = self.exports.get(export)
        if state is None:
            state = self.exports[export] = Held(self.empty())
        return state

    def open(self, export) -> bool:
        """Whether a job of `export` may leave the loop now."""
        state = self.exports.get(export)
        return state is None or not (state.waiters or state.draining)

    def busy(self) -> bool:
        return any(state.out for state in self.exports.values())

    def settle(self, export, state: Held) -> bool:
        """After a job of `export` ended and left `state.out`: if none is out any more,
        resume the waiters and return True."""
        if state.out:
            return False
        waiters, state.waiters = state.waiters, []
        if waiters:
            state.draining = True
            for resume in waiters:
                resume()
            self.loop.call_soon(self._drained, export, state)
        elif self.exports.get(export) is state:
            del self.exports[export]
        return True

    def _drained(self, export, state: Held) -> None:
        state.draining = False
        if not state.out and not state.waiters and self.exports.get(export) is state:
            del self.exports[export]
