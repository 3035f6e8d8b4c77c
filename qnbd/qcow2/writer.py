"""The write side of cluster mapping: writes, copy-on-write, write-zeroes and discard.
qcow2.rst, "Cluster mapping"; what QEMU's qcow2-cluster.c does for writes.

Ordering (docs/DESIGN.md, "Rules of the qcow2 format"): new clusters are allocated
(refcount 1 in the refcount cache) before the L2 entry that maps them changes (rule 2);
data is written before the entry changes, and reaches the disk before the entry through
the L2 cache's barrier (rule 4); a cluster that loses its last reference is not freed at
once but queued until the change that dropped the reference is durable (rule 3), then
released by `apply_releases` and its space punched out of the file.

With an external data file (rule 13) guest clusters sit at their guest offset in that
file and are not refcounted: nothing is allocated or released for them, and with
`data_file_raw` every zeroed range is zeroed in the data file too, so that the file
alone stays the guest's disk.
"""

import functools
import logging
from array import array

from ..block.plan import HostWrite, WritePlan
from ..block.storage import Storage
from ..errors import IOFailure, NotFast
from .entries import (COMPRESSED, DATA, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                      OFLAG_COPIED, OFLAG_ZERO, UNALLOCATED, ZERO, classify)
from .layout import Layout
from .mapping import Mapper
from .metadata_map import MetadataMap
from .refcount import Refcounts, ReleaseRefused
from .tables import ClusterTables

log = logging.getLogger("qnbd.qcow2")

# Released clusters wait for a flush (rule 3); past this many, writes flush by themselves
# so that discarded space returns without waiting for the client.
MAX_PENDING_RELEASES = 4096


