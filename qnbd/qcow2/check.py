"""Consistency check and repair of a qcow2 image, as `qemu-img check [-r leaks|all]`.

qcow2.rst, "Host cluster management": a cluster's refcount is the number of references
to it. The check walks every reference the format defines - header cluster, active L1
table, its L2 tables and data clusters, each internal snapshot's L1/L2/data, the snapshot
table, the refcount table and blocks, the bitmap directory, tables and data - and counts
them per host cluster. Compressed data counts one reference on every host cluster its
byte range touches. Then computed and stored refcounts are compared: stored lower than
computed is a corruption (the cluster could be reused while in use), higher is a leak
(only wasted space). Last, the COPIED flag of the active L1/L2 entries must say "refcount
is exactly 1" (docs/DESIGN.md rule 5).

The flow, counts and messages follow QEMU's block/qcow2-refcount.c
(qcow2_check_refcounts, calculate_refcounts, compare_refcounts, check_oflag_copied) so
results can be compared with qemu-img's. Repairs:
  FIX_LEAKS   lower the refcount of leaked clusters;
  FIX_ERRORS  raise too-low refcounts, fix COPIED flags, and when the refcount structure
              itself is broken (a used cluster has no refcount, a refcount block is
              invalid or shared) build a new one from the computed refcounts.
The image is read with the header parser and plain preads, never through the engine,
which refuses exactly the damage a checker has to look at; repairs that rebuild or
rewrite structures are in repair.py. Every write goes through the image's Storage.
"""

from array import array
from itertools import compress

from .. import fileio
from ..block.check_result import FIX_ALL, FIX_ERRORS, FIX_LEAKS, CheckResult, Progress
from ..block.storage import Barrier, Storage
from ..errors import QnbdError
from ..lock import lock_image
from . import bitmap_format as bitmaps
from . import header as hdr
from . import repair
from .repair import last_nonzero
from .entries import (COMPRESSED, DATA, L1E_OFFSET_MASK, L1E_RESERVED_MASK,
                      L2E_OFFSET_MASK, L2E_STANDARD_RESERVED_MASK, OFLAG_COPIED, OFLAG_ZERO,
                      ZERO, CompressedLayout, bitmap_problem, decode_table, encode_table,
                      l2_entries, nonzero)
from .refcount import REFTABLE_ENTRY_RESERVED, WordBlock
from .stored_refcounts import StoredRefcounts, Unreadable
from .snapshots import read_table as read_snapshot_table

__all__ = ["FIX_ALL", "FIX_LEAKS", "check_image", "check_storage"]

# Computed refcounts are kept as refcount_bits-wide integers (refcount_order -> array
# typecode), as QEMU does: never more than the image can store.
_COUNT_TYPECODES = "BBBBHIQ"
# The non-zero entries of active L2 tables kept from the reference walk for the COPIED
# check, up to this many (8 bytes each), so that it need not read the tables again.
_KEPT_L2_ENTRIES = 1 << 21
def check_image(path: str, fix: int = 0, force_share: bool = False,
                progress: Progress | None = None) -> CheckResult:
    """Open `path` (read-write only to repair), lock it as qemu-img check does, check,
    repair with `fix`, and when something was repaired check again (the result is the
    second check's, with the repair counts of the first)."""
    file = fileio.open_file(path, writable=bool(fix))
    try:
        lock_image(file, bool(fix), force_share)
        return check_storage(Storage(file), path, fix, progress)
    finally:
        file.close()


def check_storage(storage: Storage, filename: str, fix: int = 0,
                  progress: Progress | None = None) -> CheckResult:
    """Check (and with `fix`, repair) the qcow2 image in `storage` (writable when
    fixing). Errors that stop the check are counted in check_errors."""
    progress = progress or Progress()
    result = _Checker(storage, filename, progress).run(fix)
    if fix and (result.corruptions_fixed or result.leaks_fixed):
        again = _Checker(storage, filename, progress).run(0)
        again.messages[:0] = result.messages
        again.leaks_fixed, again.corruptions_fixed = result.leaks_fixed, result.corruptions_fixed
        result = again
    return result


