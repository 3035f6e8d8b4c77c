"""One io_uring per server loop, for the reads that miss the page cache (docs/DESIGN.md,
"I/O model"; issue 17).

ReadPool.fill (reads.py) reads each HostRead inline with preadv2(RWF_NOWAIT); what misses
comes here, and so do the reads after a miss, untried (reads.RING_RUN: the ring tries the
page cache itself first). Each miss becomes a read submission; the submissions of one
loop turn go to the kernel in one io_uring_enter (a `call_soon` flush), the kernel
performs them without a thread of ours (buffered reads wait for their pages inside the
kernel), and each completion signals an eventfd that the loop watches, so the
completions of a batch are reaped in one pass of `_reap`. A miss costs no thread switch, no GIL hand-off and no
retries.

The binding is `liburing` from PyPI (a maintained wrapper of C liburing, an abi3 wheel
for every CPython from 3.10): imported lazily, so a machine without it, or whose kernel
or seccomp profile refuses io_uring_setup (ENOSYS, EPERM: Docker's default profile),
keeps the read pool's other path.

What keeps it safe:
- A buffer handed to the kernel belongs to it until its completion is reaped: `out`
  holds every one (and the iovec that points at it) until then, and `close` waits for
  all of them before the ring goes away (a completion into freed memory would be memory
  corruption).
- At most OUT_MAX reads are out, so the completion queue (twice the submission queue)
  never overflows into kernel memory; `read_all` says False past that and the caller
  keeps its other path.
- A failed read reports its error; a short one is continued, and one that reaches the
  end of the file leaves zeros in the rest of its buffer, as the engines' reads do.
"""

import os

# Submission queue entries: a loop turn rarely prepares more (clients x their queue
# depth). Not 256, which uvloop's libuv rings use: tests tell ours by its size.
ENTRIES = 128
OUT_MAX = 2 * ENTRIES   # the completion queue's size (the kernel's default: twice)


class RingUnavailable(Exception):
    """io_uring cannot be used here (no binding, or the kernel refuses a ring); the
    message says why in qemu's words where qemu has some (block/io_uring.c)."""


def _binding():
    try:
        import liburing
    except ImportError as e:
        raise RingUnavailable(f"the liburing module cannot be imported: {e}") from None
    return liburing


class Ring:
    """Reads into caller-owned buffers through one io_uring; `finish(job, error)` runs on
    the loop once per completed read (error None when its buffer is filled)."""

    def __init__(self, loop, finish, entries: int = ENTRIES):
        lib = self.lib = _binding()
        self.loop = loop
        self.finish = finish
        self.ring = lib.Ring()
        try:
            # Not IORING_SETUP_DEFER_TASKRUN: with it, completions wait as task work
            # until io_uring_get_events runs it, and the eventfd was not signalled for
            # all of it: cold reads stayed in the ring for good once the page cache
            # dropped pages under reads in flight (the review reproduced it every run).
            lib.io_uring_queue_init(entries, self.ring)
        except OSError as e:
            raise RingUnavailable("failed to init linux io_uring ring: "
                                  + os.strerror(e.errno)) from None
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            lib.io_uring_register_eventfd(self.ring, self.efd)
        except OSError as e:
            self._teardown()
            raise RingUnavailable("failed to register the ring's eventfd: "
                                  + os.strerror(e.errno)) from None
        self.cqe = lib.Cqe()
        self.out: dict[int, tuple] = {}   # user_data -> (fd, view, offset, iovec, job)
        self.next_id = 0
        self.flush_due = False
        self.closed = False
        loop.add_reader(self.efd, self._reap)

    def read_all(self, reads: list, job) -> bool:
        """Submit every (file, view, offset) of `reads`: fill `view` from the qnbd.fileio
        File at `offset`. False, and nothing submitted, when that would put more than
        OUT_MAX reads out or a file has no descriptor (the tests' file seams)."""
        if self.closed or len(self.out) + len(reads) > OUT_MAX:
            return False
        fds = [getattr(file, "fd", None) for file, _view, _offset in reads]
        if None in fds:
            return False
        for fd, (_file, view, offset) in zip(fds, reads):
            self._prepare(fd, view, offset, job)
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self._flush)
        return True

    def _prepare(self, fd: int, view: memoryview, offset: int, job) -> None:
        lib = self.lib
        sqe = lib.io_uring_get_sqe(self.ring)
        if sqe is None:   # the submission queue is full: hand it to the kernel first
            lib.io_uring_submit(self.ring)
            sqe = lib.io_uring_get_sqe(self.ring)
        whole = view.obj
        if view.nbytes == len(whole) and whole.__class__ is bytearray:
            # A whole bytearray (the usual miss: nothing of it was cached) needs no
            # iovec object: fewer allocations per read.
            iov = None
            lib.io_uring_prep_read(sqe, fd, whole, offset)
        else:   # the binding takes only a bytearray for a plain read: a part goes by iovec
            iov = lib.Iovec([view])
            lib.io_uring_prep_readv(sqe, fd, iov, offset)
        ident = self.next_id = self.next_id + 1
        lib.io_uring_sqe_set_data64(sqe, ident)
        self.out[ident] = (fd, view, offset, iov, job)

    def _flush(self) -> None:
        """This loop turn's submissions, in one io_uring_enter."""
        self.flush_due = False
        if not self.closed:
            self.lib.io_uring_submit(self.ring)

    def _completions(self) -> list:
        """Take every completion in the queue: [(user_data, result or OSError)]."""
        lib, cqe = self.lib, self.cqe
        done = []
        for _ in lib.CqeIter(self.ring, cqe):
            entry = cqe[0]
            try:
                result = entry.res   # the binding raises OSError for a negative result
            except OSError as e:
                result = e
            done.append((entry.user_data, result))
        if done:
            lib.io_uring_cq_advance(self.ring, len(done))
        return done

    def _reap(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        continued = False
        finished = []
        for ident, result in self._completions():
            fd, view, offset, _iov, job = self.out.pop(ident)
            if result.__class__ is int:
                if 0 < result < len(view):   # short, not at the end: read on
                    self._prepare(fd, view[result:], offset + result, job)
                    continued = True
                    continue
                if result == 0 and len(view):   # end of file: the rest reads as zeros
                    view[:] = bytes(len(view))
                result = None
            finished.append((job, result))
        if continued and not self.flush_due:
            self.lib.io_uring_submit(self.ring)
        # Their completions are consumed: each must get its finish even if one before
        # it fails (a bug there), or its request would never be answered.
        failure = None
        for job, result in finished:
            try:
                self.finish(job, result)
            except Exception as e:
                failure = failure or e
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Wait for every read still out (their results are dropped: nobody awaits them),
        then free the ring."""
        self.closed = True
        lib = self.lib
        lib.io_uring_submit(self.ring)
        while self.out:
            try:
                lib.io_uring_wait_cqe(self.ring, self.cqe)
            except InterruptedError:   # a signal (a second SIGTERM): keep waiting
                continue
            for ident, _result in self._completions():
                self.out.pop(ident, None)
        self.loop.remove_reader(self.efd)
        self._teardown()

    def _teardown(self) -> None:
        self.lib.io_uring_queue_exit(self.ring)
        os.close(self.efd)


def open_ring(loop, finish, aio: str | None):
    """The ring for `--aio` mode `aio`: io_uring must have one (RingUnavailable says why
    not); threads has none; native and the default use one where the kernel allows."""
    if aio == "threads":
        return None
    try:
        return Ring(loop, finish)
    except RingUnavailable:
        if aio == "io_uring":
            raise
        return None
