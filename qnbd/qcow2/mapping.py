"""The read side of cluster mapping: guest ranges to host runs, reads, block status.
qcow2.rst, "Cluster mapping" and "Compressed Clusters Descriptor"; what QEMU's
qcow2-cluster.c does for reads (qcow2_get_host_offset).

A range maps to runs [guest offset, length, kind, value]: DATA (host-contiguous, value
the host offset), COMPRESSED (one cluster a run, value the L2 entry), ZERO (value the
preallocated host offset, host-contiguous, or 0 for none) and UNALLOCATED (the backing
file shows through, or zeros; value 0, or with extended L2 entries the host offset of
an unallocated subcluster in an allocated cluster). Reads, block status, copy-on-write
and qemu-img map's view (layer_status) all start from the same runs.
"""

from ..block.base import HOLE, ZERO as ZERO_FLAG, Extent, LayerExtent
from ..block.extents import append_extent, backing_extents
from ..block.plan import HostRead
from ..block.storage import Storage
from ..errors import IOFailure
from .compression import decompress
from .entries import (COMPRESSED, DATA, L1E_OFFSET_MASK, L2E_OFFSET_MASK, UNALLOCATED, ZERO,
                      classify, run_end)
from .layout import Layout
from .tables import ClusterTables

# L2 tables one block-status call maps at most (see Mapper.status_span).
MAX_STATUS_TABLES = 64


