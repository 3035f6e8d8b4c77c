"""Consistency check and repair of a QED image, as `qemu-img check [-r leaks|all]`.

qed_spec.txt, "Consistency checking": every cluster is referenced at most once by the
L1 and L2 tables (twice is a corruption, never is a leak); offsets are cluster-aligned,
after the header and inside the file; a whole table fits before the end of the file.
The walk starts at the L1 table and visits every L2 table, as QEMU's block/qed-check.c;
its counts are the ones qemu-img prints. Repairs (any -r mode, as QEMU):
  - an L1 or L2 entry with an invalid offset is cleared (a table past the end of the file
    after a crash: the data it would have mapped was never acknowledged by a flush);
  - then, with no corruption left, NEED_CHECK is cleared.
One repair QEMU does not make: leaked clusters at the end of the file (what a crash in
an append-only allocation leaves) are cut off, so an image repaired after a crash is
clean for qemu-img too. Leaks in the middle of the file stay (they are only wasted
space, and QED has no way to reuse them).

The image is read with the header parser and plain preads, never through the engine.
Memory is one bit per cluster of the file's real size, never what a header claims.
"""

from .. import fileio
from ..block.check_result import FIX_ALL, FIX_LEAKS, CheckResult, Progress
from ..block.storage import Barrier, Storage
from ..lock import lock_image
from . import header as hdr
from .tables import UNALLOCATED, ZERO, decode_table, encode_table


def check_image(path: str, fix: int = 0, force_share: bool = False,
                progress: Progress | None = None) -> CheckResult:
    """Open `path` (read-write only to repair), lock it as qemu-img check does, check,
    repair with `fix`; after a repair, the result is a second check's, with the repair
    counts of the first (as qemu-img)."""
    file = fileio.open_file(path, writable=bool(fix))
    try:
        lock_image(file, bool(fix), force_share)
        return check_storage(Storage(file), path, fix, progress)
    finally:
        file.close()


def check_storage(storage: Storage, filename: str, fix: int = 0,
                  progress: Progress | None = None) -> CheckResult:
    progress = progress or Progress()
    result = _Check(storage, filename, progress).run(fix)
    if fix and (result.corruptions_fixed or result.leaks_fixed):
        again = _Check(storage, filename, progress).run(0)
        again.leaks_fixed, again.corruptions_fixed = result.leaks_fixed, result.corruptions_fixed
        result = again
    return result


def repair_storage(storage: Storage, filename: str) -> CheckResult:
    """The repair of a read-write open (qed_spec.txt, "Consistency checking"): only when
    everything found can be fixed is anything written. A cluster referenced twice cannot
    be (which reference is right?), so such an image is left as it is and the result
    says so (its corruptions)."""
    dry = _Check(storage, filename, Progress())
    result = dry.run(0)
    if dry.duplicates or result.check_errors:
        return result
    return check_storage(storage, filename, FIX_ALL)


class _Check:
    def __init__(self, storage: Storage, filename: str, progress: Progress):
        self.storage = storage
        self.h = h = hdr.read(storage, filename)
        self.progress = progress
        size = storage.size()
        self.end = size - size % h.cluster_size
        self.nclusters = self.end // h.cluster_size
        self.used = bytearray((self.nclusters + 7) // 8)
        self.duplicates = 0  # clusters referenced twice: corruptions no repair fixes
        self.result = CheckResult(filename=filename, format="qed")

    def _mark(self, offset: int, n: int) -> bool:
        """Count `n` clusters from `offset` as referenced; False if one already was."""
        first = offset // self.h.cluster_size
        duplicates = 0
        for c in range(first, first + n):
            bit = 1 << (c & 7)
            if self.used[c >> 3] & bit:
                duplicates += 1
            self.used[c >> 3] |= bit
        self.result.corruptions += duplicates
        self.duplicates += duplicates
        return duplicates == 0

    def _invalid(self, fix: int) -> None:
        if fix:
            self.result.corruptions_fixed += 1
        else:
            self.result.corruptions += 1

    def run(self, fix: int) -> CheckResult:
        h, r = self.h, self.result
        cs = h.cluster_size
        r.total_clusters = -(-h.image_size // cs)
        self._mark(h.l1_table_offset, h.table_size)
        l1 = decode_table(self.storage.pread(h.table_bytes, h.l1_table_offset))
        self.progress.add_total(sum(1 for e in l1 if e))
        l1_fixed = False
        for i, offset in enumerate(l1):
            if not offset:
                continue
            self.progress.step()
            if not hdr.table_offset_valid(h, offset, self.end):
                self._invalid(fix)
                if fix:
                    l1[i] = UNALLOCATED
                    l1_fixed = True
                continue
            if not self._mark(offset, h.table_size):
                continue  # shares clusters with another table: not walked
            raw = self.storage.pread(h.table_bytes, offset)
            if len(raw) != h.table_bytes:
                r.check_errors += 1
                continue
            l2 = decode_table(raw)
            if self._check_l2(l2, fix) and fix:
                self.storage.pwrite(encode_table(l2), offset)
        if l1_fixed:
            self.storage.pwrite(encode_table(l1), h.l1_table_offset)
        if r.check_errors:
            return r  # leaks are counted only after a complete walk
        # Offsets below the header never count as references (cluster_offset_valid),
        # so every set bit is a referenced cluster after the header.
        r.leaks = self.nclusters - h.header_size - int.from_bytes(self.used, "little").bit_count()
        if fix & FIX_LEAKS and r.leaks:
            self._cut_leaked_tail()
        if fix and not (r.corruptions or r.check_errors) and h.need_check:
            self.storage.sync(Barrier.REPAIR)  # the fixes before the bit that covers them
            hdr.write_features(self.storage, h, h.features & ~hdr.F_NEED_CHECK,
                               Barrier.HEADER)
        return r

    def _check_l2(self, l2, fix: int) -> int:
        """Count the data clusters of one L2 table; returns how many entries were
        invalid (cleared in `l2` when fixing)."""
        h, r = self.h, self.result
        invalid = 0
        last = 0
        for j, entry in enumerate(l2):
            if entry == UNALLOCATED or entry == ZERO:
                continue
            r.allocated_clusters += 1
            if last and last + h.cluster_size != entry:
                r.fragmented_clusters += 1
            last = entry
            if not hdr.cluster_offset_valid(h, entry, self.end):
                self._invalid(fix)
                if fix:
                    l2[j] = UNALLOCATED
                invalid += 1
                continue
            self._mark(entry, 1)
        return invalid

    def _cut_leaked_tail(self) -> None:
        """Leaked clusters after the last referenced one are removed from the file."""
        h, r = self.h, self.result
        last = self.nclusters - 1
        while last >= h.header_size and not self.used[last >> 3] & (1 << (last & 7)):
            last -= 1
        cut = self.nclusters - 1 - last
        if cut:
            self.storage.sync(Barrier.REPAIR)  # fixed tables durable before the cut
            self.storage.truncate((last + 1) * h.cluster_size)
            r.leaks -= cut
            r.leaks_fixed += cut
