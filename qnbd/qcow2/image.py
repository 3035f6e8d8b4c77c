"""A qcow2 image as a BlockDevice: reads, writes, zeroes, discards, block status, flush.

Guest-to-host mapping follows qcow2.rst "Cluster mapping"; host cluster management is in
refcount.py; write ordering is carried by the caches' barriers (cache.py) and by the
queue of pending releases (rule 3): a cluster whose last reference is dropped stays
allocated until the L2/L1 change that dropped it is durable, and only then is freed and
its space punched out of the file. See DESIGN.md, "Rules of the qcow2 format".
"""

import errno
import logging
import os
import struct
from array import array

from .. import fileio
from ..block.base import HOLE, ZERO as ZERO_FLAG, Extent
from ..errors import ImageError, IOFailure, NotFast
from ..lock import lock_image
from . import header as hdr
from .cache import TableCache
from .check import FIX_ALL, check_file
from .compression import decompress
from .entries import (COMPRESSED, DATA, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED,
                      OFLAG_ZERO, UNALLOCATED, ZERO, CompressedLayout, classify,
                      decode_table, encode_table)
from .metadata_map import MetadataMap
from .refcount import Refcounts
from .persistent_bitmaps import PersistentBitmaps
from .snapshots import read_table as read_snapshot_table

log = logging.getLogger("qnbd.qcow2")

DEFAULT_L2_CACHE_BYTES = 4 << 20  # covers 32 GiB of a 64 KiB-cluster image
DEFAULT_REFCOUNT_CACHE_BYTES = 1 << 20
MAX_BACKING_DEPTH = 16
# Which backing files an image may name: any (qemu's behaviour), only files in the top
# image's directory after resolving symlinks, or none. An untrusted image's header must
# not choose which host file the server reads.
BACKING_POLICIES = ("any", "same-dir", "none")
# Released clusters wait for a flush (rule 3); past this many, writes flush by themselves
# so that discarded space returns without waiting for the client.
MAX_PENDING_RELEASES = 4096
# L2 tables one block-status call maps at most (see Qcow2Image._status_span).
MAX_STATUS_TABLES = 64

_U64 = struct.Struct(">Q")
_REFTABLE_LOCATION = struct.Struct(">QI")  # header bytes 48-59
_REFTABLE_LOCATION_OFFSET = 48
_INCOMPATIBLE_OFFSET = 72
_AUTOCLEAR_OFFSET = 88