class ClusterWriter:
    def __init__(self, layout: Layout, tables: ClusterTables, refcounts: Refcounts,
                 mapper: Mapper, metadata: MetadataMap, data: Storage,
                 raw_data_file: bool = False):
        self.layout = layout
        self.raw_data_file = raw_data_file
        self.tables = tables
        self.refcounts = refcounts
        self.mapper = mapper
        self.metadata = metadata
        self.data = data
        self.pending_releases: list[tuple[int, int]] = []
        # The byte after the last compressed data written, to pack the next one there.
        self._compressed_end = 0

    # -- releases (rule 3) -------------------------------------------------------------

    def queue_release(self, offset: int, length: int) -> None:
        self.pending_releases.append((offset, length))

    def _release_entry(self, entry: int, kind: int) -> None:
        """Queue the drop of the reference an L2 entry held."""
        if self.layout.external:
            return  # data clusters of an external data file are not refcounted
        if kind == COMPRESSED:
            self.queue_release(*self.layout.compressed.host_range(entry))
        elif kind in (DATA, ZERO) and entry & L2E_OFFSET_MASK:
            self.queue_release(entry & L2E_OFFSET_MASK, self.layout.cluster_size)

    def too_many_releases(self) -> bool:
        return len(self.pending_releases) > MAX_PENDING_RELEASES

    def apply_releases(self) -> None:
        """Drop the queued references; the caller has made their removal durable."""
        pending, self.pending_releases = self.pending_releases, []
        self.mapper.forget_compressed()
        self._compressed_end = 0  # its cluster may be freed now, and reused for anything
        cb = self.layout.cluster_bits
        freed = []
        for offset, length in pending:
            try:
                freed.extend(self.refcounts.release(offset, length))
            except ReleaseRefused as e:
                # As qemu's qcow2_free_clusters: one line, the range is leaked, the flush
                # goes on (the reference is already gone from disk; nothing else depends
                # on this refcount, and no metadata was written on its account).
                log.error("%s: could not release host range 0x%x+%d: %s; leaked",
                          self.data.path, offset, length, e)
        for cluster in sorted(freed):
            if cluster in self.metadata.clusters:
                self.metadata.remove(cluster)
                self.tables.l2_cache.discard(cluster << cb)
        for start, count in _runs_of(sorted(freed)):
            self.tables.storage.punch_hole(start << cb, count << cb)

    # -- tables ------------------------------------------------------------------------

    def _l2_for_write(self, l1_index: int) -> tuple[int, array]:
        """The L2 table for `l1_index`, owned by this L1 entry alone (COPIED): allocated
        when missing, copied when shared with a snapshot."""
        tables = self.tables
        entry = tables.l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if offset and entry & OFLAG_COPIED:
            return offset, tables.l2_cache.get(offset)
        new_offset = self.refcounts.allocate(1)
        if offset:
            table = array("Q", tables.l2_cache.get(offset))
            self.queue_release(offset, self.layout.cluster_size)
        else:
            table = array("Q", bytes(self.layout.cluster_size))
        self.metadata.add(new_offset >> self.layout.cluster_bits)
        tables.l2_cache.mark_dirty(new_offset, table)
        # Rule 4: the L1 entry is written only after the new table (ClusterTables).
        tables.set_l1(l1_index, new_offset | OFLAG_COPIED)
        return new_offset, table

    # -- writes ------------------------------------------------------------------------

    def write(self, offset: int, view: memoryview) -> None:
        self._map_write(offset, view, None)

    def plan_write(self, offset: int, view: memoryview) -> WritePlan:
        """The write as a plan (qnbd/block/plan.py): clusters mapped and allocated now
        (refcounts first, rule 2), copy-on-write data made now, the data written by
        whoever performs the plan's HostWrites; the L2 entries change at its commit
        (rule 4), releases are queued then too (rule 3). Its abort queues the clusters
        allocated for it for release: they were never mapped."""
        plan = WritePlan()
        data = self.data
        data.plan_opened()
        plan.on_commit(lambda: data.landed(True))
        plan.on_abort(lambda: data.landed(False))
        try:
            self._map_write(offset, view, plan)
        except BaseException:
            plan.abort()
            raise
        return plan

    def _map_write(self, offset: int, view: memoryview, plan: WritePlan | None) -> None:
        table_shift = self.layout.table_shift
        pos, end = offset, offset + len(view)
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            self._write_in_table(l1_index, pos, view[pos - offset:table_end - offset], plan)
            pos = table_end

    def _write_in_table(self, l1_index: int, pos: int, data: memoryview,
                        plan: WritePlan | None) -> None:
        layout = self.layout
        cs, version, external = layout.cluster_size, layout.version, layout.external
        table_offset, table = self._l2_for_write(l1_index)
        i = layout.l2_index(pos)
        last = layout.l2_index(pos + len(data) - 1)
        # Rule 8 guards the image file; a data file holds no metadata to overlap.
        writes = _WriteGather(self.data, None if external else self.metadata, plan)
        updates = []
        dropped = []  # (entry, kind) whose reference goes once the entries change
        fresh: list[int] = []  # clusters allocated ahead, as one run, for what follows
        taken: list[int] = []  # of those, the ones an inline write has put data in
        done = 0
        try:
            while done < len(data):
                guest = pos + done
                in_cluster = guest & (cs - 1)
                n = min(cs - in_cluster, len(data) - done)
                chunk = data[done:done + n]
                entry = table[i]
                kind = classify(entry, version, external)
                host = entry & L2E_OFFSET_MASK
                if host & (cs - 1) and kind in (DATA, ZERO):
                    self.mapper.bad_entry(entry)  # never write (or free) at an unaligned offset
                if external and kind == DATA and host != guest - in_cluster:
                    self.mapper.bad_entry(entry, "a data file offset other than its guest offset")
                if kind == DATA and entry & OFLAG_COPIED:
                    writes.add(host + in_cluster, chunk)
                else:
                    if external:
                        host = guest - in_cluster  # qcow2.rst: host offset = guest offset
                    elif not _owned(entry, kind):
                        if not fresh:
                            fresh = self._allocate_run(table, i, last)
                        host = fresh.pop()
                        dropped.append((entry, kind))
                        if plan is None:
                            taken.append(host)
                        else:
                            plan.on_abort(functools.partial(self.queue_release, host, cs))
                    if n == cs:
                        writes.add(host, chunk)
                    elif self._reads_zero_before_write(kind) and self._past_eof(writes, host):
                        # Past the end of the file the cluster already reads as zeros: extend
                        # the file instead of writing the zeros around the data (as QEMU skips
                        # a copy-on-write from nothing).
                        self.data.truncate(host + cs)
                        writes.add(host + in_cluster, chunk)
                    else:
                        content = self.mapper.cluster_content(entry, kind, guest - in_cluster)
                        content[in_cluster:in_cluster + n] = chunk
                        writes.add(host, content)
                    updates.append((i, host | OFLAG_COPIED))
                done += n
                i += 1
            writes.flush()
        except BaseException:
            # Never mapped: queued for release with no wait for an unmapping (rule 3);
            # a plan's abort queues the ones it took (on_abort above).
            for host in fresh + taken:
                self.queue_release(host, cs)
            raise
        self._install(table_offset, updates, dropped, plan)

    def _install(self, table_offset: int, updates: list, dropped: list,
                 plan: WritePlan | None) -> None:
        """Rule 4 (data before the mapping): entries change only after the data writes
        succeeded (at once, or at the plan's commit), and reach the disk after the L2
        cache's barrier. Rule 3: the references they drop are released once that change
        is durable."""
        if not updates:
            return
        if plan is not None:
            plan.on_commit(functools.partial(self._install, table_offset, updates,
                                             dropped, None))
            return
        cache = self.tables.l2_cache
        # Taken from the cache again: while a plan's data was being written the table
        # may have been evicted (written back) and read again.
        table = cache.get(table_offset)
        self._set_entries(table, updates)
        cache.mark_dirty(table_offset, table)
        for entry, kind in dropped:
            self._release_entry(entry, kind)

    def _set_entries(self, table: array, updates: list) -> None:
        for i, entry in updates:
            table[i] = entry

    def _allocate_run(self, table: array, i: int, last: int) -> list[int]:
        """New clusters for entries i..last that need one, up to the first that does not,
        as contiguous as the free space allows so the data goes out in few host writes.
        Returned in reverse order, to be taken with pop()."""
        count = 1
        version = self.layout.version
        while i + count <= last and not _owned(table[i + count],
                                               classify(table[i + count], version)):
            count += 1
        first, taken = self.refcounts.allocate_some(count)
        return [first + (k << self.layout.cluster_bits) for k in range(taken - 1, -1, -1)]

    def _past_eof(self, writes: "_WriteGather", host: int) -> bool:
        writes.flush()  # gathered writes may end past the file's current end
        return host >= self.data.size()

    def _reads_zero_before_write(self, kind: int) -> bool:
        return kind == ZERO or (kind == UNALLOCATED and self.mapper.backing is None)

    # -- compressed clusters -----------------------------------------------------------

    def write_compressed(self, guest: int, data: bytes) -> None:
        """Map the guest cluster at `guest` to compressed `data` (qcow2.rst, "Compressed
        Clusters Descriptor"). As in qemu (qcow2_alloc_compressed_cluster_offset),
        compression never overwrites: the cluster must be unallocated or a zero cluster
        without a host cluster, so no reference is dropped."""
        layout = self.layout
        l1_index, i = guest >> layout.table_shift, layout.l2_index(guest)
        current = self.tables.l2_for_read(l1_index)
        if current is not None and current[i * layout.entry_words] & (L2E_OFFSET_MASK
                                                                     | OFLAG_COMPRESSED):
            raise IOFailure(f"cannot write a compressed cluster at 0x{guest:x}: the "
                            "cluster is already allocated")
        host = self._allocate_bytes(len(data))
        self.metadata.check_data_write(host, len(data))
        self.data.pwrite(data, host)
        table_offset, table = self._l2_for_write(l1_index)
        # Rule 4: the entry changes after the data is written (the L2 cache's barrier).
        sectors = ((host + len(data) - 1) >> 9) - (host >> 9)  # additional 512 B sectors
        self._set_compressed_entry(
            table, i, host | OFLAG_COMPRESSED | (sectors << layout.compressed.shift))
        self.tables.l2_cache.mark_dirty(table_offset, table)

    def _set_compressed_entry(self, table: array, i: int, entry: int) -> None:
        table[i] = entry

    def _allocate_bytes(self, size: int) -> int:
        """Host bytes for compressed data, packed after the previous compressed data as
        qemu's qcow2_alloc_bytes packs them: every host cluster the data touches takes one
        reference for it (what qemu-img check counts), a new cluster only when the rest
        of the current one is too short; data may run on into the next cluster when that
        is the one allocated."""
        cb, cs = self.layout.cluster_bits, self.layout.cluster_size
        offset = self._compressed_end
        refcounts = self.refcounts
        if offset and refcounts.get(offset >> cb) >= refcounts.max_refcount:
            offset = 0  # no room for one more reference (1-bit refcounts: never)
        free = -offset % cs
        if free >= size:
            refcounts.add(offset >> cb, 1)
        else:
            new = refcounts.allocate(1)  # its refcount: this data's reference
            if free and new == offset + free:
                refcounts.add(offset >> cb, 1)
            else:
                offset = new
        self._compressed_end = offset + size
        return offset

    # -- zeroes and discard ------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        # The unit an entry zeroes: a cluster, or a subcluster with extended L2 entries.
        unit = self.layout.subcluster_size
        size = self.layout.size
        first_full = -(-offset // unit) * unit
        end_full = (offset + length) // unit * unit
        # The image's tail may end inside a unit: that unit counts as whole.
        if offset + length == size and size % unit:
            end_full = -(-size // unit) * unit
        if first_full >= end_full:
            partials = [(offset, length)]
            first_full = end_full = None
        else:
            partials = [(offset, first_full - offset), (end_full, offset + length - end_full)]
            partials = [(o, n) for o, n in partials if 0 < n and o < size]
        partials = [(o, n) for o, n in partials
                    if n > 0 and not self.mapper.reads_zero(o, n)]
        v2_backing = self.layout.version < 3 and self.mapper.backing is not None
        if fast and (partials or (v2_backing and first_full is not None)):
            raise NotFast()
        for o, n in partials:
            self._write_zero_data(o, n)
        if first_full is not None:
            if v2_backing:
                # No zero flag in v2: zeros must be written for the backing not to show.
                self._write_zero_data(first_full, min(end_full, size) - first_full)
            else:
                self._zero_clusters(first_full, end_full, trim=may_trim)

    def discard(self, offset: int, length: int) -> None:
        unit = self.layout.subcluster_size
        size = self.layout.size
        start = -(-offset // unit) * unit
        end = (offset + length) // unit * unit
        if offset + length == size:
            end = -(-size // unit) * unit
        # v2 cannot hide a backing file's data without writing zeros: discard is advisory,
        # so it does nothing there.
        if start < end and not (self.layout.version < 3 and self.mapper.backing is not None):
            self._zero_clusters(start, end, trim=True)

    def _write_zero_data(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        while length > 0:
            n = min(chunk, length)
            self.write(offset, memoryview(zeros)[:n])
            offset += n
            length -= n

    def _zero_clusters(self, start: int, end: int, trim: bool) -> None:
        """Whole units (layout.subcluster_size) [start, end) read as zeros afterwards
        (here clusters; extended_writer.py does subclusters). v3 uses the zero flag
        (keeping our own allocation unless trimming); without a backing file an
        unallocated entry reads as zeros too, which is also v2's only way."""
        layout = self.layout
        cb, table_shift = layout.cluster_bits, layout.table_shift
        pos = start
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            if not self.tables.l1[l1_index] & L1E_OFFSET_MASK and self.mapper.backing is None:
                pos = table_end  # nothing mapped here and nothing shows through
                continue
            table_offset, table = self._l2_for_write(l1_index)
            if self.raw_data_file:
                self._zero_in_data_file(pos, table_end)
            i = layout.l2_index(pos)
            changed = False
            for _ in range((table_end - pos) >> cb):
                entry = table[i]
                new = self._zeroed_entry(entry, trim)
                if new != entry:
                    if not new & L2E_OFFSET_MASK:
                        self._release_entry(entry, classify(entry, layout.version,
                                                            layout.external))
                    table[i] = new
                    changed = True
                i += 1
            if changed:
                self.tables.l2_cache.mark_dirty(table_offset, table)
            pos = table_end

    def _zero_in_data_file(self, start: int, end: int) -> None:
        """data_file_raw: the data file reads as zeros where the guest does (punched,
        or written where the file system cannot punch); before the entries change, and
        synced before them by the L2 cache's barrier (rule 13)."""
        end = min(end, self.layout.size)
        if end <= start or self.data.punch_hole(start, end - start):
            return
        zeros = bytes(min(1 << 20, end - start))
        while start < end:
            n = min(len(zeros), end - start)
            self.data.pwrite(memoryview(zeros)[:n], start)
            start += n

    def map_raw(self, start: int, end: int) -> None:
        """data_file_raw (rule 13): every unallocated guest cluster in [start, end) mapped
        to the same offset of the data file, as qemu's metadata preallocation maps a
        raw data file's clusters (qcow2_co_truncate); the data file holds them already."""
        layout = self.layout
        cs, table_shift = layout.cluster_size, layout.table_shift
        pos = start // cs * cs
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            table_offset, table = self._l2_for_write(l1_index)
            words = layout.entry_words
            for guest in range(pos, table_end, cs):
                # An extended entry's bitmap stays 0, as in qemu's preallocation.
                i = layout.l2_index(guest) * words
                if not any(table[i:i + words]):
                    table[i] = guest | OFLAG_COPIED
            self.tables.l2_cache.mark_dirty(table_offset, table)
            pos = table_end

    def _zeroed_entry(self, entry: int, trim: bool) -> int:
        version = self.layout.version
        kind = classify(entry, version, self.layout.external)
        host = entry & L2E_OFFSET_MASK
        if host & (self.layout.cluster_size - 1) and kind in (DATA, ZERO):
            self.mapper.bad_entry(entry)  # keeping or freeing it would hit wrong clusters
        if kind in (DATA, ZERO) and host and entry & OFLAG_COPIED and not trim \
                and version >= 3:
            return host | OFLAG_COPIED | OFLAG_ZERO
        if kind == ZERO and not host:
            return entry
        return OFLAG_ZERO if self.mapper.backing is not None else 0


def _owned(entry: int, kind: int) -> bool:
    """A cluster this entry alone references (COPIED), writable in place: data, or a
    preallocated zero cluster (filled in place)."""
    return kind in (DATA, ZERO) and bool(entry & OFLAG_COPIED) \
        and bool(entry & L2E_OFFSET_MASK)


class _WriteGather:
    """Coalesces writes to consecutive host offsets into one pwritev (or, for a plan,
    one HostWrite); every write is checked against the metadata map first (rule 8)."""

    def __init__(self, data: Storage, metadata: MetadataMap | None,
                 plan: WritePlan | None = None):
        self.data = data
        self.metadata = metadata
        self.plan = plan
        self.start = 0
        self.end = 0
        self.buffers: list = []

    def add(self, host: int, data) -> None:
        if self.buffers and host != self.end:
            self.flush()
        if not self.buffers:
            self.start = self.end = host
        if self.metadata is not None:
            self.metadata.check_data_write(host, len(data))
        self.buffers.append(data)
        self.end += len(data)

    def flush(self) -> None:
        if not self.buffers:
            return
        if self.plan is None:
            self.data.pwritev(self.buffers, self.start)
        else:
            self.data.planned(self.start, self.end - self.start)
            self.plan.writes.append(HostWrite(self.data.file, self.start, self.buffers))
        self.buffers = []


def _runs_of(clusters: list[int]):
    """(first, count) for each run of consecutive numbers in a sorted list."""
    start = prev = None
    for c in clusters:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            yield start, prev - start + 1
            start = prev = c
    if start is not None:
        yield start, prev - start + 1
