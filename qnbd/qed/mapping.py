"""The read side of QED: guest ranges to runs, reads, block status. qed_spec.txt,
"Logical offset translation", "Unallocated L2 tables and data clusters" and "Zero data
clusters".

A range maps to runs [guest offset, length, kind, host offset]: DATA (host-contiguous),
ZERO (offset 1: zeros, the backing file does not show through) and UNALLOCATED (offset
0, or no L2 table: the backing file shows through, zeros past its end or without one).
Reads, block status and the writer's copy-on-write all start from the same runs.
"""

from ..block.base import HOLE, ZERO as ZERO_FLAG, Extent, LayerExtent
from ..block.extents import append_extent, backing_extents
from .tables import UNALLOCATED, ZERO, Tables

DATA = 2
# L2 tables one block-status call maps at most: callers ask again for the rest (see
# qnbd/qcow2/mapping.py, status_span).
MAX_STATUS_TABLES = 64


class Mapper:
    def __init__(self, tables: Tables):
        self.tables = tables
        self.geometry = tables.geometry
        self.data = tables.storage
        self.backing = None  # set by the image once its chain is open

    def map(self, offset: int, length: int) -> list[list]:
        g = self.geometry
        cs, shift = g.cluster_size, g.table_shift
        l2_mask = g.entries - 1
        runs: list[list] = []
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> shift
            table_end = min(end, (l1_index + 1) << shift)
            table = self.tables.l2_for_read(l1_index)
            if table is None:
                _append(runs, pos, table_end - pos, UNALLOCATED, 0)
                pos = table_end
                continue
            i = (pos >> g.cluster_bits) & l2_mask
            while pos < table_end:
                entry = table[i]
                in_cluster = pos & (cs - 1)
                n = min(cs - in_cluster, table_end - pos)
                if entry == UNALLOCATED or entry == ZERO:
                    _append(runs, pos, n, entry, 0)
                else:
                    self.tables.check_data_offset(entry, writing=False)
                    _append(runs, pos, n, DATA, entry + in_cluster)
                pos += n
                i += 1
        return runs

    # -- reading -----------------------------------------------------------------------

    def read(self, offset: int, length: int):
        runs = self.map(offset, length)
        if len(runs) == 1:
            return self.read_run(*runs[0])
        buf = bytearray(length)
        view = memoryview(buf)
        for guest, n, kind, host in runs:
            start = guest - offset
            if kind == DATA:
                got = self.data.preadinto(view[start:start + n], host)
                if got < n:  # a hole at the end of the file: zeros
                    view[start + got:start + n] = bytes(n - got)
            elif kind == UNALLOCATED and self.backing is not None:
                self.read_backing_into(guest, view[start:start + n])
        return buf

    def read_parts(self, offset: int, length: int) -> list:
        """(length, data) pieces, data None where the range reads as zeros for certain
        (zero clusters, unallocated without backing data), in one mapping pass."""
        parts: list = []
        backing = self.backing
        for guest, n, kind, host in self.map(offset, length):
            if kind == ZERO or kind == UNALLOCATED and (
                    backing is None or guest >= backing.size):
                if parts and parts[-1][1] is None:
                    parts[-1] = (parts[-1][0] + n, None)
                else:
                    parts.append((n, None))
            else:
                parts.append((n, self.read_run(guest, n, kind, host)))
        return parts

    def read_run(self, guest: int, n: int, kind: int, host: int):
        if kind == DATA:
            data = self.data.pread(n, host)
            return data if len(data) == n else data + bytes(n - len(data))
        buf = bytearray(n)
        if kind == UNALLOCATED and self.backing is not None:
            self.read_backing_into(guest, memoryview(buf))
        return buf

    def read_backing_into(self, offset: int, dst: memoryview) -> None:
        """"The backing file may be smaller than the image file and reads of unallocated
        areas beyond the end of the backing file produce zeroes.\""""
        n = min(len(dst), self.backing.size - offset)
        if n > 0:
            dst[:n] = self.backing.read(offset, n)

    # -- block status ------------------------------------------------------------------

    def status_span(self, offset: int, length: int) -> int:
        shift = self.geometry.table_shift
        l1 = self.tables.l1
        allocated = 0
        for l1_index in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            if l1[l1_index]:
                allocated += 1
                if allocated > MAX_STATUS_TABLES:
                    return (l1_index << shift) - offset
        return length

    def extents(self, offset: int, length: int) -> list[Extent]:
        extents: list[Extent] = []
        for guest, n, kind, _host in self.map(offset, length):
            if kind == UNALLOCATED and self.backing is not None:
                for e in backing_extents(self.backing, guest, n):
                    append_extent(extents, e)
            elif kind == UNALLOCATED:
                append_extent(extents, Extent(n, HOLE | ZERO_FLAG, 0))
            elif kind == ZERO:
                append_extent(extents, Extent(n, HOLE | ZERO_FLAG, 1))
            else:
                append_extent(extents, Extent(n, 0, 1))
        return extents


    def layer_status(self, offset: int, length: int, path: str) -> list[LayerExtent]:
        """This image alone, for qemu-img map (qemu's bdrv_qed_co_block_status): data
        clusters with their offset in `path`, zero clusters, and unallocated ones that
        leave the answer to the backing file."""
        return [LayerExtent(n, True, False, host, path) if kind == DATA
                else LayerExtent(n, False, kind == ZERO, None, None)
                for _guest, n, kind, host in self.map(offset,
                                                      self.status_span(offset, length))]


def _append(runs: list, pos: int, n: int, kind: int, host: int) -> None:
    if runs:
        last = runs[-1]
        if last[2] == kind and (kind != DATA or last[3] + last[1] == host):
            last[1] += n
            return
    runs.append([pos, n, kind, host])