class Qcow2Image:
    format = "qcow2"
    supports_fast_zero = True

    @classmethod
    def open(cls, path: str, read_only: bool = True, *,
             l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
             refcount_cache_bytes: int = DEFAULT_REFCOUNT_CACHE_BYTES,
             max_backing_depth: int = MAX_BACKING_DEPTH, force_share: bool = False,
             backing_policy: str = "any", _chain: tuple = ()):
        file = fileio.open_file(path, writable=not read_only)
        try:
            lock_image(file, not read_only, force_share)  # rule 11, before any read
            if not read_only:
                _repair_if_dirty(file, path)
            return cls(path, file, read_only, l2_cache_bytes, refcount_cache_bytes,
                       max_backing_depth, _chain, backing_policy)
        except BaseException:
            file.close()
            raise

    def __init__(self, path, file, read_only, l2_cache_bytes, refcount_cache_bytes,
                 max_backing_depth, chain, backing_policy="any"):
        self.path = path
        self.file = file
        self.read_only = read_only
        file_size = file.size()
        h = self.header = hdr.read(file)
        self.version = h.version
        self.size = h.size
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.l2_bits = h.cluster_bits - 3
        self.compressed = CompressedLayout(h.cluster_bits)
        self._corrupt = h.corrupt
        if not read_only:
            if h.corrupt:
                raise ImageError(f"'{path}' is marked corrupt; it can only be opened "
                                 "read-only until repaired (qemu-img check -r all)")
            if h.dirty:
                raise ImageError(f"'{path}' has the dirty bit set and needs repair "
                                 "(qemu-img check -r all) before it is opened read-write")
        self.metadata = MetadataMap(self)
        self.metadata.add_range(0, cs)
        self.l1 = decode_table(self._pread_exact(h.l1_size * 8, h.l1_table_offset, "L1 table"))
        self.metadata.add_range(h.l1_table_offset, h.l1_size * 8)
        for entry in self.l1:
            if entry & L1E_OFFSET_MASK:
                self.metadata.add((entry & L1E_OFFSET_MASK) >> self.cluster_bits)
        self._l1_dirty: set[int] = set()
        self.refcounts = Refcounts(self, h.refcount_table_offset, h.refcount_table_clusters,
                                   refcount_cache_bytes // cs)
        self.metadata.add_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
        for offset in self.refcounts.block_offsets():
            self.metadata.add(offset >> self.cluster_bits)
        self.snapshots = []
        if h.nb_snapshots:
            self.snapshots, table_bytes = read_snapshot_table(
                file, h.snapshots_offset, h.nb_snapshots, cs, file_size)
            self.metadata.add_range(h.snapshots_offset, table_bytes)
            for snap in self.snapshots:
                self.metadata.add_range(snap.l1_offset, snap.l1_size * 8)
        self.l2_cache = TableCache("l2", self._load_l2, self._store_metadata_table,
                                   l2_cache_bytes // cs, barrier=self._l2_barrier)
        self._pending_releases: list[tuple[int, int]] = []
        self._unsynced = False
        self._write_prepared = False
        self._compressed_cache: tuple[int, bytes] | None = None
        self._closed = False
        self.backing = None
        if h.backing_file:
            self.backing = self._open_backing(max_backing_depth, chain, backing_policy)
        self.bitmaps = PersistentBitmaps(self)

    # -- opening -----------------------------------------------------------------------

    def _pread_exact(self, length: int, offset: int, what: str) -> bytes:
        data = self.file.pread(length, offset)
        if len(data) != length:
            raise ImageError(f"{what} at 0x{offset:x} is past the end of the file")
        return data

    def backing_path(self) -> str | None:
        """The backing file name resolved against this image's directory, as qemu does."""
        name = self.header.backing_file
        if name is None:
            return None
        if ":" in name.split("/", 1)[0]:
            raise ImageError(f"backing file '{hdr.printable(name)}' uses a protocol prefix, "
                             "which is not "
                             "supported")
        return hdr.resolve_backing(self.path, name)

    def _open_backing(self, max_depth: int, chain: tuple, policy: str):
        from ..block.open import open_image  # the chain may mix formats

        path = self.backing_path()
        chain = chain + (os.path.realpath(self.path),)
        if policy == "none" or policy == "same-dir" and \
                os.path.dirname(os.path.realpath(path)) != os.path.dirname(chain[0]):
            raise ImageError(f"backing file '{hdr.printable(path)}' is not allowed by the "
                             f"backing policy '{policy}'")
        if os.path.realpath(path) in chain:
            raise ImageError(f"backing file '{hdr.printable(path)}' makes a loop in the "
                             "backing chain")
        if len(chain) > max_depth:
            raise ImageError(f"backing chain of '{chain[0]}' is deeper than {max_depth}")
        try:
            return open_image(path, self.header.backing_format, read_only=True,
                              max_backing_depth=max_depth, backing_policy=policy,
                              _chain=chain)
        except ImageError as e:
            # The name comes from the image: escape it to keep the message on one line.
            raise ImageError(f"could not open backing file: {hdr.printable(str(e))}") from None

    # -- metadata I/O ------------------------------------------------------------------

    def _load_l2(self, offset: int) -> array:
        if offset % self.cluster_size or offset + self.cluster_size > self.file.size():
            reason = f"L2 table offset 0x{offset:x} is invalid or past the end of the file"
        elif self._is_fixed_table(offset):
            # Else writing this "L2 table" back would overwrite the header, the L1 table
            # or the refcount table (QEMU's overlap check for metadata writes).
            reason = (f"L2 table offset 0x{offset:x} overlaps the header, the L1 table or "
                      "the refcount table")
        else:
            return decode_table(self.file.pread(self.cluster_size, offset))
        self.mark_corrupt(reason)
        raise IOFailure(reason)

    def _is_fixed_table(self, offset: int) -> bool:
        """Whether the cluster at `offset` is the header or in the L1 or refcount table."""
        h, rc = self.header, self.refcounts
        return (offset < self.cluster_size
                or h.l1_table_offset <= offset + self.cluster_size - 1
                and offset < h.l1_table_offset + h.l1_size * 8
                or rc.table_offset <= offset
                and offset < rc.table_offset + (rc.table_clusters << self.cluster_bits))

    def _store_metadata_table(self, offset: int, table: array) -> None:
        self._pwrite(encode_table(table), offset)

    def _pwrite(self, data, offset: int) -> None:
        self.file.pwrite(data, offset)
        self._unsynced = True

    def sync(self) -> None:
        self.file.fsync()
        self._unsynced = False

    def _l2_barrier(self) -> None:
        """Before an L2 table is written: the refcounts of what it points to, and the data
        written into newly mapped clusters, must be durable (rules 2 and 4). Under the
        dirty bit (lazy refcounts, rule 6) refcounts may lag: repair rebuilds them."""
        if not self.header.dirty:
            self.refcounts.cache.write_dirty()
        if self._unsynced:
            self.sync()

    def _write_incompatible_features(self) -> None:
        self._pwrite(_U64.pack(self.header.incompatible_features), _INCOMPATIBLE_OFFSET)
        self.sync()

    def write_reftable_location(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self._pwrite(_REFTABLE_LOCATION.pack(offset, clusters), _REFTABLE_LOCATION_OFFSET)
        self.sync()

    def write_header(self) -> None:
        """Rewrite the header cluster's contents (fields, extensions, backing name)."""
        self._pwrite(self.header.encode(), 0)
        self.sync()

    def mark_corrupt(self, reason: str) -> None:
        """Rule 7: an inconsistency met at run time sets the corrupt bit; no more writes."""
        if self._corrupt:
            return
        self._corrupt = True
        log.error("%s: %s; marking the image corrupt", self.path, reason)
        if self.read_only or self.version < 3:
            return
        self.header.incompatible_features |= hdr.INCOMPAT_CORRUPT
        try:
            self._write_incompatible_features()
        except OSError as e:
            log.error("%s: could not set the corrupt bit: %s", self.path, e)

    # -- mapping -----------------------------------------------------------------------

    def _l2_for_read(self, l1_index: int):
        entry = self.l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        return self.l2_cache.get(offset) if offset else None

    def _map(self, offset: int, length: int) -> list[list]:
        """[guest offset, length, kind, value] runs covering the range. value: host offset
        for DATA (runs are host-contiguous), the L2 entry for COMPRESSED (one cluster per
        run), the host offset (possibly 0) for ZERO, 0 for UNALLOCATED."""
        cb = self.cluster_bits
        cs = self.cluster_size
        table_shift = cb + self.l2_bits
        l2_mask = (1 << self.l2_bits) - 1
        version = self.version
        runs: list[list] = []
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            table = self._l2_for_read(l1_index)
            if table is None:
                _append_run(runs, pos, table_end - pos, UNALLOCATED, 0)
                pos = table_end
                continue
            i = (pos >> cb) & l2_mask
            while pos < table_end:
                entry = table[i]
                in_cluster = pos & (cs - 1)
                n = min(cs - in_cluster, table_end - pos)
                kind = classify(entry, version)
                if kind == DATA:
                    host = entry & L2E_OFFSET_MASK
                    if host & (cs - 1):
                        self._bad_entry(entry)
                    value = host + in_cluster
                elif kind == COMPRESSED:
                    runs.append([pos, n, COMPRESSED, entry])
                    pos += n
                    i += 1
                    continue
                elif kind == ZERO:
                    value = entry & L2E_OFFSET_MASK
                else:
                    value = 0
                _append_run(runs, pos, n, kind, value)
                pos += n
                i += 1
        return runs

    def _bad_entry(self, entry: int):
        reason = f"L2 entry 0x{entry:016x} points to an unaligned cluster"
        self.mark_corrupt(reason)
        raise IOFailure(reason)

    # -- reading -----------------------------------------------------------------------

    def read(self, offset: int, length: int):
        runs = self._map(offset, length)
        if len(runs) == 1:  # the common case: one host range, no buffer to assemble
            return self._read_run(*runs[0])
        buf = bytearray(length)
        view = memoryview(buf)
        for guest, n, kind, value in runs:
            start = guest - offset
            if kind == DATA:
                self.file.preadinto(view[start:start + n], value)
            elif kind == COMPRESSED or (kind == UNALLOCATED and self.backing is not None):
                view[start:start + n] = self._read_run(guest, n, kind, value)
        return buf

    def read_parts(self, offset: int, length: int) -> list:
        """The range as (length, data) pieces, data None where it reads as zeros for
        certain (zero clusters, unallocated without a backing file to show through):
        what an NBD structured read sends as OFFSET_HOLE. One mapping pass."""
        parts: list = []
        for guest, n, kind, value in self._map(offset, length):
            if kind == ZERO or (kind == UNALLOCATED and (
                    self.backing is None or guest >= self.backing.size)):
                if parts and parts[-1][1] is None:
                    parts[-1] = (parts[-1][0] + n, None)
                else:
                    parts.append((n, None))
            else:
                parts.append((n, self._read_run(guest, n, kind, value)))
        return parts

    def _read_run(self, guest: int, n: int, kind: int, value: int):
        """The bytes of one run of _map()."""
        if kind == DATA:
            data = self.file.pread(n, value)  # bytes, filled by the kernel only
            return data if len(data) == n else data + bytes(n - len(data))
        if kind == COMPRESSED:
            in_cluster = guest & (self.cluster_size - 1)
            return self._compressed_cluster(value)[in_cluster:in_cluster + n]
        buf = bytearray(n)
        if kind == UNALLOCATED and self.backing is not None:
            self._read_backing_into(guest, memoryview(buf))
        return buf

    def _read_backing_into(self, offset: int, dst: memoryview) -> None:
        """Backing data; past the backing file's end the image reads zeros."""
        n = min(len(dst), self.backing.size - offset)
        if n > 0:
            dst[:n] = self.backing.read(offset, n)

    def _compressed_cluster(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        offset, length = self.compressed.host_range(entry)
        data = decompress(self.file.pread(length, offset), self.cluster_size,
                          self.header.compression_type)
        self._compressed_cache = (entry, data)
        return data

    def _cluster_content(self, entry: int, kind: int, guest_cluster: int) -> bytearray:
        """The current content of a whole guest cluster, for copy-on-write."""
        cs = self.cluster_size
        if kind == DATA:
            data = bytearray(self.file.pread(cs, entry & L2E_OFFSET_MASK))
            return data + bytes(cs - len(data))
        if kind == COMPRESSED:
            return bytearray(self._compressed_cluster(entry))
        content = bytearray(cs)
        if kind == UNALLOCATED and self.backing is not None:
            self._read_backing_into(guest_cluster, memoryview(content))
        return content

    # -- writing -----------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise IOFailure("the image is open read-only", errno.EPERM)
        if self._corrupt:
            raise IOFailure("the image is marked corrupt; writes are refused")
        if not self._write_prepared:
            self._prepare_first_write()

    def _prepare_first_write(self) -> None:
        """Rule 1: autoclear bits this engine does not keep true are cleared (and made
        durable) before the first write changes anything they describe. Rule 6: with lazy
        refcounts the dirty bit is set, durably, before any refcount update is deferred."""
        h = self.header
        stale = h.autoclear_features & ~hdr.MAINTAINED_AUTOCLEAR
        if stale and h.version >= 3:
            h.autoclear_features &= ~stale
            self._pwrite(_U64.pack(h.autoclear_features), _AUTOCLEAR_OFFSET)
            self.sync()
        if h.lazy_refcounts and h.version >= 3 and not h.dirty:
            h.incompatible_features |= hdr.INCOMPAT_DIRTY
            self._write_incompatible_features()
        self._write_prepared = True

    def _l2_for_write(self, l1_index: int) -> tuple[int, array]:
        """The L2 table for `l1_index`, owned by this L1 entry alone (COPIED): allocated
        when missing, copied when shared with a snapshot."""
        entry = self.l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if offset and entry & OFLAG_COPIED:
            return offset, self.l2_cache.get(offset)
        new_offset = self.refcounts.allocate(1)
        if offset:
            table = array("Q", self.l2_cache.get(offset))
            self._queue_release(offset, self.cluster_size)
        else:
            table = array("Q", bytes(self.cluster_size))
        self.metadata.add(new_offset >> self.cluster_bits)
        self.l2_cache.mark_dirty(new_offset, table)
        # Rule 4: the L1 entry is written only after the new table (flush order).
        self.l1[l1_index] = new_offset | OFLAG_COPIED
        self._l1_dirty.add(l1_index)
        return new_offset, table

    def _queue_release(self, offset: int, length: int) -> None:
        self._pending_releases.append((offset, length))

    def _release_entry(self, entry: int, kind: int) -> None:
        """Queue the drop of the reference an L2 entry held (rule 3)."""
        if kind == COMPRESSED:
            self._queue_release(*self.compressed.host_range(entry))
        elif kind in (DATA, ZERO) and entry & L2E_OFFSET_MASK:
            self._queue_release(entry & L2E_OFFSET_MASK, self.cluster_size)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self.bitmaps.mark(offset, len(view))
        table_shift = self.cluster_bits + self.l2_bits
        pos, end = offset, offset + len(view)
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            self._write_in_table(l1_index, pos, view[pos - offset:table_end - offset])
            pos = table_end
        self._after_update(fua)

    def _write_in_table(self, l1_index: int, pos: int, data: memoryview) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        table_offset, table = self._l2_for_write(l1_index)
        i = (pos >> cb) & ((1 << self.l2_bits) - 1)
        last = ((pos + len(data) - 1) >> cb) & ((1 << self.l2_bits) - 1)
        writes = _WriteGather(self)
        updates = []
        fresh: list[int] = []  # clusters allocated ahead, as one run, for what follows
        done = 0
        while done < len(data):
            guest = pos + done
            in_cluster = guest & (cs - 1)
            n = min(cs - in_cluster, len(data) - done)
            chunk = data[done:done + n]
            entry = table[i]
            kind = classify(entry, self.version)
            host = entry & L2E_OFFSET_MASK
            if host & (cs - 1) and kind in (DATA, ZERO):
                self._bad_entry(entry)  # never write (or free) at an unaligned host offset
            if kind == DATA and entry & OFLAG_COPIED:
                writes.add(host + in_cluster, chunk)
            else:
                if not self._owned(entry, kind):
                    if not fresh:
                        fresh = self._allocate_run(table, i, last)
                    host = fresh.pop()
                    self._release_entry(entry, kind)
                if n == cs:
                    writes.add(host, chunk)
                elif self._reads_zero_before_write(kind) and self._past_eof(writes, host):
                    # Past the end of the file the cluster already reads as zeros: extend
                    # the file instead of writing the zeros around the data (as QEMU skips
                    # a copy-on-write from nothing).
                    self.file.truncate(host + cs)
                    writes.add(host + in_cluster, chunk)
                else:
                    content = self._cluster_content(entry, kind, guest - in_cluster)
                    content[in_cluster:in_cluster + n] = chunk
                    writes.add(host, content)
                updates.append((i, host | OFLAG_COPIED))
            done += n
            i += 1
        writes.flush()
        # Rule 4 (data before the mapping): entries change only after the data writes
        # succeeded, and reach the disk after the L2 barrier's fsync.
        if updates:
            for i, entry in updates:
                table[i] = entry
            self.l2_cache.mark_dirty(table_offset, table)

    def _owned(self, entry: int, kind: int) -> bool:
        """A cluster this entry alone references (COPIED), writable in place: data, or
        a preallocated zero cluster (filled in place)."""
        return kind in (DATA, ZERO) and bool(entry & OFLAG_COPIED) \
            and bool(entry & L2E_OFFSET_MASK)

    def _allocate_run(self, table: array, i: int, last: int) -> list[int]:
        """New clusters for entries i..last that need one, up to the first that does not,
        as contiguous as the free space allows so the data goes out in few host writes.
        Returned in reverse order, to be taken with pop()."""
        count = 1
        version = self.version
        while i + count <= last and not self._owned(
                table[i + count], classify(table[i + count], version)):
            count += 1
        first, taken = self.refcounts.allocate_some(count)
        return [first + (k << self.cluster_bits) for k in range(taken - 1, -1, -1)]

    def _past_eof(self, writes: "_WriteGather", host: int) -> bool:
        writes.flush()  # gathered writes may end past the file's current end
        return host >= self.file.size()

    def _reads_zero_before_write(self, kind: int) -> bool:
        return kind == ZERO or (kind == UNALLOCATED and self.backing is None)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        self._check_writable()
        self.bitmaps.mark(offset, length)
        cs = self.cluster_size
        first_full = -(-offset // cs) * cs
        end_full = (offset + length) // cs * cs
        # The image's tail may end inside a cluster: that cluster counts as whole.
        if offset + length == self.size and self.size % cs:
            end_full = -(-self.size // cs) * cs
        if first_full >= end_full:
            partials = [(offset, length)]
            first_full = end_full = None
        else:
            partials = [(offset, first_full - offset), (end_full, offset + length - end_full)]
            partials = [(o, n) for o, n in partials if 0 < n and o < self.size]
        partials = [(o, n) for o, n in partials if n > 0 and not self._reads_zero(o, n)]
        v2_backing = self.version < 3 and self.backing is not None
        if fast and (partials or (v2_backing and first_full is not None)):
            raise NotFast()
        for o, n in partials:
            self._write_zero_data(o, n)
        if first_full is not None:
            if v2_backing:
                # No zero flag in v2: zeros must be written for the backing not to show.
                self._write_zero_data(first_full, min(end_full, self.size) - first_full)
            else:
                self._zero_clusters(first_full, end_full, trim=may_trim)
        self._after_update(fua)

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self.bitmaps.mark(offset, length)
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if offset + length == self.size:
            end = -(-self.size // cs) * cs
        # v2 cannot hide a backing file's data without writing zeros: discard is advisory,
        # so it does nothing there.
        if start < end and not (self.version < 3 and self.backing is not None):
            self._zero_clusters(start, end, trim=True)
        self._after_update(fua)

    def _reads_zero(self, offset: int, length: int) -> bool:
        return all(e.flags & ZERO_FLAG for e in self._extents(offset, length))

    def _write_zero_data(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        while length > 0:
            n = min(chunk, length)
            self.write(offset, memoryview(zeros)[:n])
            offset += n
            length -= n

    def _zero_clusters(self, start: int, end: int, trim: bool) -> None:
        """Whole clusters [start, end) read as zeros afterwards. v3 uses the zero flag
        (keeping our own allocation unless trimming); without a backing file an
        unallocated entry reads as zeros too, which is also v2's only way."""
        cb = self.cluster_bits
        table_shift = cb + self.l2_bits
        pos = start
        while pos < end:
            l1_index = pos >> table_shift
            table_end = min(end, (l1_index + 1) << table_shift)
            if not self.l1[l1_index] & L1E_OFFSET_MASK and self.backing is None:
                pos = table_end  # nothing mapped here and nothing shows through
                continue
            table_offset, table = self._l2_for_write(l1_index)
            i = (pos >> cb) & ((1 << self.l2_bits) - 1)
            changed = False
            for _ in range((table_end - pos) >> cb):
                entry = table[i]
                new = self._zeroed_entry(entry, trim)
                if new != entry:
                    if not new & L2E_OFFSET_MASK:
                        self._release_entry(entry, classify(entry, self.version))
                    table[i] = new
                    changed = True
                i += 1
            if changed:
                self.l2_cache.mark_dirty(table_offset, table)
            pos = table_end

    def _zeroed_entry(self, entry: int, trim: bool) -> int:
        kind = classify(entry, self.version)
        host = entry & L2E_OFFSET_MASK
        if host & (self.cluster_size - 1) and kind in (DATA, ZERO):
            self._bad_entry(entry)  # keeping or freeing it would hit the wrong clusters
        if kind in (DATA, ZERO) and host and entry & OFLAG_COPIED and not trim \
                and self.version >= 3:
            return host | OFLAG_COPIED | OFLAG_ZERO
        if kind == ZERO and not host:
            return entry
        return OFLAG_ZERO if self.backing is not None else 0

    def _after_update(self, fua: bool) -> None:
        if fua or len(self._pending_releases) > MAX_PENDING_RELEASES:
            self.flush()

    # -- block status ------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> list[Extent]:
        length = min(length, self.size - offset)
        return self._extents(offset, self._status_span(offset, length))

    def _status_span(self, offset: int, length: int) -> int:
        """How much of a status query one call maps: up to MAX_STATUS_TABLES allocated L2
        tables (unallocated L1 ranges cost nothing to skip). Callers cap their replies
        (NBD: 65536 descriptors) and ask again for the rest, as the contract allows, so a
        query over a large fragmented image does not map everything the reply drops."""
        shift = self.cluster_bits + self.l2_bits
        allocated = 0
        for l1_index in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            if self.l1[l1_index] & L1E_OFFSET_MASK:
                allocated += 1
                if allocated > MAX_STATUS_TABLES:
                    return (l1_index << shift) - offset
        return length

    def _extents(self, offset: int, length: int) -> list[Extent]:
        extents: list[Extent] = []
        for guest, n, kind, _value in self._map(offset, length):
            if kind == UNALLOCATED and self.backing is not None:
                for e in self._backing_extents(guest, n):
                    _append_extent(extents, e)
            elif kind == UNALLOCATED:
                _append_extent(extents, Extent(n, HOLE | ZERO_FLAG, 0))
            elif kind == ZERO:
                _append_extent(extents, Extent(n, HOLE | ZERO_FLAG, 1))
            else:
                _append_extent(extents, Extent(n, 0, 1))
        return extents

    def _backing_extents(self, offset: int, length: int):
        end = offset + length
        covered = min(end, self.backing.size)
        while offset < covered:
            extents = self.backing.block_status(offset, covered - offset)
            if not extents:
                break
            for e in extents:
                n = min(e.length, covered - offset)
                yield Extent(n, e.flags, e.depth + 1 if e.depth else 0)
                offset += n
                if offset >= covered:
                    break
        if end > offset:
            yield Extent(end - offset, HOLE | ZERO_FLAG, 0)

    # -- flush and close ---------------------------------------------------------------

    def flush(self) -> None:
        """Rule 10: dirty metadata in dependency order, then fsync. Releases queued by
        earlier updates are applied once the references they drop are durable."""
        if self.read_only or self._closed:
            return
        if self._corrupt:
            # Rule 7: after an inconsistency, nothing more is written (as QEMU, which makes
            # the image inaccessible): dirty metadata may describe the damage.
            raise IOFailure("the image is marked corrupt; metadata is not written back")
        self._write_metadata()
        if self._pending_releases:
            self._apply_releases()
            self._write_metadata()

    def _write_metadata(self) -> None:
        self.refcounts.cache.write_dirty()
        if self.l2_cache.has_dirty():
            self.l2_cache.write_dirty()  # its barrier makes data and refcounts durable
        if self._l1_dirty:
            self.sync()  # rule 4: L2 tables durable before the L1 entries pointing to them
            l1_offset = self.header.l1_table_offset
            for i in sorted(self._l1_dirty):
                self._pwrite(_U64.pack(self.l1[i]), l1_offset + 8 * i)
            self._l1_dirty.clear()
        if self._unsynced:
            self.sync()

    def _apply_releases(self) -> None:
        pending, self._pending_releases = self._pending_releases, []
        self._compressed_cache = None
        freed = []
        for offset, length in pending:
            freed.extend(self.refcounts.release(offset, length))
        for cluster in sorted(freed):
            if cluster in self.metadata.clusters:
                self.metadata.remove(cluster)
                self.l2_cache.discard(cluster << self.cluster_bits)
        for start, count in _runs_of(sorted(freed)):
            self.file.punch_hole(start << self.cluster_bits, count << self.cluster_bits)

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self._corrupt:
                self.flush()
                self.bitmaps.store()
                if self.header.dirty:
                    # Rule 6: cleared only once every cache is written back and synced.
                    self.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
                    self._write_incompatible_features()
        finally:
            self._closed = True
            self.file.close()
            if self.backing is not None:
                self.backing.close()


def _repair_if_dirty(file, path: str) -> None:
    """Rule 6: refcounts of an image left dirty (lazy refcounts, not closed cleanly) may
    be too low; before it is written again they are checked and rebuilt, as QEMU does."""
    h = hdr.read(file)
    if not h.dirty or h.corrupt:
        return  # a corrupt image is refused read-write anyway
    result = check_file(file, path, FIX_ALL)
    if result.exit_code not in (0, 3) or result.leaks:
        raise ImageError(f"'{path}' was left dirty and could not be repaired "
                         f"({result.corruptions} corruptions, {result.check_errors} errors "
                         "remain)")
    log.warning("%s: repaired an image left dirty: %d corruptions and %d leaks fixed",
                path, result.corruptions_fixed, result.leaks_fixed)


class _WriteGather:
    """Coalesces writes to consecutive host offsets into one pwritev."""

    def __init__(self, image: Qcow2Image):
        self.image = image
        self.start = 0
        self.end = 0
        self.buffers: list = []

    def add(self, host: int, data) -> None:
        if self.buffers and host != self.end:
            self.flush()
        if not self.buffers:
            self.start = self.end = host
        self.image.metadata.check_data_write(host, len(data))
        self.buffers.append(data)
        self.end += len(data)

    def flush(self) -> None:
        if self.buffers:
            image = self.image
            image.file.pwritev(self.buffers, self.start)
            image._unsynced = True
            self.buffers = []


def _append_run(runs: list, pos: int, n: int, kind: int, value: int) -> None:
    if runs:
        last = runs[-1]
        if last[2] == kind and (kind != DATA or last[3] + last[1] == value) \
                and (kind != ZERO or bool(last[3]) == bool(value)):
            last[1] += n
            return
    runs.append([pos, n, kind, value])


def _append_extent(extents: list, e: Extent) -> None:
    if extents and extents[-1].flags == e.flags and extents[-1].depth == e.depth:
        extents[-1] = Extent(extents[-1].length + e.length, e.flags, e.depth)
    else:
        extents.append(e)


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
