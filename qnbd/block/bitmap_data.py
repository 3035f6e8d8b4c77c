"""A persistent bitmap's bits, paged from the image instead of loaded whole (issue 16.3).

qcow2.rst "Bitmap table" / "Bitmap data": bitmap data is cut into cluster-sized chunks;
chunk i holds bits [i * 8 * cluster_size, (i + 1) * 8 * cluster_size), and its table
entry is a data cluster, 0 (all bits clear) or 0 with bit 0 set (all bits set). Parallels
bitmaps (parallels.txt "Dirty bitmaps feature") are chunked the same way; their reader
translates its L1 entries into this encoding, so both formats share these bits.

A bitmap of a 2 TiB disk at granularity 512 holds 512 MiB of bits, and a single image
may carry many; loading them all at open cost gigabytes for a server that may export
none. So a `DirtyBitmap` keeps:
- the *base*: the table as stored, whose data clusters are read on demand through a
  bounded LRU (`ChunkReader`, shared by every bitmap of an image);
- the *overlay*: per chunk, the bits set since the base was read (a sparse dict: a chunk
  missing is unchanged, `ALL_SET` is a whole chunk set). Bits only ever become set
  between two stores (writes, zeroes, discards and merges set bits; `clear` drops the
  base), so a chunk's bits are base | overlay and marking a write never reads the disk.
Memory is then the overlay (what changed) plus the LRU, whatever the table claims.
"""

import re
from array import array

import cachetools

# A table entry (qcow2.rst "Bitmap table"): a data cluster's host offset, or 0 with
# TABLE_ENTRY_ALL_ONES clear (all bits clear) or set (all bits set).
TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ENTRY_ALL_ONES = 1

_NON_ZERO = re.compile(rb"[^\x00]")
_NON_FF = re.compile(rb"[^\xff]")
READ_CACHE_BYTES = 8 << 20  # clean data clusters kept per image, for reads of the bits


