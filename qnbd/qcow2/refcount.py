"""Host cluster management: qcow2.rst, "Host cluster management".

A two-level structure: the refcount table (contiguous, in memory here) points to
cluster-sized refcount blocks of `refcount_bits`-wide entries (cached). A cluster is free
when its refcount is 0. Allocation takes the lowest free clusters; a region without a
refcount block is entirely free, and its new block is placed on the region's first
cluster so that it describes itself.

Durability: refcount increments live in the cache until the L2 cache's barrier writes
them back (rule 2). Decrements of clusters still referenced on disk are not done here
directly by callers; the image queues them until the dropped reference is durable
(rule 3), then calls `release`.
"""

import struct
import sys
from array import array

from ..block.cache import TableCache
from ..block.storage import Barrier, Storage
from ..errors import CorruptImage, IOFailure
from .header import Header
from .metadata_map import MetadataMap

_SWAP = sys.byteorder == "little"
_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}
REFTABLE_ENTRY_RESERVED = 0x1FF
_U64 = struct.Struct(">Q")


class ReleaseRefused(IOFailure):
    """A reference to drop that the refcounts do not record; nothing was changed."""


class WordBlock:
    """A refcount block of 8-, 16-, 32- or 64-bit entries, as a native array."""

    __slots__ = ("entries",)

    def __init__(self, raw: bytes, bits: int):
        self.entries = array(_TYPECODES[bits], raw)
        if _SWAP and bits > 8:
            self.entries.byteswap()

    def get(self, i: int) -> int:
        return self.entries[i]

    def set(self, i: int, value: int) -> None:
        self.entries[i] = value

    def get_range(self, start: int, n: int):
        return self.entries[start:start + n]

    def set_range(self, start: int, values) -> None:
        self.entries[start:start + len(values)] = array(self.entries.typecode, values)

    def find_zero(self, start: int) -> int:
        try:
            return self.entries.index(0, start)
        except ValueError:
            return -1

    def encode(self) -> bytes:
        if not _SWAP or self.entries.itemsize == 1:
            return self.entries.tobytes()
        out = array(self.entries.typecode, self.entries)
        out.byteswap()
        return out.tobytes()


class SubByteBlock:
    """A refcount block of 1-, 2- or 4-bit entries; qcow2.rst: "bit 0 means the least
    significant bit", so entry i sits at bit (i * bits) % 8 of byte (i * bits) // 8."""

    __slots__ = ("data", "bits", "mask", "per_byte")

    def __init__(self, raw: bytes, bits: int):
        self.data = bytearray(raw)
        self.bits = bits
        self.mask = (1 << bits) - 1
        self.per_byte = 8 // bits

    def get(self, i: int) -> int:
        byte, slot = divmod(i, self.per_byte)
        return (self.data[byte] >> (slot * self.bits)) & self.mask

    def set(self, i: int, value: int) -> None:
        byte, slot = divmod(i, self.per_byte)
        shift = slot * self.bits
        self.data[byte] = (self.data[byte] & ~(self.mask << shift) & 0xFF) | (value << shift)

    def get_range(self, start: int, n: int) -> list[int]:
        return [self.get(i) for i in range(start, start + n)]

    def set_range(self, start: int, values) -> None:
        for i, value in enumerate(values, start):
            self.set(i, value)

    def find_zero(self, start: int) -> int:
        # Skip whole bytes that are fully used, then look inside the first other one.
        i = start
        n = len(self.data) * self.per_byte
        while i < n:
            if i % self.per_byte == 0:
                byte = i // self.per_byte
                while byte < len(self.data) and self._byte_full(self.data[byte]):
                    byte += 1
                i = byte * self.per_byte
                if i >= n:
                    break
            if self.get(i) == 0:
                return i
            i += 1
        return -1

    def _byte_full(self, value: int) -> bool:
        return all((value >> (s * self.bits)) & self.mask for s in range(self.per_byte))

    def encode(self) -> bytes:
        return bytes(self.data)


