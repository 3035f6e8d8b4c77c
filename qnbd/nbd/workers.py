"""Worker threads for the read and write pools (reads.py, writes.py; docs/DESIGN.md,
"I/O model").

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