def bitmap_bytes(disk_size: int, granularity: int) -> int:
    return -(-(-(-disk_size // granularity)) // 8)


class _Uniform:
    """A chunk whose bits are all equal: what table entries 0 and 1 mean (qcow2.rst
    "Bitmap table"), and what a whole-chunk change makes, without a cluster in memory."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


ALL_CLEAR = _Uniform("ALL_CLEAR")
ALL_SET = _Uniform("ALL_SET")  # tail bits past the disk's end aside


class ChunkReader:
    """Bitmap data clusters read from the image through one bounded LRU, keyed by host
    offset. `forget` must follow any store: released clusters may be reused for data."""

    def __init__(self, file, cluster_size: int, budget: int = READ_CACHE_BYTES):
        self.file = file
        self.cluster_size = cluster_size
        self._cache = cachetools.LRUCache(max(4, budget // cluster_size))

    def read(self, offset: int) -> bytes:
        data = self._cache.get(offset)
        if data is None:
            data = self.file.pread(self.cluster_size, offset)
            data += bytes(self.cluster_size - len(data))
            self._cache[offset] = data
        return data

    def forget(self) -> None:
        self._cache.clear()


class DirtyBitmap:
    """One bitmap: the directory entry it came from (or will become), its stored table
    (None: nothing stored, all clear) and the bits set since. Of the entry (a qcow2
    directory entry, a parallels bitmap feature) only its name, granularity_bits and
    granularity are used."""

    def __init__(self, entry, disk_size: int, cluster_size: int,
                 reader: ChunkReader | None = None, table: array | None = None):
        self.entry = entry
        self.disk_size = disk_size
        self.cluster_size = cluster_size
        self.nbits = -(-disk_size // entry.granularity)
        self.chunk_bits = cluster_size * 8
        self.chunks = -(-bitmap_bytes(disk_size, entry.granularity) // cluster_size)
        self._reader = reader
        self._table = table
        self._overlay: dict[int, bytearray | _Uniform] = {}

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def granularity(self) -> int:
        return self.entry.granularity

    # -- changes -----------------------------------------------------------------------

    def set_range(self, offset: int, length: int) -> None:
        """Mark guest bytes [offset, offset+length) dirty (clipped to the disk)."""
        length = min(length, self.disk_size - offset)
        if length <= 0:
            return
        g = self.entry.granularity_bits
        first, last = offset >> g, (offset + length - 1) >> g
        cb = self.chunk_bits
        while first <= last:
            idx = first // cb
            stop = min(last, (idx + 1) * cb - 1)
            self._set_in_chunk(idx, first - idx * cb, stop - idx * cb)
            first = stop + 1

    def _set_in_chunk(self, idx: int, first: int, last: int) -> None:
        over = self._overlay.get(idx)
        if over is ALL_SET:
            return
        if first == 0 and last == self.chunk_bits - 1:
            self._overlay[idx] = ALL_SET
            return
        if over is None:
            over = self._overlay[idx] = bytearray(self.cluster_size)
        _fill(over, first, last)

    def clear(self) -> None:
        self._table = None
        self._overlay = {}

    def merge_from(self, other: "DirtyBitmap") -> None:
        """Every range dirty in `other` becomes dirty here (granularities may differ).
        Between bitmaps of one geometry (same disk, granularity and cluster size: the
        usual merge within an image), chunk by chunk, without walking runs."""
        if (other.granularity, other.cluster_size, other.disk_size) == \
                (self.granularity, self.cluster_size, self.disk_size):
            for idx in range(min(self.chunks, other.chunks)):
                self._merge_chunk(idx, other.chunk(idx))
            return
        pos = 0
        for length, dirty in other.extents(0, other.disk_size):
            if dirty:
                self.set_range(pos, length)
            pos += length

    def _merge_chunk(self, idx: int, data) -> None:
        if data is ALL_CLEAR:
            return
        over = self._overlay.get(idx)
        if data is ALL_SET or over is ALL_SET:
            self._overlay[idx] = ALL_SET
        elif over is None:
            self._overlay[idx] = bytearray(data)
        else:
            self._overlay[idx] = bytearray(_or(over, data))

    def resize(self, disk_size: int) -> None:
        """Follow a resized disk (qemu's hbitmap_truncate): bits past a shrunk end are
        dropped, a grown end starts clean. The chunks holding the old and the new end
        are rewritten at the next store, their bits past the smaller end cleared (bits
        past the end must be zero on disk, and an all-set chunk's tail was not counted
        until now); the base keeps naming the others."""
        cb = self.chunk_bits
        new_nbits = -(-disk_size // self.entry.granularity)
        edges = {(n - 1) // cb for n in (self.nbits, new_nbits) if n}
        self.nbits = min(self.nbits, new_nbits)  # what _chunk_bytes keeps of the edges
        edge_bytes = {idx: self._chunk_bytes(idx) for idx in edges if idx < self.chunks}
        self.disk_size, self.nbits = disk_size, new_nbits
        self.chunks = -(-bitmap_bytes(disk_size, self.entry.granularity) // self.cluster_size)
        self._overlay = {i: o for i, o in self._overlay.items() if i < self.chunks}
        if self._table is not None:
            self._table = array("Q", self._table[:self.chunks])
        for idx, data in edge_bytes.items():
            if idx < self.chunks:
                self._overlay[idx] = bytearray(data)
                if self._table is not None and idx < len(self._table):
                    self._table[idx] = 0

    # -- reading -----------------------------------------------------------------------

    def chunk(self, idx: int):
        """Chunk `idx`'s bits: ALL_CLEAR, ALL_SET or cluster_size bytes (base | overlay)."""
        over = self._overlay.get(idx)
        if over is ALL_SET:
            return ALL_SET
        base = self._base_chunk(idx)
        if over is None or base is ALL_SET:
            return base
        return over if base is ALL_CLEAR else _or(base, over)

    def _base_chunk(self, idx: int):
        if self._table is None or idx >= len(self._table):
            return ALL_CLEAR
        e = self._table[idx]
        offset = e & TABLE_ENTRY_OFFSET_MASK
        if offset:
            return self._reader.read(offset)
        return ALL_SET if e & TABLE_ENTRY_ALL_ONES else ALL_CLEAR

    def extents(self, offset: int, length: int):
        """(length, dirty) runs covering [offset, offset+length), clipped to the disk, at
        granularity boundaries; adjacent runs merged. A generator: a consumer that stops
        early (a reply's descriptor cap) pays only for the chunks it looked at."""
        g = self.granularity
        end = min(offset + length, self.disk_size)
        span = self.chunk_bits * g  # guest bytes per chunk
        run, run_dirty = 0, False
        pos = offset
        while pos < end:
            idx = pos // span
            chunk_end = min(end, (idx + 1) * span)
            data = self.chunk(idx)
            if data is ALL_CLEAR or data is ALL_SET:
                pieces = ((chunk_end - pos, data is ALL_SET),)
            else:
                pieces = _runs(data, idx * span, pos, chunk_end, g)
            for n, dirty in pieces:
                if dirty == run_dirty or not run:
                    run, run_dirty = run + n, dirty
                else:
                    yield run, run_dirty
                    run, run_dirty = n, dirty
            pos = chunk_end
        if run:
            yield run, run_dirty

    # -- storing -----------------------------------------------------------------------

    def table_to_store(self, place) -> list[int]:
        """The bitmap table to store. A chunk unchanged since the base keeps its entry
        (its data cluster is reused, never rewritten). A changed chunk with every bit set
        and none past the disk's end becomes entry 1 (qcow2.rst "Bitmap table": all
        ones; a whole-disk zero of a 2 TiB disk would otherwise write 512 MiB of 0xff per
        bitmap); any other gets `place(produce)`, which allocates its cluster and returns
        the entry, `produce()` giving the bytes only when they are written (one chunk in
        memory at a time)."""
        last_full = self.nbits % self.chunk_bits == 0
        table = []
        for idx in range(self.chunks):
            if idx not in self._overlay and self._table is not None:
                table.append(self._table[idx] if idx < len(self._table) else 0)
                continue
            data = self.chunk(idx)
            if data is ALL_CLEAR:
                table.append(0)
            elif data is ALL_SET and (idx < self.chunks - 1 or last_full):
                table.append(TABLE_ENTRY_ALL_ONES)
            else:
                table.append(place(lambda idx=idx: self._chunk_bytes(idx)))
        return table

    def stored(self, table: array) -> None:
        """The bits are now those of `table` on disk: drop the overlay."""
        self._table = table
        self._overlay = {}

    def _chunk_bytes(self, idx: int) -> bytes:
        """Chunk `idx` as stored: cluster_size bytes, bits past the disk's end clear
        (qcow2.rst "Bitmap data": they must be zero)."""
        data = self.chunk(idx)
        cs = self.cluster_size
        if data is ALL_CLEAR:
            return bytes(cs)
        out = bytearray(b"\xff" * cs) if data is ALL_SET else bytearray(data)
        valid = self.nbits - idx * self.chunk_bits  # bits of this chunk inside the disk
        if valid < self.chunk_bits:
            keep = valid // 8
            if valid % 8:
                out[keep] &= (1 << (valid % 8)) - 1
                keep += 1
            out[keep:] = bytes(cs - keep)
        return bytes(out)


def _or(a, b) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")


def _fill(bits: bytearray, first: int, last: int) -> None:
    """Set bits first..last inclusive (bit n is bit n % 8 of byte n // 8, qcow2.rst)."""
    fb, lb = first >> 3, last >> 3
    if fb == lb:
        bits[fb] |= ((1 << (last - first + 1)) - 1) << (first & 7)
        return
    bits[fb] |= (0xFF << (first & 7)) & 0xFF
    if lb > fb + 1:
        bits[fb + 1:lb] = b"\xff" * (lb - fb - 1)
    bits[lb] |= (1 << ((last & 7) + 1)) - 1


def _bit(data, b: int) -> bool:
    return bool(data[b >> 3] >> (b & 7) & 1)


def _runs(data, chunk_start: int, pos: int, end: int, g: int):
    """(length, dirty) runs of guest bytes [pos, end) inside the chunk whose bits are
    `data` and which begins at guest byte `chunk_start`."""
    while pos < end:
        b = (pos - chunk_start) // g
        dirty = _bit(data, b)
        stop = min(end, chunk_start + _next_change(data, b, dirty) * g)
        yield stop - pos, dirty
        pos = stop


def _next_change(data, bit: int, dirty: bool) -> int:
    """The first bit after `bit` whose value differs from `dirty` (or the chunk's end)."""
    nbits = len(data) * 8
    b = bit + 1
    while b & 7:
        if b >= nbits or _bit(data, b) != dirty:
            return b
        b += 1
    m = (_NON_FF if dirty else _NON_ZERO).search(data, b >> 3)
    if m is None:
        return nbits
    b = m.start() * 8
    while _bit(data, b) == dirty:
        b += 1
    return b