class Refcounts:
    def __init__(self, storage: Storage, header: Header, header_writer, metadata: MetadataMap,
                 mark_corrupt, cache_tables: int):
        """header_writer.move_reftable(offset, clusters) switches the header to a new
        refcount table; metadata: clusters allocations must not hit (rule 8);
        mark_corrupt(reason): rule 7."""
        self.storage = storage
        self._header_writer = header_writer
        self.metadata = metadata
        self._mark_corrupt = mark_corrupt
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.bits = header.refcount_bits
        self.max_refcount = (1 << self.bits) - 1
        self.per_block = self.cluster_size * 8 // self.bits
        self._block_class = WordBlock if self.bits >= 8 else SubByteBlock
        self.table_offset = table_offset = header.refcount_table_offset
        self.table_clusters = table_clusters = header.refcount_table_clusters
        raw = storage.pread(table_clusters * self.cluster_size, table_offset)
        raw += bytes(table_clusters * self.cluster_size - len(raw))
        self.table = array("Q", raw)
        if _SWAP:
            self.table.byteswap()
        self.cache = TableCache("refcount", storage, self._load_block, _encode_block,
                                cache_tables)
        self.free_hint = 0
        # Clusters at or past this index are free: nothing beyond the file end or beyond
        # what this session allocated is in use (refcounts past EOF would be corruption).
        self.end_cluster = -(-storage.size() // self.cluster_size)

    # -- reading -----------------------------------------------------------------------

    def block_offsets(self):
        return (e & ~REFTABLE_ENTRY_RESERVED for e in self.table if e)

    def _load_block(self, offset: int):
        if offset % self.cluster_size or offset >= self.storage.size():
            self._mark_corrupt(f"refcount block offset 0x{offset:x} is invalid")
            raise IOFailure(f"refcount block offset 0x{offset:x} is invalid")
        raw = self.storage.pread(self.cluster_size, offset)
        return self._block_class(raw + bytes(self.cluster_size - len(raw)), self.bits)

    def _block(self, block_index: int):
        """The refcount block of region `block_index`, or None where none is allocated."""
        if block_index >= len(self.table):
            return None
        entry = self.table[block_index] & ~REFTABLE_ENTRY_RESERVED
        return self.cache.get(entry) if entry else None

    def get(self, cluster: int) -> int:
        block_index, i = divmod(cluster, self.per_block)
        block = self._block(block_index)
        return block.get(i) if block is not None else 0

    # -- changing ----------------------------------------------------------------------

    def add(self, cluster: int, delta: int) -> int:
        """Change one cluster's refcount; returns the new value."""
        block_index, i = divmod(cluster, self.per_block)
        if delta > 0:
            self._ensure_block(block_index)
        block = self._block(block_index)
        if block is None:
            raise CorruptImage(f"cluster 0x{cluster << self.cluster_bits:x} has no refcount")
        value = block.get(i) + delta
        if value < 0:
            self._mark_corrupt(f"refcount of cluster 0x{cluster << self.cluster_bits:x} "
                                    "would drop below zero")
            raise IOFailure("refcount underflow")
        if value > self.max_refcount:
            raise IOFailure(f"refcount of cluster 0x{cluster << self.cluster_bits:x} would "
                            f"exceed {self.max_refcount}")
        block.set(i, value)
        self.cache.mark_dirty(self.table[block_index] & ~REFTABLE_ENTRY_RESERVED, block)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return value

    def counts(self, first: int, count: int) -> list[int]:
        """The refcounts of clusters [first, first + count), a refcount block at a time."""
        out: list[int] = []
        for block, start, n in self._block_runs(first, count):
            out.extend(block.get_range(start, n) if block is not None else [0] * n)
        return out

    def highest(self, first: int, count: int) -> int:
        """The highest refcount among clusters [first, first + count)."""
        return max(self.counts(first, count), default=0)

    def increment(self, first: int, count: int) -> None:
        """+1 for clusters [first, first + count), a refcount block at a time (an
        internal snapshot takes a reference to every cluster it reaches); the caller has
        checked that none is at the maximum (highest)."""
        c = first
        for block_index in range(first // self.per_block,
                                 (first + count - 1) // self.per_block + 1):
            self._ensure_block(block_index)
        for block, start, n in self._block_runs(first, count):
            block.set_range(start, [v + 1 for v in block.get_range(start, n)])
            self.cache.mark_dirty(self.table[c // self.per_block] & ~REFTABLE_ENTRY_RESERVED,
                                  block)
            c += n

    def _block_runs(self, first: int, count: int):
        """(block or None, index in it, clusters) for the pieces of a run of clusters
        that each refcount block covers."""
        c, end = first, first + count
        while c < end:
            block_index, i = divmod(c, self.per_block)
            n = min(end - c, self.per_block - i)
            yield self._block(block_index), i, n
            c += n

    def allocate(self, count: int = 1) -> int:
        """Take `count` contiguous free clusters (refcount 0 -> 1); returns the host offset
        of the first. Runs too long to fit beside a region's own refcount block go past
        the end of the image."""
        if count >= self.per_block:
            return self._allocate_at_end(count)
        while True:
            # Everything below the first free cluster is in use: later searches start there.
            self.free_hint = self._next_free(self.free_hint)
            start = self._find_free_run(self.free_hint, count)
            # New refcount blocks may land inside the run (on a region's first cluster);
            # the search then moves past them, into a region that has room for the run.
            for block_index in range(start // self.per_block,
                                     (start + count - 1) // self.per_block + 1):
                self._ensure_block(block_index)
            if all(self.get(c) == 0 for c in range(start, start + count)):
                break
        self._take(start, count)
        return start << self.cluster_bits

    def allocate_some(self, most: int) -> tuple[int, int]:
        """Take the free run that starts at the first free cluster, up to `most` clusters
        and within one refcount region; returns (host offset, clusters taken >= 1)."""
        while True:
            self.free_hint = start = self._next_free(self.free_hint)
            block_index = start // self.per_block
            self._ensure_block(block_index)  # may put the new block on `start` itself
            if self.get(start) == 0:
                break
        region_end = (block_index + 1) * self.per_block
        count = 1
        while count < most and start + count < region_end and self.get(start + count) == 0:
            count += 1
        self._take(start, count)
        return start << self.cluster_bits, count

    def _take(self, start: int, count: int) -> None:
        # Checked before the refcounts change, so a refused allocation leaves no trace.
        self.metadata.check_free(start, count)
        for c in range(start, start + count):
            self.add(c, 1)
        if start == self.free_hint:
            self.free_hint = start + count
        self.end_cluster = max(self.end_cluster, start + count)

    def release(self, offset: int, length: int) -> list[int]:
        """Drop one reference from every cluster touched by the byte range; returns the
        clusters that became free. A range holding a cluster with no reference to drop
        (refcount 0, or no refcount block: e.g. a damaged compressed descriptor pointing
        past the image) changes nothing and raises ReleaseRefused: qemu's update_refcount
        fails such a decrease as a whole too (undoing what it had done)."""
        first = offset >> self.cluster_bits
        count = ((offset + length - 1) >> self.cluster_bits) - first + 1
        counts = self.counts(first, count)
        if 0 in counts:
            c = first + counts.index(0)
            raise ReleaseRefused(f"cluster 0x{c << self.cluster_bits:x} has no reference "
                                 "to drop")
        # A refcount block at a time: a snapshot's deletion drops a reference from
        # every cluster of the image (issue 17).
        freed = []
        c = first
        for block, start, n in self._block_runs(first, count):
            values = [v - 1 for v in block.get_range(start, n)]
            block.set_range(start, values)
            self.cache.mark_dirty(self.table[c // self.per_block] & ~REFTABLE_ENTRY_RESERVED,
                                  block)
            if 0 in values:
                freed += [c + k for k, v in enumerate(values) if not v]
            c += n
        if freed and freed[0] < self.free_hint:
            self.free_hint = freed[0]
        return freed

    def _next_free(self, cluster: int) -> int:
        while True:
            block_index, i = divmod(cluster, self.per_block)
            block = self._block(block_index)
            if block is None:
                return cluster
            j = block.find_zero(i)
            if j >= 0:
                return block_index * self.per_block + j
            cluster = (block_index + 1) * self.per_block

    def _find_free_run(self, cluster: int, count: int) -> int:
        start = self._next_free(cluster)
        while True:
            for c in range(start + 1, start + count):
                if self.get(c):
                    start = self._next_free(c + 1)
                    break
            else:
                return start

    def _ensure_block(self, block_index: int) -> None:
        """Give region `block_index` a refcount block if it has none. Made durable at
        once, before the table entry that names it: this happens once per region."""
        if block_index >= len(self.table):
            self._grow_table(block_index + 1)
        if self.table[block_index]:
            return
        cluster = block_index * self.per_block
        offset = cluster << self.cluster_bits
        block = self._block_class(bytes(self.cluster_size), self.bits)
        block.set(0, 1)  # it describes itself
        self.metadata.check_free(cluster, 1)
        self.storage.pwrite(block.encode(), offset)
        self.storage.sync(Barrier.NEW_REFBLOCK)
        self.table[block_index] = offset
        self.storage.pwrite(_U64.pack(offset), self.table_offset + block_index * 8)
        self.metadata.add(cluster)
        self.cache.mark_dirty(offset, block)  # already on disk; rewriting it is harmless
        self.end_cluster = max(self.end_cluster, cluster + 1)

    def _area_blocks(self, base: int, count: int) -> tuple[list[int], int]:
        """For `count` clusters from `base` followed by the refcount blocks they need: the
        regions that need a new block, and the area's end (a fixed point, since the new
        blocks may reach into further regions)."""
        needed: list[int] = []
        while True:
            end = base + count + len(needed)
            regions = range(base // self.per_block, (end - 1) // self.per_block + 1)
            now = [b for b in regions if b >= len(self.table) or not self.table[b]]
            if len(now) == len(needed):
                return needed, end
            needed = now

    def _fill_area(self, base: int, end: int, blocks: dict) -> None:
        """Refcount 1 for every cluster of [base, end): in the new `blocks` (region ->
        block, not yet written) or, for regions that have one, in their block."""
        for c in range(base, end):
            self.metadata.check_free(c, 1)
            block_index, i = divmod(c, self.per_block)
            if block_index in blocks:
                blocks[block_index].set(i, 1)
            else:
                self.add(c, 1)

    def _new_blocks(self, regions: list[int]) -> dict:
        """Empty refcount blocks for `regions`, in order (region -> block)."""
        return {b: self._block_class(bytes(self.cluster_size), self.bits) for b in regions}

    def _adopt_blocks(self, blocks: dict, first: int) -> None:
        """New blocks, stored from cluster `first` on, become metadata and cached."""
        metadata = self.metadata
        for n, (block_index, block) in enumerate(blocks.items()):
            metadata.add(first + n)
            self.cache.mark_dirty((first + n) << self.cluster_bits, block)

    def _allocate_at_end(self, count: int) -> int:
        """`count` clusters past everything in use, their new refcount blocks right after
        them: blocks written and synced before the table entries that point to them."""
        base = max(self.end_cluster, 1)
        needed, end = self._area_blocks(base, count)
        if needed and needed[-1] >= len(self.table):
            self._grow_table(needed[-1] + 1)
            return self._allocate_at_end(count)
        first_block = base + count
        blocks = self._new_blocks(needed)
        self._fill_area(base, end, blocks)
        for n, block in enumerate(blocks.values()):
            self.storage.pwrite(block.encode(), (first_block + n) << self.cluster_bits)
        self.cache.flush(Barrier.NEW_REFBLOCK)
        for n, block_index in enumerate(blocks):
            offset = (first_block + n) << self.cluster_bits
            self.table[block_index] = offset
            self.storage.pwrite(_U64.pack(offset), self.table_offset + block_index * 8)
        self._adopt_blocks(blocks, first_block)
        self.end_cluster = max(self.end_cluster, end)
        return base << self.cluster_bits

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger one at the end of the image, together with
        the new refcount blocks that describe it (as QEMU does), then switch the header."""
        per_cluster = self.cluster_size // 8
        entries = max(min_entries, len(self.table) * 2)
        base = max(self.end_cluster, 1)
        while True:
            table_clusters = -(-entries // per_cluster)
            needed, end = self._area_blocks(base, table_clusters)
            if end // self.per_block < entries:
                break
            entries = end // self.per_block + 1
        if (table_clusters << self.cluster_bits) > 8 << 20:
            raise IOFailure("the refcount table would exceed 8 MiB", 27)  # EFBIG
        new_table = array("Q", self.table) + array("Q", bytes(8 * (table_clusters * per_cluster
                                                                  - len(self.table))))
        first_block = base + table_clusters
        blocks = self._new_blocks(needed)
        for n, block_index in enumerate(blocks):
            new_table[block_index] = (first_block + n) << self.cluster_bits
        self._fill_area(base, end, blocks)
        for block_index, block in blocks.items():
            self.storage.pwrite(block.encode(), new_table[block_index])
        encoded = array("Q", new_table)
        if _SWAP:
            encoded.byteswap()
        self.storage.pwrite(encoded.tobytes(), base << self.cluster_bits)
        self.cache.flush(Barrier.BEFORE_HEADER)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        self.table_offset = base << self.cluster_bits
        self.table_clusters = table_clusters
        self._header_writer.move_reftable(self.table_offset, table_clusters)
        self.end_cluster = max(self.end_cluster, end)
        self._adopt_blocks(blocks, first_block)
        metadata = self.metadata
        for c in range(old_offset >> self.cluster_bits, (old_offset >> self.cluster_bits) + old_clusters):
            metadata.remove(c)
        for c in range(base, base + table_clusters):
            metadata.add(c)
        # The header now points at the new table: the old one is unreferenced.
        self.release(old_offset, old_clusters << self.cluster_bits)


def _encode_block(block) -> bytes:
    return block.encode()
