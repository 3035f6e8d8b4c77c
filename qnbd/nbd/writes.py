"""Performing write plans off the event loop (docs/DESIGN.md, "I/O model").

A WRITE of PLAN_BYTES or more is mapped and allocated on the loop, like every write,
and answered with a write plan (qnbd/block/plan.py): its HostWrites go to a worker thread
(os.pwritev releases the GIL), so the loop receives the next request's payload while the
file is written, which is what qemu-nbd's thread pool overlaps too. When they are done the
plan is committed on the loop (the L2 entries that map new clusters change only now,
rule 4) and the WRITE is answered. Smaller writes stay inline: for them the hand-off
costs more than the write.

What keeps it as safe as writing inline:
- Ordering, per export (across all its connections): while writes of an export are out,
  a request waits (`may_run`) unless it is a WRITE that touches none of their units
  (`Export.write_unit`, a qcow2 cluster: two writes never allocate or map the same
  cluster). Reads, FLUSH, trim, write-zeroes, block status, overlapping writes, control
  socket commands (`idle`) and shutdown see every earlier write completed. A request that
  waits stops new writes from leaving the loop (they run inline meanwhile), so it cannot
  starve.
- The write waits for the reads out on the export as every write does (reads.py).
- A failed HostWrite aborts the plan: nothing is mapped, the clusters allocated for it are
  queued for release, the WRITE answers with the error.
- Memory is bounded: at most MAX_OUT_BYTES of writes are out at once; past that a write
  runs inline (the socket is read no further meanwhile).
- `shutdown` waits for the writes still out and commits them before the images close.
"""

from . import protocol as p
from .workers import Gate, Held, Workers

# One thread: the kernel runs buffered writes to one file one at a time (the inode's
# lock): on tmpfs a second thread only spun on that lock (perf: rwsem_spin_on_owner)
# and cost 10-20% more CPU per GiB for no gain in rate.
WORKERS = 1
MAX_OUT_BYTES = 32 << 20
# WRITEs this large go to the pool (the writes branch's measurements, bench/RESULTS.md);
# reads have their own threshold (reads.py THREAD_BYTES).
PLAN_BYTES = 128 << 10


class WritePool:
    def __init__(self, loop, workers: int = WORKERS, max_out_bytes: int = MAX_OUT_BYTES):
        self.loop = loop
        self.max_out_bytes = max_out_bytes
        self.out_bytes = 0
        self.threads = Workers(loop, workers, "write", _write_job, self._written)
        self.closed = False
        self.gate = Gate(loop, dict)   # per export: plan -> (first, end unit) it writes
        self.idle_waiters: list = []   # control commands waiting for no write out at all

    def may_run(self, export, req, resume) -> bool:
        """Whether `req` may run on `export` now; if not, `resume` is called once the
        writes it must not overtake have completed."""
        state = self.gate.get(export)
        if state is None or not state.out:
            return True
        if req.cmd == p.CMD_WRITE and not state.waiters:
            unit = export.write_unit
            first, end = req.offset // unit, -(-(req.offset + req.length) // unit)
            if all(end <= a or b <= first for a, b in state.out.values()):
                return True
        state.waiters.append(resume)
        return False

    def may_plan(self, export, length: int) -> bool:
        """Whether a WRITE of `length` bytes on `export` goes to the pool (else inline).
        Not while a control command waits for no write out (`idle`): new writes leaving
        the loop could keep it waiting for ever."""
        if length < PLAN_BYTES or self.closed or self.idle_waiters:
            return False
        if self.out_bytes + length > self.max_out_bytes:
            return False
        return self.gate.open(export)

    def idle(self, resume) -> bool:
        """Whether no write is out on any export; if some are, `resume` is called once
        none is (control socket commands: a checkpoint must see every earlier write)."""
        if not self.gate.busy():
            return True
        self.idle_waiters.append(resume)
        return False

    def submit(self, export, req, plan, done) -> None:
        """Perform `plan` (the WRITE `req`'s) in a worker thread, then commit it on the
        loop (abort it if a HostWrite failed) and call `done(error)`."""
        state = self.gate.held(export)
        unit = export.write_unit
        state.out[plan] = (req.offset // unit, -(-(req.offset + req.length) // unit))
        self.out_bytes += req.length
        self.threads.submit((plan, export, state, req.length, done))

    def _written(self, job, error) -> None:
        self._finish(*job, error)

    def _finish(self, plan, export, state: Held, size: int, done, error,
                answer: bool = True) -> None:
        if error is None:
            try:
                plan.commit()
            except Exception as e:   # e.g. the FUA flush: the request's error
                error = e
        else:
            plan.abort()
        self.out_bytes -= size
        del state.out[plan]
        if answer:
            done(error)   # its reply is queued before what waited for it runs
        if self.gate.settle(export, state):
            self._resume_idle()

    def _resume_idle(self) -> None:
        if self.idle_waiters and not self.gate.busy():
            idle, self.idle_waiters = self.idle_waiters, []
            for resume in idle:
                resume()

    def shutdown(self) -> None:
        """Wait for the writes still out and commit them (before the images close);
        nobody awaits their replies any more."""
        self.closed = True
        for job, error in self.threads.stop():
            self._finish(*job, error, answer=False)


def _write_job(job) -> None:
    """In a worker thread: the plan's HostWrites (os.pwritev releases the GIL)."""
    for w in job[0].writes:
        w.perform()