class Mapper:
    def __init__(self, layout: Layout, tables: ClusterTables, data: Storage,
                 compression_type: int, mark_corrupt):
        self.layout = layout
        self.tables = tables
        self.data = data
        self.compression_type = compression_type
        self._mark_corrupt = mark_corrupt
        self.backing = None  # set by the image once its chain is open
        self._compressed_cache: tuple[int, bytes] | None = None

    # -- mapping -----------------------------------------------------------------------

    def map(self, offset: int, length: int) -> list[list]:
        layout = self.layout
        cb = layout.cluster_bits
        cs = layout.cluster_size
        table_shift = layout.table_shift
        l2_mask = (1 << layout.l2_bits) - 1
        version = layout.version
        external = layout.external
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
            i = (pos >> cb) & l2_mask
            while pos < table_end:
                entry = table[i]
                in_cluster = pos & (cs - 1)
                kind = classify(entry, version, external)
                if kind == COMPRESSED:
                    if external:
                        self.bad_entry(entry, "a compressed cluster in an image with an "
                                       "external data file")
                    n = min(cs - in_cluster, table_end - pos)
                    runs.append([pos, n, COMPRESSED, entry])
                    pos += n
                    i += 1
                    continue
                host = entry & L2E_OFFSET_MASK
                if kind == DATA and host & (cs - 1):
                    self.bad_entry(entry)
                # The entries that continue this one's run are of its kind with the same
                # flags: found in bulk, not entry by entry.
                stop = i + ((table_end - pos + in_cluster + cs - 1) >> cb)
                j = run_end(table, i, stop, entry, cs if host else 0)
                n = min(((j - i) << cb) - in_cluster, table_end - pos)
                # Data at host 0 exists in an external data file; zero clusters without a
                # host cluster, and unallocated ones, lie nowhere.
                value = host + in_cluster if kind == DATA or host else 0
                _append_run(runs, pos, n, kind, value)
                pos += n
                i = j
        return runs

    def bad_entry(self, entry: int, what: str = "an unaligned cluster"):
        reason = f"L2 entry 0x{entry:016x} points to {what}"
        self._mark_corrupt(reason)
        raise IOFailure(reason)

    # -- reading -----------------------------------------------------------------------

    def read(self, offset: int, length: int):
        runs = self.map(offset, length)
        if len(runs) == 1:  # the common case: one host range, no buffer to assemble
            return self.read_run(*runs[0])
        buf = bytearray(length)
        view = memoryview(buf)
        for guest, n, kind, value in runs:
            start = guest - offset
            if kind == DATA:
                self.data.preadinto(view[start:start + n], value)
            elif kind == COMPRESSED or (kind == UNALLOCATED and self.backing is not None):
                view[start:start + n] = self.read_run(guest, n, kind, value)
        return buf

    def read_parts(self, offset: int, length: int) -> list:
        """The range as (length, data) pieces, data None where it reads as zeros for
        certain (zero clusters, unallocated without a backing file to show through):
        what an NBD structured read sends as OFFSET_HOLE. One mapping pass."""
        return self._pieces(offset, length, self.read_run)

    def read_plan(self, offset: int, length: int) -> list:
        """read_parts() with every data run left as a HostRead for the server to perform
        (docs/DESIGN.md, "I/O model"; qnbd/block/plan.py): the mapping is done here, on
        the caller's thread; compressed and backing pieces are read here, as before."""
        file = self.data.file

        def piece(guest, n, kind, value):
            return HostRead(file, value, n) if kind == DATA else \
                self.read_run(guest, n, kind, value)
        return self._pieces(offset, length, piece)

    def _pieces(self, offset: int, length: int, piece) -> list:
        """(length, piece) for each run of map(), runs that read as zeros for certain
        merged into (length, None); piece(guest, n, kind, value) gives the others."""
        parts: list = []
        backing = self.backing
        for guest, n, kind, value in self.map(offset, length):
            if kind == ZERO or (kind == UNALLOCATED and (
                    backing is None or guest >= backing.size)):
                if parts and parts[-1][1] is None:
                    parts[-1] = (parts[-1][0] + n, None)
                else:
                    parts.append((n, None))
            else:
                parts.append((n, piece(guest, n, kind, value)))
        return parts

    def read_run(self, guest: int, n: int, kind: int, value: int):
        """The bytes of one run of map()."""
        if kind == DATA:
            data = self.data.pread(n, value)  # bytes, filled by the kernel only
            return data if len(data) == n else data + bytes(n - len(data))
        if kind == COMPRESSED:
            in_cluster = guest & (self.layout.cluster_size - 1)
            return self.compressed_cluster(value)[in_cluster:in_cluster + n]
        buf = bytearray(n)
        if kind == UNALLOCATED and self.backing is not None:
            self._read_backing_into(guest, memoryview(buf))
        return buf

    def _read_backing_into(self, offset: int, dst: memoryview) -> None:
        """Backing data; past the backing file's end the image reads zeros."""
        n = min(len(dst), self.backing.size - offset)
        if n > 0:
            dst[:n] = self.backing.read(offset, n)

    def compressed_cluster(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        offset, length = self.layout.compressed.host_range(entry)
        data = decompress(self.data.pread(length, offset), self.layout.cluster_size,
                          self.compression_type)
        self._compressed_cache = (entry, data)
        return data

    def forget_compressed(self) -> None:
        """Drop the decompressed cluster kept for sequential reads (its host range may
        be freed and reused)."""
        self._compressed_cache = None

    def cluster_content(self, entry: int, kind: int, guest_cluster: int) -> bytearray:
        """The current content of a whole guest cluster, for copy-on-write."""
        cs = self.layout.cluster_size
        if kind == DATA:
            data = bytearray(self.data.pread(cs, entry & L2E_OFFSET_MASK))
            return data + bytes(cs - len(data))
        if kind == COMPRESSED:
            return bytearray(self.compressed_cluster(entry))
        content = bytearray(cs)
        if kind == UNALLOCATED and self.backing is not None:
            self._read_backing_into(guest_cluster, memoryview(content))
        return content

    # -- block status ------------------------------------------------------------------

    def status_span(self, offset: int, length: int) -> int:
        """How much of a status query one call maps: up to MAX_STATUS_TABLES allocated L2
        tables (unallocated L1 ranges cost nothing to skip). Callers cap their replies
        (NBD: 65536 descriptors) and ask again for the rest, as the contract allows, so a
        query over a large fragmented image does not map everything the reply drops."""
        shift = self.layout.table_shift
        l1 = self.tables.l1
        allocated = 0
        for l1_index in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            if l1[l1_index] & L1E_OFFSET_MASK:
                allocated += 1
                if allocated > MAX_STATUS_TABLES:
                    return (l1_index << shift) - offset
        return length

    def extents(self, offset: int, length: int) -> list[Extent]:
        extents: list[Extent] = []
        for guest, n, kind, _value in self.map(offset, length):
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
        """This image alone (qcow2_co_block_status): data and zero clusters are allocated
        here, with their host offset in `path` when they have one (compressed clusters
        have none); unallocated clusters leave the answer to the backing file."""
        out = []
        for _guest, n, kind, value in self.map(offset, self.status_span(offset, length)):
            if kind == UNALLOCATED:
                # With extended L2 entries an unallocated subcluster may lie in a host
                # cluster (value): qemu reports that offset, not the allocation.
                out.append(LayerExtent(n, False, False, value or None,
                                       path if value else None))
            elif kind == COMPRESSED:
                out.append(LayerExtent(n, True, False, None, None, compressed=True))
            else:
                # Data at host offset 0 exists in an external data file; a zero run's 0
                # means no host cluster (qcow2_get_cluster_type).
                host = value if kind == DATA else value or None
                out.append(LayerExtent(n, kind == DATA, kind == ZERO, host,
                                       path if host is not None else None))
        return out

    def reads_zero(self, offset: int, length: int) -> bool:
        return all(e.flags & ZERO_FLAG for e in self.extents(offset, length))


def _append_run(runs: list, pos: int, n: int, kind: int, value: int) -> None:
    if runs:
        last = runs[-1]
        if _continues(last, kind, value):
            last[1] += n
            return
    runs.append([pos, n, kind, value])


def _continues(last: list, kind: int, value: int) -> bool:
    """Whether a run of `kind` at host `value` extends `last`: host-contiguous runs only,
    and runs with a host cluster never with those without (qemu-img map shows where
    each run lies, and whether it lies anywhere)."""
    if last[2] != kind:
        return False
    if not last[3] or not value:
        return not last[3] and not value
    return last[3] + last[1] == value
