"""The write side of cluster mapping for images with extended L2 entries (qcow2.rst,
"Extended L2 Entries"): writes allocate the host cluster but only fill the subclusters
they touch, copying on write just the parts of the first and last subcluster they
leave out; write-zeroes and discard work per subcluster, in the bitmap. What QEMU's
qcow2-cluster.c does with subclusters (handle_alloc_space, zero_l2_subclusters).

The ordering rules are writer.py's, unchanged: a new host cluster is allocated before
the entry maps it (rule 2), data is written before the entry changes (rule 4, through
the L2 cache's barrier), and a reference the entry drops is released only once that
change is durable (rule 3).
"""

import functools

from ..errors import NotFast
from .entries import (ALL_SUBCLUSTERS, COMPRESSED, DATA, L2E_OFFSET_MASK, OFLAG_COPIED,
                      SUBCLUSTERS, UNALLOCATED, subcluster_mask)
from .writer import ClusterWriter, _WriteGather

_ALL_ZERO = ALL_SUBCLUSTERS << SUBCLUSTERS


class ExtendedWriter(ClusterWriter):
    def _write_in_table(self, l1_index: int, pos: int, data, plan) -> None:
        layout = self.layout
        cs, sb, external = layout.cluster_size, layout.subcluster_bits, layout.external
        check_entry = self.mapper.check_entry
        table_offset, table = self._l2_for_write(l1_index)
        i = layout.l2_index(pos) << 1
        # Rule 8 guards the image file; a data file holds no metadata to overlap.
        writes = _WriteGather(self.data, None if external else self.metadata, plan)
        updates = []
        dropped = []  # (entry, kind) whose reference goes once the entries change
        done = 0
        while done < len(data):
            guest = pos + done
            in_cluster = guest & (cs - 1)
            n = min(cs - in_cluster, len(data) - done)
            chunk = data[done:done + n]
            entry, bitmap = table[i], table[i + 1]
            kind = check_entry(entry, bitmap)
            host = entry & L2E_OFFSET_MASK
            cluster = guest - in_cluster
            if external and kind == DATA and host != cluster:
                self.mapper.bad_entry(entry, "a data file offset other than its guest offset")
            first, end = in_cluster >> sb, ((in_cluster + n - 1) >> sb) + 1
            touched = subcluster_mask(first, end)
            alloc, zero = bitmap & ALL_SUBCLUSTERS, bitmap >> SUBCLUSTERS
            if external:
                new_host = cluster  # qcow2.rst: host offset = guest offset, not refcounted
            elif kind == DATA and entry & OFLAG_COPIED:
                new_host = host
            else:
                new_host = self.refcounts.allocate(1)
                dropped.append((entry, kind))
                if plan is not None:
                    plan.on_abort(functools.partial(self.queue_release, new_host, cs))
            if new_host != host and kind != UNALLOCATED:
                # A shared or compressed cluster moves whole: its allocated subclusters
                # (all of a compressed one, which has no subclusters) come along.
                content = self.mapper.cluster_content(entry, kind, cluster)
                content[in_cluster:in_cluster + n] = chunk
                writes.add(new_host, content)
                alloc = ALL_SUBCLUSTERS if kind == COMPRESSED else alloc
            else:
                self._write_subclusters(writes, new_host, cluster, in_cluster, chunk,
                                        alloc if new_host == host else 0, first, end)
            alloc |= touched
            zero &= ~touched
            updates.append((i, new_host | OFLAG_COPIED, zero << SUBCLUSTERS | alloc))
            done += n
            i += 2
        writes.flush()
        self._install(table_offset, updates, dropped, plan)

    def _set_entries(self, table, updates: list) -> None:
        for i, entry, bitmap in updates:
            table[i] = entry
            table[i + 1] = bitmap

    def _write_subclusters(self, writes: _WriteGather, host: int, cluster: int,
                           in_cluster: int, chunk, held: int, first: int, end: int) -> None:
        """Write `chunk` at `in_cluster` of the host cluster, widened to whole subclusters
        first..end-1: the bytes it leaves out of a subcluster that `held` (the bitmap of
        subclusters already in this host cluster) does not have are its current content,
        zeros or the backing file's (the copy-on-write of qemu's handle_alloc_space)."""
        sb = self.layout.subcluster_bits
        start = in_cluster if held >> first & 1 else first << sb
        stop = in_cluster + len(chunk) if held >> (end - 1) & 1 else end << sb
        if start < in_cluster:
            writes.add(host + start, self.mapper.read(cluster + start, in_cluster - start))
        writes.add(host + in_cluster, chunk)
        tail = in_cluster + len(chunk)
        if tail < stop:
            writes.add(host + tail, self.mapper.read(cluster + tail, stop - tail))

    # -- compressed clusters -----------------------------------------------------------

    def _set_compressed_entry(self, table, i: int, entry: int) -> None:
        table[2 * i] = entry
        table[2 * i + 1] = 0  # qcow2.rst: compressed clusters have no subcluster bitmap

    # -- zeroes and discard ------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        if fast and self._cuts_compressed(offset, offset + length):
            raise NotFast()  # part of a compressed cluster can only be zeroed by writing
        super().write_zeroes(offset, length, may_trim, fast)

    def _cuts_compressed(self, start: int, end: int) -> bool:
        """Whether [start, end) covers part, not all, of a compressed cluster (only the
        first and the last cluster can be cut)."""
        cs = self.layout.cluster_size
        for cluster in {start & ~(cs - 1), (end - 1) & ~(cs - 1)}:
            if not (start <= cluster and cluster + cs <= end) and any(
                    kind == COMPRESSED for _g, _n, kind, _v in self.mapper.map(cluster, 1)):
                return True
        return False

    def _zero_clusters(self, start: int, end: int, trim: bool) -> None:
        """Subclusters [start, end) read as zeros afterwards: their allocation bits
        cleared and zero bits set. A host cluster left with no allocated subcluster is
        released when trimming or when it is not ours alone. A compressed cluster has no
        subclusters: zeroed whole, it is dropped; zeroed in part, it is first rewritten
        as a standard cluster."""
        layout = self.layout
        cs, sb, table_shift = layout.cluster_size, layout.subcluster_bits, layout.table_shift
        backing = self.mapper.backing
        compressed_parts = []
        pos = start
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            if not self.tables.l1[l1_index] & L2E_OFFSET_MASK and backing is None:
                pos = table_end  # nothing mapped here and nothing shows through
                continue
            table_offset, table = self._l2_for_write(l1_index)
            if self.raw_data_file:
                self._zero_in_data_file(pos, table_end)
            changed = False
            while pos < table_end:
                in_cluster = pos & (cs - 1)
                n = min(cs - in_cluster, table_end - pos)
                i = layout.l2_index(pos) << 1
                mask = subcluster_mask(in_cluster >> sb, ((in_cluster + n - 1) >> sb) + 1)
                entry, bitmap = table[i], table[i + 1]
                kind = self.mapper.check_entry(entry, bitmap)
                if kind == COMPRESSED and mask != ALL_SUBCLUSTERS:
                    compressed_parts.append((pos, n))
                else:
                    new = self._zeroed(entry, bitmap, kind, mask, trim, backing is not None)
                    if new != (entry, bitmap):
                        table[i], table[i + 1] = new
                        changed = True
                pos += n
            if changed:
                self.tables.l2_cache.mark_dirty(table_offset, table)
        for offset, length in compressed_parts:
            # Decompressed into a standard cluster by the write, then zeroed in its bitmap.
            self._write_zero_data(offset, length)
            self._zero_clusters(offset, offset + length, trim)

    def _zeroed(self, entry: int, bitmap: int, kind: int, mask: int, trim: bool,
                backing: bool) -> tuple[int, int]:
        """The entry and bitmap once the subclusters in `mask` read as zeros."""
        if kind == COMPRESSED:  # the whole cluster
            self._release_entry(entry, kind)
            return 0, _ALL_ZERO if backing else 0
        alloc = bitmap & ALL_SUBCLUSTERS & ~mask
        zero = (bitmap >> SUBCLUSTERS | mask) << SUBCLUSTERS
        if kind == DATA and not alloc and (trim or not entry & OFLAG_COPIED):
            self._release_entry(entry, kind)
            entry = 0
        if not entry and not backing:
            # Nothing mapped and nothing to show through: every subcluster reads as zeros
            # already, and an empty entry says so most simply.
            zero = 0
        return entry, zero | alloc
