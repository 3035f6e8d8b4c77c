"""The read side of cluster mapping for images with extended L2 entries (qcow2.rst,
"Extended L2 Entries", incompatible bit 4): each standard cluster is 32 subclusters,
each allocated in the host cluster, reading as zeros, or unallocated (the backing file
shows through); compressed clusters have no subclusters. What QEMU's
qcow2_get_subcluster_type does.

The runs are the ones mapping.py describes, at subcluster resolution, so reads, read
plans, block status and layer_status work unchanged on top of them. The image without
extended entries never comes here: its hot path keeps its one-word lookup.
"""

from ..errors import IOFailure
from .entries import (ALL_SUBCLUSTERS, COMPRESSED, DATA, L2E_OFFSET_MASK, SUBCLUSTERS,
                      UNALLOCATED, ZERO, bitmap_problem, classify_extended)
from .mapping import Mapper, _append_run


class ExtendedMapper(Mapper):
    def map(self, offset: int, length: int) -> list[list]:
        layout = self.layout
        cb, cs, sb = layout.cluster_bits, layout.cluster_size, layout.subcluster_bits
        table_shift = layout.table_shift
        l2_mask = (1 << layout.l2_bits) - 1
        l2_for_read = self.tables.l2_for_read
        runs: list[list] = []
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            table = l2_for_read(l1_index)
            if table is None:
                _append_run(runs, pos, table_end - pos, UNALLOCATED, 0)
                pos = table_end
                continue
            i = ((pos >> cb) & l2_mask) << 1
            while pos < table_end:
                entry, bitmap = table[i], table[i + 1]
                in_cluster = pos & (cs - 1)
                cluster_end = min(pos - in_cluster + cs, table_end)
                kind = self.check_entry(entry, bitmap)
                if kind == COMPRESSED:
                    runs.append([pos, cluster_end - pos, COMPRESSED, entry])
                else:
                    host = entry & L2E_OFFSET_MASK if kind == DATA else 0
                    self._map_subclusters(runs, pos, cluster_end, host, bitmap, cs, sb)
                pos = cluster_end
                i += 2
        return runs

    @staticmethod
    def _map_subclusters(runs, pos, end, host, bitmap, cs, sb):
        """Runs for guest [pos, end) inside one standard cluster, subcluster by
        subcluster (the common all-allocated and all-unallocated cases in one run)."""
        host_in = host - (pos & ~(cs - 1))  # guest offset -> host offset in this cluster
        if bitmap == ALL_SUBCLUSTERS:
            _append_run(runs, pos, end - pos, DATA, pos + host_in)
            return
        if not bitmap:
            _append_run(runs, pos, end - pos, UNALLOCATED, pos + host_in if host else 0)
            return
        zero = bitmap >> SUBCLUSTERS
        while pos < end:
            sc = (pos & (cs - 1)) >> sb
            n = min(((pos >> sb) + 1) << sb, end) - pos
            if bitmap >> sc & 1:
                _append_run(runs, pos, n, DATA, pos + host_in)
            elif zero >> sc & 1:
                _append_run(runs, pos, n, ZERO, pos + host_in if host else 0)
            else:
                _append_run(runs, pos, n, UNALLOCATED, pos + host_in if host else 0)
            pos += n

    def check_entry(self, entry: int, bitmap: int) -> int:
        """The descriptor's kind, once the entry is known to be valid: anything else marks
        the image corrupt and fails the request (rule 7), as QEMU's
        QCOW2_SUBCLUSTER_INVALID does."""
        kind = classify_extended(entry, self.layout.external)
        problem = bitmap_problem(kind, bitmap)
        if problem:
            reason = f"L2 entry 0x{entry:016x} with bitmap 0x{bitmap:016x}: {problem}"
            self._mark_corrupt(reason)
            raise IOFailure(reason)
        if kind == COMPRESSED and self.layout.external:
            self.bad_entry(entry, "a compressed cluster in an image with an external "
                           "data file")
        if kind == DATA and entry & L2E_OFFSET_MASK & (self.layout.cluster_size - 1):
            self.bad_entry(entry)
        return kind

    def cluster_content(self, entry: int, kind: int, guest_cluster: int) -> bytearray:
        """A whole guest cluster as the guest sees it now, whatever its subclusters hold
        (copy-on-write of a shared or compressed cluster)."""
        return bytearray(self.read(guest_cluster, self.layout.cluster_size))
