"""The write side of QED: writes, copy-on-write, write-zeroes and discard.
qed_spec.txt, "Unallocated L2 tables and data clusters" and "Zero data clusters"; what
QEMU's qed.c does (qed_aio_write_alloc, qed_aio_write_cow, qed_aio_write_inplace).

Writes to allocated clusters go in place. Writes to unallocated or zero clusters take
new clusters at the end of the file (tables.py) filled with the backing file's data (or
zeros) around the bytes written, and then point the L2 entries at them; a missing L2
table is allocated the same way. Before the first such change of metadata since the
image was last consistent on disk, `before_metadata` (image.py) makes NEED_CHECK
durable (docs/DESIGN.md rule 12).

QED has no refcounts: a cluster no table points to is leaked until a check. So nothing
here drops a reference to a data cluster: zeroing or discarding an allocated cluster
punches a hole in it (it reads zeros and gives its space back, and stays referenced);
only unallocated clusters become zero clusters, where a backing file would show through.
"""

from ..errors import NotFast
from .mapping import DATA, Mapper
from .tables import UNALLOCATED, ZERO, Tables


class Writer:
    def __init__(self, tables: Tables, mapper: Mapper, size: int, before_metadata):
        self.tables = tables
        self.size = size
        self.mapper = mapper
        self.storage = tables.storage
        self.geometry = tables.geometry
        self._before_metadata = before_metadata

    def _spans(self, offset: int, length: int):
        """(l1_index, runs) per L2 table the range touches."""
        shift = self.geometry.table_shift
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> shift
            table_end = min(end, (l1_index + 1) << shift)
            yield l1_index, self.mapper.map(pos, table_end - pos)
            pos = table_end

    def _table(self, l1_index: int):
        """The L2 table of an entry, allocated when missing (a metadata change)."""
        table = self.tables.l2_for_read(l1_index)
        if table is None:
            self._before_metadata()
            table = self.tables.new_l2(l1_index)
        return table

    def _set(self, l1_index: int, guest: int, values: list) -> None:
        table = self._table(l1_index)
        first = (guest >> self.geometry.cluster_bits) & (self.geometry.entries - 1)
        self._before_metadata()
        self.tables.set_entries(l1_index, table, first, values)

    # -- writes ------------------------------------------------------------------------

    def write(self, offset: int, view: memoryview) -> None:
        for l1_index, runs in self._spans(offset, len(view)):
            for guest, n, kind, host in runs:
                data = view[guest - offset:guest - offset + n]
                if kind == DATA:
                    self._check_in_place(host, n)
                    self.storage.pwrite(data, host)
                else:
                    self._allocate(l1_index, guest, data, kind)

    def _check_in_place(self, host: int, n: int) -> None:
        cs = self.geometry.cluster_size
        first = host - host % cs
        for cluster in range(first, host + n, cs):
            self.tables.check_data_offset(cluster, writing=True)

    def _allocate(self, l1_index: int, guest: int, data: memoryview, kind: int) -> None:
        """New clusters for a run of unallocated or zero clusters (one L2 table): the
        bytes written, with copy-on-write from the backing file (unallocated) or zeros
        (zero clusters: "Writes to a zero data cluster...") around them."""
        cs = self.geometry.cluster_size
        start = guest - guest % cs
        end = guest + len(data)
        end += -end % cs
        head, tail = guest - start, end - guest - len(data)
        self._table(l1_index)  # the table first: clusters after it are data
        self._before_metadata()
        host = self.tables.allocate(end - start)
        if head or tail:
            buf = bytearray(end - start)
            view = memoryview(buf)
            view[head:head + len(data)] = data
            if kind == UNALLOCATED and self.mapper.backing is not None:
                if head:
                    self.mapper.read_backing_into(start, view[:head])
                if tail:
                    self.mapper.read_backing_into(end - tail, view[len(buf) - tail:])
            self.storage.pwrite(buf, host)
        else:
            self.storage.pwrite(data, host)
        self._set(l1_index, start, list(range(host, host + end - start, cs)))

    # -- zeroes and discard ------------------------------------------------------------

    def _whole(self, offset: int, length: int) -> tuple[int, int]:
        """The whole clusters of a range; a range that ends at the end of the image
        takes its last cluster whole (the rest of it is not part of the image)."""
        cs = self.geometry.cluster_size
        stop = offset + length
        start = min(stop, offset + -offset % cs)
        end = stop + -stop % cs if stop == self.size else stop - stop % cs
        return start, max(start, end)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        start, end = self._whole(offset, length)
        stop = offset + length
        partial = [(o, n) for o, n in ((offset, start - offset), (end, stop - end))
                   if n > 0 and not self._reads_zero(o, n)]
        if fast and partial:
            raise NotFast()
        self.zero_clusters(start, end - start, may_trim, fast)
        for o, n in partial:
            self.write(o, memoryview(bytes(n)))

    def discard(self, offset: int, length: int) -> None:
        """Whole clusters read as zeros afterwards; partial ones are left as they are."""
        start, end = self._whole(offset, length)
        if end > start:
            self.zero_clusters(start, end - start, may_trim=True, fast=False)

    def zero_clusters(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        """Make whole clusters read as zeros without dropping any reference: allocated
        ones are punched (may_trim) or overwritten, unallocated ones over backing data
        become zero clusters, zero clusters and unallocated ones without anything below
        already read zeros."""
        backing = self.mapper.backing
        for l1_index, runs in self._spans(offset, length):
            for guest, n, kind, host in runs:
                if kind == DATA:
                    self._check_in_place(host, n)
                    if not (may_trim and self.storage.punch_hole(host, n)):
                        if fast:
                            raise NotFast()
                        self.storage.pwrite(bytes(n), host)
                elif kind == UNALLOCATED and backing is not None and guest < backing.size:
                    self._set(l1_index, guest, [ZERO] * (n >> self.geometry.cluster_bits))

    def _reads_zero(self, offset: int, length: int) -> bool:
        return all(p is None or not any(p) for _, p in self.mapper.read_parts(offset, length))
