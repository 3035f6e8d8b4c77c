"""The durable storage of one image file: every byte a format engine writes goes through
a `Storage`, and only a Storage knows what is written but not yet synced.

docs/DESIGN.md, "Durability": write ordering is expressed as *barriers*. A barrier is the
one fsync that must separate writes that something depends on from the writes that
depend on them (refcount blocks before the L2 tables that use them, L2 tables before
the L1 entries, a new table before the header that points to it...). Each barrier has a
name (`Barrier`), so that the crash tests can remove any single one and watch the
enumeration of crash states fail: a barrier nobody can show to be needed is not kept.

`sync(barrier)` issues the fsync only when this storage has unsynced writes; since no
engine module writes to a file except through its Storage, the answer cannot be wrong
(the flag the first engine kept by hand was, see docs/DESIGN.md "Durability").
"""

import enum

from ..fileio import File


class Barrier(enum.Enum):
    """Every fsync an engine issues, by the ordering rule it serves (docs/DESIGN.md,
    "Durability" lists which rule of the format each one keeps)."""

    BEFORE_L2 = "refcounts and data durable before the L2 tables that point to them"
    BEFORE_L1 = "L2 tables durable before the L1 entries that point to them"
    BEFORE_RELEASE = "dropped references durable before the refcounts are decreased"
    NEW_REFBLOCK = "a new refcount block durable before the table entry naming it"
    BEFORE_HEADER = "new tables durable before the header points to them"
    HEADER = "a header change durable before anything that relies on it"
    BITMAPS_IN_USE = "bitmaps marked in use durably before the first write (rule 9)"
    NEED_CHECK = "QED: NEED_CHECK durable before the metadata changes it covers (rule 12)"
    FLUSH = "everything acknowledged is durable (NBD_CMD_FLUSH, FUA)"
    REPAIR = "a repair step durable before the next one"


class Storage:
    """One open image file (metadata, or an external data file)."""

    def __init__(self, file: File):
        self.file = file
        self.path = file.path
        self._unsynced = False
        # The file's size, known without an fstat while we hold it writable: the image
        # lock keeps every other writer out and every write of ours comes through here
        # (allocating writes ask for it once per new cluster).
        self._size: int | None = None
        # The end of the furthest write handed to another thread (`planned`): the file
        # is at least that long as far as anything on the loop is concerned, so that
        # nothing truncates or "extends" over a write still out. Only while plans that
        # write here are out (`plans_out`): once none is, the file's own size holds
        # (after a failed write it may be shorter).
        self._planned_end = 0
        self._plans_out = 0

    # -- reads -------------------------------------------------------------------------

    def size(self) -> int:
        if self._size is not None:
            return self._size
        size = max(self.file.size(), self._planned_end)
        if self.file.writable:
            self._size = size
        return size

    def pread(self, length: int, offset: int) -> bytes:
        return self.file.pread(length, offset)

    def preadinto(self, buf, offset: int) -> int:
        return self.file.preadinto(buf, offset)

    # -- writes: each one leaves the storage unsynced ------------------------------------

    def pwrite(self, data, offset: int) -> None:
        self._unsynced = True  # before the call: a failed write may still land in part
        known, self._size = self._size, None   # ... and change the size: ask again then
        self.file.pwrite(data, offset)
        if known is not None:
            self._size = max(known, offset + memoryview(data).nbytes)

    def pwritev(self, buffers: list, offset: int) -> None:
        self._unsynced = True
        known, self._size = self._size, None
        self.file.pwritev(buffers, offset)
        if known is not None:
            self._size = max(known, offset + sum(memoryview(b).nbytes for b in buffers))

    def plan_opened(self) -> None:
        """A write plan that may write here (`planned`) was made; `landed` ends it."""
        self._plans_out += 1

    def planned(self, offset: int, length: int) -> None:
        """A write of [offset, offset + length) that another thread performs
        (qnbd/block/plan.py): unsynced from now, as a failed write may land in part, and
        the file's size counts it. Call `landed` on this thread once it is done."""
        self._unsynced = True
        end = offset + length
        self._planned_end = max(self._planned_end, end)
        if self._size is not None:
            self._size = max(self._size, end)

    def landed(self, ok: bool) -> None:
        """A planned write has completed (`ok`) or failed: unsynced again, since a sync
        may have run while it was out and did not cover it; after a failure the size
        is asked of the file again."""
        self._unsynced = True
        self._plans_out -= 1
        if not self._plans_out:
            self._planned_end = 0
        if not ok:
            self._size = None

    def truncate(self, length: int) -> None:
        self._unsynced = True
        self._size = None
        self._planned_end = min(self._planned_end, length)
        self.file.truncate(length)
        if self.file.writable:
            self._size = length

    def punch_hole(self, offset: int, length: int) -> bool:
        self._unsynced = True
        return self.file.punch_hole(offset, length)

    # -- durability --------------------------------------------------------------------

    @property
    def unsynced(self) -> bool:
        return self._unsynced

    def sync(self, barrier: Barrier) -> None:
        """Make every write so far durable, if any is not (`barrier` names why)."""
        if self._unsynced:
            self.file.fsync()
            self._unsynced = False

    def close(self) -> None:
        self.file.close()


def sync_all(storages, barrier: Barrier) -> None:
    """One barrier over several files (an image and its external data file)."""
    for storage in storages:
        storage.sync(barrier)