class _Checker:
    def __init__(self, file: Storage, filename: str, progress: Progress):
        self.file = file
        self.result = CheckResult(filename)
        self.file_size = file.size()
        head = file.pread(min(self.file_size, 1 << hdr.MAX_CLUSTER_BITS), 0)
        self.raw_header = head
        self.h = hdr.parse(head, self.file_size)
        self.cs = self.h.cluster_size
        self.cb = self.h.cluster_bits
        self.max_refcount = (1 << self.h.refcount_bits) - 1
        self.compressed = CompressedLayout(self.cb)
        self.typecode = _COUNT_TYPECODES[self.h.refcount_order]
        self.progress = progress
        self.counts = array(self.typecode)
        self.refcount_structure: list[tuple[int, int]] = []
        self.bitmap_directory = self.read_bitmap_directory()

    def read_bitmap_directory(self) -> tuple[int, int, list] | None:
        """(offset, size, entries) of the bitmap directory, or None. Read at open as
        qemu does (qcow2_do_open): a directory qemu refuses (an entry outside the
        constraints) fails the open, exit 1, not a corruption. Trusted only while the
        autoclear bit is set, as in qemu."""
        ext = self.h.extension(hdr.EXT_BITMAPS)
        if ext is None or not self.h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            return None
        _nb, size, offset = bitmaps.parse_extension(ext)
        return offset, size, bitmaps.read_directory(self.file, ext, self.h.size, self.cs,
                                                    self.file_size)

    def reload_stored(self) -> None:
        """Read the stored refcounts again (after a rebuild switched the header)."""
        self.file_size = self.file.size()
        self.stored = StoredRefcounts(self.file, self.h)

    # -- reporting -----------------------------------------------------------------------

    def corruption(self, message: str) -> None:
        self.result.corruptions += 1
        self.result.messages.append(message)

    def check_error(self, message: str) -> None:
        self.result.check_errors += 1
        self.result.messages.append(message)

    # -- the whole check (qcow2_check_refcounts + qcow2_co_check_locked) ----------------

    def run(self, fix: int) -> CheckResult:
        r = self.result
        r.total_clusters = -(-self.h.size // self.cs)
        try:
            self.stored = StoredRefcounts(self.file, self.h)
            rebuild = self.calculate(fix)
            # First compare without repairing: a rebuild makes single repairs moot.
            before = (r.corruptions, r.leaks, len(r.messages))
            rebuild, highest = self.compare(0, rebuild)
            if rebuild and fix & FIX_ERRORS:
                repair.rebuild_refcounts(self, fix)
                highest = self.highest
            elif fix and rebuild:
                self.check_error("ERROR need to rebuild refcount structures")
                return r
            elif fix and (r.leaks or r.corruptions):
                r.corruptions, r.leaks = before[:2]
                del r.messages[before[2]:]
                rebuild, highest = self.compare(fix, rebuild)
            self.check_copied(fix)
            r.image_end_offset = (highest + 1) * self.cs
            if fix and not r.check_errors and not r.corruptions:
                repair.mark_clean(self)
        except (QnbdError, OSError) as e:
            self.check_error(f"Check failed: {e}")
        return r

    # -- counting references (calculate_refcounts) ---------------------------------------

    def calculate(self, fix: int) -> bool:
        """Count every reference; returns whether the refcount structure must be rebuilt."""
        h = self.h
        self.counts = array(self.typecode, bytes(array(self.typecode).itemsize
                                                 * -(-self.file_size // self.cs)))
        self.refcount_structure = []
        self.kept_l2: dict[int, array] = {}
        self.kept_entries = 0
        self.inc(0, self.cs)  # header
        self.walk_l1(h.l1_table_offset, h.l1_size, fix, active=True)
        if h.nb_snapshots:
            snapshots, table_bytes = read_snapshot_table(
                self.file, h.snapshots_offset, h.nb_snapshots, self.cs, self.file_size)
            for snap in snapshots:
                self.walk_l1(snap.l1_offset, snap.l1_size, fix, active=False)
            self.inc(h.snapshots_offset, table_bytes)
        reftable = (h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        if self.inc(*reftable):
            self.refcount_structure.append(reftable)
        self.walk_bitmaps()
        self.result.table_damage = self.result.corruptions
        return self.walk_refblocks()

    def inc(self, offset: int, size: int) -> bool:
        """One reference on every cluster of [offset, offset+size) (qemu's
        qcow2_inc_refcounts_imrt). The last cluster may lie partly past the end of the
        file; anything further is a corruption and is not counted."""
        if size <= 0:
            return False
        if offset + size - self.file_size >= self.cs:
            self.corruption("ERROR: counting reference for region exceeding the end of the "
                            f"file by one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            return False
        counts = self.counts
        last = (offset + size - 1) >> self.cb
        if last >= len(counts):
            counts.extend(bytes(counts.itemsize * (last + 1 - len(counts))))
        for c in range(offset >> self.cb, last + 1):
            if counts[c] == self.max_refcount:
                self.corruption(f"ERROR: overflow cluster offset=0x{c << self.cb:x}")
                continue
            counts[c] += 1
        return True

    def read_table(self, offset: int, size: int):
        raw = self.file.pread(size, offset)
        if len(raw) < size:
            raw += bytes(size - len(raw))  # past EOF reads as zeros
        return decode_table(raw)

    def walk_l1(self, offset: int, entries: int, fix: int, active: bool) -> None:
        if not entries:
            return
        self.inc(offset, entries * 8)
        l1 = self.read_table(offset, entries * 8)
        if active:
            self.progress.add_total(len(l1) - l1.count(0))
        for _i, e in nonzero(l1):
            if e & L1E_RESERVED_MASK:
                self.corruption(f"ERROR found L1 entry with reserved bits set: {e:x}")
            l2_offset = e & L1E_OFFSET_MASK
            self.inc(l2_offset, self.cs)
            if l2_offset % self.cs:
                self.corruption(f"ERROR l2_offset={l2_offset:x}: Table is not cluster "
                                "aligned; L1 entry corrupted")
            self.walk_l2(l2_offset, fix, active)
            if active:
                self.progress.step()

    def walk_l2(self, l2_offset: int, fix: int, active: bool) -> None:
        r = self.result
        external = self.h.external_data
        table = self.read_table(l2_offset, self.cs)
        if active and not self.h.extended_l2 and self.kept_entries < _KEPT_L2_ENTRIES:
            self.kept_l2[l2_offset] = kept = array("Q", compress(table, table))
            self.kept_entries += len(kept)
        next_contiguous = 0
        for i, e, kind, bitmap in l2_entries(table, self.h.version, external,
                                             self.h.extended_l2):
            problem = self.h.extended_l2 and bitmap_problem(kind, bitmap)
            if problem:
                self.corruption(f"ERROR l2 entry {e:x} bitmap {bitmap:x}: {problem}")
            if not e:
                continue
            if kind != COMPRESSED and e & L2E_STANDARD_RESERVED_MASK:
                self.corruption(f"ERROR found l2 entry with reserved bits set: {e:x}")
            if kind == COMPRESSED:
                if e & OFLAG_COPIED:
                    # qcow2.rst: COPIED must be 0 for compressed clusters. qemu counts it
                    # and leaves it (its fix is a rewrite of the entry it does not do).
                    self.corruption(f"ERROR: coffset=0x{e & self.compressed.offset_mask:x}: "
                                    "copied flag must never be set for compressed clusters")
                    e &= ~OFLAG_COPIED
                self.inc(*self.compressed.host_range(e))
                if active:
                    # Compressed clusters count as fragmented: they share sectors.
                    r.allocated_clusters += 1
                    r.compressed_clusters += 1
                    r.fragmented_clusters += 1
                continue
            offset = e & L2E_OFFSET_MASK
            if kind not in (DATA, ZERO) or not (offset or external and kind == DATA):
                continue
            if offset % self.cs:
                if kind == ZERO and fix & FIX_ERRORS and self.fix_unaligned_zero(
                        l2_offset, table, i):
                    continue
                self.corruption(f"ERROR offset={offset:x}: "
                                + ("Preallocated cluster" if kind == ZERO else "Data cluster")
                                + " is not properly aligned; L2 entry corrupted.")
            if active:
                r.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    r.fragmented_clusters += 1
                next_contiguous = offset + self.cs
            if not external:  # qcow2.rst: data file clusters are not refcounted
                self.inc(offset, self.cs)

    def fix_unaligned_zero(self, l2_offset: int, table, i: int) -> bool:
        """A preallocated zero cluster at an unaligned offset holds no data: make it a
        plain zero cluster (qemu's fix_l2_entry_by_zero)."""
        if l2_offset % self.cs or l2_offset + self.cs > self.file_size:
            return False
        table[i] = OFLAG_ZERO
        self.file.pwrite(encode_table(table[i:i + 1]), l2_offset + 8 * i)
        self.file.sync(Barrier.REPAIR)
        self.result.corruptions_fixed += 1
        self.result.messages.append(f"Repairing L2 entry {i} of the table at "
                                    f"0x{l2_offset:x}: unaligned preallocated zero cluster")
        return True

    def walk_bitmaps(self) -> None:
        """qcow2.rst "Bitmaps": directory, each bitmap table, each table entry's data
        cluster (offset 0 means all zeros/all ones and owns nothing)."""
        if self.bitmap_directory is None:
            return
        dir_offset, dir_size, directory = self.bitmap_directory
        self.inc(dir_offset, dir_size)
        for entry in directory:
            self.inc(entry.table_offset, entry.table_size * 8)
            for e in self.read_table(entry.table_offset, entry.table_size * 8):
                offset = e & bitmaps.TABLE_ENTRY_OFFSET_MASK
                if e & bitmaps.TABLE_ENTRY_RESERVED or offset and (
                        offset % self.cs or e & bitmaps.TABLE_ENTRY_ALL_ONES):
                    self.corruption(f"ERROR bitmap '{entry.name}' table entry {e:x} is "
                                    "invalid")
                elif offset:
                    self.inc(offset, self.cs)

    def walk_refblocks(self) -> bool:
        """Count the refcount blocks (qemu's check_refblocks): each must be valid and
        referenced once, or the structure has to be rebuilt."""
        rebuild = False
        for i, e in enumerate(self.stored.table):
            offset = e & ~REFTABLE_ENTRY_RESERVED
            if e & REFTABLE_ENTRY_RESERVED:
                self.corruption(f"ERROR refcount table entry {i} has reserved bits set")
                rebuild = True
            elif offset % self.cs:
                self.corruption(f"ERROR refcount block {i} is not cluster aligned; "
                                "refcount table entry corrupted")
                rebuild = True
            elif offset >> self.cb >= len(self.counts):
                self.corruption(f"ERROR refcount block {i} is outside image")
                rebuild = True
            elif offset:
                self.inc(offset, self.cs)
                self.refcount_structure.append((offset, self.cs))
                count = self.counts[offset >> self.cb]
                if count != 1:
                    self.corruption(f"ERROR refcount block {i} refcount={count}")
                    rebuild = True
        return rebuild

    # -- comparing with the stored refcounts (compare_refcounts) -------------------------

    def compare(self, fix: int, rebuild: bool) -> tuple[bool, int]:
        """Compare per cluster, repairing what `fix` allows; returns (rebuild needed,
        highest cluster in use by either count)."""
        counts = self.counts
        per_block = self.stored.per_block
        highest = 0
        self.progress.add_total(-(-len(counts) // per_block))
        for index in range(-(-len(counts) // per_block)):
            start = index * per_block
            computed = counts[start:start + per_block]
            try:
                block = self.stored.block(index)
            except Unreadable as e:
                for c in range(start, start + len(computed)):
                    self.check_error(f"Can't get refcount for cluster {c}: {e}")
                continue
            stored = self._stored_values(block, len(computed))
            used = max(last_nonzero(stored), last_nonzero(computed))
            if used >= 0:
                highest = start + used
            if stored != computed:
                rebuild |= self._compare_block(fix, start, stored, computed)
            self.progress.step()
        if fix:
            self.stored.write_back()
        self.highest = highest
        return rebuild, highest

    def _stored_values(self, block, n: int) -> array:
        if block is None:
            return array(self.typecode, bytes(array(self.typecode).itemsize * n))
        if isinstance(block, WordBlock):
            return block.entries[:n]
        return array(self.typecode, (block.get(i) for i in range(n)))

    def _compare_block(self, fix: int, start: int, stored, computed) -> bool:
        r = self.result
        rebuild = False
        for i, (have, want) in enumerate(zip(stored, computed)):
            if have == want:
                continue
            c = start + i
            fixed = None
            if have == 0:
                rebuild = True  # no refcount block to raise, or one to trust: rebuild
            elif have > want and fix & FIX_LEAKS:
                fixed = "leaks_fixed"
            elif have < want and fix & FIX_ERRORS:
                fixed = "corruptions_fixed"
            label = "Repairing" if fixed else "ERROR" if have < want else "Leaked"
            r.messages.append(f"{label} cluster {c} refcount={have} reference={want}")
            if fixed:
                self.stored.set(c, want)
                setattr(r, fixed, getattr(r, fixed) + 1)
            elif have < want:
                r.corruptions += 1
            else:
                r.leaks += 1
        return rebuild

    # -- COPIED flags of the active tables (check_oflag_copied) --------------------------

    def check_copied(self, fix: int) -> None:
        """COPIED set iff the stored refcount is 1 (rule 5), in the active L1 and L2
        tables. With -r leaks only repaired when nothing else is wrong, as qemu does."""
        r = self.result
        repair = bool(fix & FIX_ERRORS) or bool(
            fix & FIX_LEAKS and not (r.check_errors or r.corruptions or r.leaks))
        h = self.h
        l1 = self.read_table(h.l1_table_offset, h.l1_size * 8)
        for i, e in nonzero(l1):
            l2_offset = e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self._stored_or_none(l2_offset)
            if refcount is None:
                continue
            if (refcount == 1) != bool(e & OFLAG_COPIED):
                r.messages.append(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 "
                                  f"cluster: l1_index={i} l1_entry={e:x} refcount={refcount}")
                if repair:
                    l1[i] = e ^ OFLAG_COPIED
                    self.file.pwrite(encode_table(l1[i:i + 1]), h.l1_table_offset + 8 * i)
                    r.corruptions_fixed += 1
                else:
                    r.corruptions += 1
            self._check_copied_l2(l2_offset, repair)
        if repair:
            self.file.sync(Barrier.REPAIR)

    def _check_copied_l2(self, l2_offset: int, repair: bool) -> None:
        r = self.result
        if self.h.external_data:
            return  # data file clusters have no refcount to agree with
        # Kept entries lack their indices, which only a repair needs; a repair may also
        # have changed the table since (fix_unaligned_zero).
        kept = None if repair else self.kept_l2.get(l2_offset)
        table = self.read_table(l2_offset, self.cs) if kept is None else kept
        changed = 0
        for j, e, kind, _bitmap in l2_entries(table, self.h.version,
                                              extended=self.h.extended_l2):
            offset = e & L2E_OFFSET_MASK
            if kind not in (DATA, ZERO) or not offset:
                continue
            refcount = self._stored_or_none(offset)
            if refcount is None or (refcount == 1) == bool(e & OFLAG_COPIED):
                continue
            r.messages.append(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data "
                              f"cluster: l2_entry={e:x} refcount={refcount}")
            if repair:
                table[j] = e ^ OFLAG_COPIED
                changed += 1
            else:
                r.corruptions += 1
        if changed:
            if l2_offset % self.cs or l2_offset + self.cs > self.file_size:
                r.corruptions += changed
                self.check_error(f"ERROR: Could not write L2 table at 0x{l2_offset:x}")
                return
            self.file.pwrite(encode_table(table), l2_offset)
            r.corruptions_fixed += changed

    def _stored_or_none(self, offset: int):
        try:
            return self.stored.get(offset >> self.cb)
        except Unreadable:
            return None
