"""Persistent dirty bitmaps: qcow2.rst "Bitmaps extension", "Bitmap directory",
"Bitmap table", "Bitmap data" and "Dirty tracking bitmaps"; qemu docs/interop/bitmaps.rst.

On disk: the header extension points to a directory of variable-length entries; each entry
points to a bitmap table whose entries point to data clusters (or are 0: all zeros, or
0 with bit 0 set: all ones). Bit n of the data covers guest bytes [n*g, (n+1)*g), bits
are numbered from the least significant bit of each byte.

In memory: one `DirtyBitmap` (a bytearray of bits) per usable entry. docs/DESIGN.md rule 9
gives the life cycle: in_use set on disk at read-write open, every write/zero/discard
marks the `auto` bitmaps, clean close stores them and clears in_use. An entry found in_use
at open is inconsistent: kept on disk untouched, never loaded or exported, only removable.
"""

import re
import struct
from dataclasses import dataclass, field

from ..errors import ImageError, printable

BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
_ENTRY = struct.Struct(">QIIBBHI")  # fixed part of a directory entry, bytes 0-23
_U64 = struct.Struct(">Q")

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1

TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ENTRY_ALL_ONES = 1
TABLE_ENTRY_RESERVED = 0xFF000000000001FE

# qemu's implementation limits (block/qcow2-bitmap.c), adopted so images stay portable.
MAX_BITMAPS = 65535
MAX_NAME_SIZE = 1023
MAX_DIRECTORY_SIZE = 64 << 20
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_SIZE = 1 << 30  # qemu: BME_MAX_TABLE_SIZE 0x8000000 entries; we cap bytes
_NON_ZERO = re.compile(rb"[^\x00]")
_NON_FF = re.compile(rb"[^\xff]")


def bitmap_bytes(disk_size: int, granularity: int) -> int:
    return -(-(-(-disk_size // granularity)) // 8)


def table_entries(disk_size: int, granularity: int, cluster_size: int) -> int:
    return -(-bitmap_bytes(disk_size, granularity) // cluster_size)


@dataclass
class DirectoryEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    @property
    def usable(self) -> bool:
        """Loadable: consistent, and any extra data is declared safe to ignore."""
        return not self.in_use and (not self.extra_data
                                    or bool(self.flags & FLAG_EXTRA_DATA_COMPATIBLE))

    def encode(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(self.table_offset, self.table_size, self.flags, self.type,
                          self.granularity_bits, len(name), len(self.extra_data))
        raw += self.extra_data + name
        return raw + bytes(-len(raw) % 8)


def encode_directory(entries: list[DirectoryEntry]) -> bytes:
    return b"".join(e.encode() for e in entries)


def parse_extension(data: bytes) -> tuple[int, int, int]:
    """(nb_bitmaps, directory size, directory offset) from the header extension."""
    if len(data) < BITMAPS_EXT.size:
        raise ImageError("bitmaps extension is too short")
    nb, reserved, size, offset = BITMAPS_EXT.unpack_from(data)
    if reserved:
        raise ImageError("bitmaps extension has non-zero reserved bits")
    if not 1 <= nb <= MAX_BITMAPS:
        raise ImageError(f"bitmaps extension lists {nb} bitmaps (1 to {MAX_BITMAPS} allowed)")
    if size > MAX_DIRECTORY_SIZE:
        raise ImageError(f"bitmap directory of {size} bytes is too large")
    return nb, size, offset


def read_directory(file, ext: bytes, disk_size: int, cluster_size: int,
                   file_size: int) -> list[DirectoryEntry]:
    """Parse and validate the bitmap directory the extension points to."""
    nb, size, offset = parse_extension(ext)
    if offset % cluster_size:
        raise ImageError(f"bitmap directory offset 0x{offset:x} is not aligned to a cluster")
    if offset + size > file_size:
        raise ImageError(f"bitmap directory offset 0x{offset:x} is past the end of the file")
    raw = file.pread(size, offset)
    entries = []
    pos = 0
    names = set()
    for n in range(nb):
        if pos + _ENTRY.size > len(raw):
            raise ImageError(f"bitmap directory entry {n} runs past the directory's end")
        table_offset, table_size, flags, kind, gbits, name_size, extra_size = \
            _ENTRY.unpack_from(raw, pos)
        end = pos + _ENTRY.size + extra_size + name_size
        if end > len(raw):
            raise ImageError(f"bitmap directory entry {n} runs past the directory's end")
        extra = raw[pos + _ENTRY.size:pos + _ENTRY.size + extra_size]
        try:
            name = raw[end - name_size:end].decode("utf-8")
        except UnicodeDecodeError:
            raise ImageError(f"bitmap directory entry {n} has a name that is not UTF-8") from None
        pos = end + (-end % 8)
        where = f"bitmap '{printable(name)}'"  # names come from the image
        if not 0 < name_size <= MAX_NAME_SIZE:
            raise ImageError(f"{where} has an invalid name size {name_size}")
        if name in names:
            raise ImageError(f"{where} appears twice in the bitmap directory")
        names.add(name)
        if flags & ~FLAGS_KNOWN:
            raise ImageError(f"{where} has reserved flag bits set (0x{flags:x})")
        if kind != TYPE_DIRTY_TRACKING:
            raise ImageError(f"{where} has unknown type {kind}")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise ImageError(f"{where} has unsupported granularity 2^{gbits}")
        expected = table_entries(disk_size, 1 << gbits, cluster_size)
        if table_size != expected:
            raise ImageError(f"{where} has a bitmap table of {table_size} entries; the disk "
                             f"size needs {expected}")
        if table_offset % cluster_size:
            raise ImageError(f"{where} table offset 0x{table_offset:x} is not aligned")
        if table_offset + table_size * 8 > file_size:
            raise ImageError(f"{where} table offset 0x{table_offset:x} is past the end of "
                             "the file")
        entries.append(DirectoryEntry(name, table_offset, table_size, flags, gbits, kind,
                                      extra))
    if pos != size:
        raise ImageError(f"bitmap directory size {size} does not match its {nb} entries")
    return entries


def read_table(file, entry: DirectoryEntry, cluster_size: int, file_size: int) -> list[int]:
    """The bitmap table's entries, each checked (reserved bits, alignment, bounds)."""
    raw = file.pread(entry.table_size * 8, entry.table_offset)
    table = list(struct.unpack(f">{entry.table_size}Q", raw))
    for e in table:
        offset = e & TABLE_ENTRY_OFFSET_MASK
        if e & TABLE_ENTRY_RESERVED or (offset and e & TABLE_ENTRY_ALL_ONES):
            raise ImageError(f"bitmap '{printable(entry.name)}' table entry 0x{e:016x} is invalid")
        if offset % cluster_size or offset + cluster_size > file_size:
            raise ImageError(f"bitmap '{printable(entry.name)}' data cluster 0x{offset:x} is "
                             "invalid")
    return table


@dataclass
class DirtyBitmap:
    """A bitmap's bits in memory plus the directory entry it came from (or will become)."""

    entry: DirectoryEntry
    disk_size: int
    bits: bytearray = field(default=None)

    def __post_init__(self):
        if self.bits is None:
            self.bits = bytearray(bitmap_bytes(self.disk_size, self.entry.granularity))

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def granularity(self) -> int:
        return self.entry.granularity

    def load(self, file, table: list[int], cluster_size: int) -> None:
        for i, e in enumerate(table):
            start = i * cluster_size
            n = min(cluster_size, len(self.bits) - start)
            offset = e & TABLE_ENTRY_OFFSET_MASK
            if offset:
                chunk = file.pread(n, offset)
                self.bits[start:start + len(chunk)] = chunk
            elif e & TABLE_ENTRY_ALL_ONES:
                self.bits[start:start + n] = b"\xff" * n
        self._clear_tail()

    def _clear_tail(self) -> None:
        # qcow2.rst: unused tail bits of the last cluster must be zero.
        nbits = -(-self.disk_size // self.granularity)
        if nbits % 8:
            self.bits[-1] &= (1 << (nbits % 8)) - 1

    def set_range(self, offset: int, length: int) -> None:
        """Mark guest bytes [offset, offset+length) dirty."""
        if length <= 0:
            return
        g = self.entry.granularity_bits
        self._fill(offset >> g, (offset + length - 1) >> g)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def merge_from(self, other: "DirtyBitmap") -> None:
        """Every range dirty in `other` becomes dirty here (granularities may differ)."""
        pos = 0
        for length, dirty in other.extents(0, other.disk_size):
            if dirty:
                self.set_range(pos, length)
            pos += length

    def _fill(self, first: int, last: int) -> None:
        """Set bits first..last inclusive."""
        bits = self.bits
        fb, lb = first >> 3, last >> 3
        if fb == lb:
            mask = ((1 << (last - first + 1)) - 1) << (first & 7)
            bits[fb] |= mask
            return
        bits[fb] |= (0xFF << (first & 7)) & 0xFF
        if lb > fb + 1:
            bits[fb + 1:lb] = b"\xff" * (lb - fb - 1)
        bits[lb] |= (1 << ((last & 7) + 1)) - 1

    def is_dirty(self, bit: int) -> bool:
        return bool(self.bits[bit >> 3] >> (bit & 7) & 1)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, dirty) runs covering [offset, offset+length), clipped to the disk, at
        granularity boundaries."""
        g = self.granularity
        end = min(offset + length, self.disk_size)
        out: list[tuple[int, bool]] = []
        pos = offset
        while pos < end:
            bit = pos // g
            dirty = self.is_dirty(bit)
            nxt = self._next_change(bit, dirty)
            stop = min(end, nxt * g)
            if out and out[-1][1] == dirty:
                out[-1] = (out[-1][0] + stop - pos, dirty)
            else:
                out.append((stop - pos, dirty))
            pos = stop
        return out

    def _next_change(self, bit: int, dirty: bool) -> int:
        """The first bit after `bit` whose value differs from `dirty`."""
        bits = self.bits
        b = bit + 1
        while b & 7:
            if b >> 3 >= len(bits) or self.is_dirty(b) != dirty:
                return b
            b += 1
        m = (_NON_FF if dirty else _NON_ZERO).search(bits, b >> 3)
        if m is None:
            return len(bits) * 8
        b = m.start() * 8
        while self.is_dirty(b) == dirty:
            b += 1
        return b


def data_clusters(table: list[int]) -> list[int]:
    """Host offsets of the data clusters a bitmap table owns."""
    return [e & TABLE_ENTRY_OFFSET_MASK for e in table if e & TABLE_ENTRY_OFFSET_MASK]


def encode_table(table: list[int]) -> bytes:
    return struct.pack(f">{len(table)}Q", *table)


def check_new_bitmap(name: str, granularity: int, existing: list, version: int) -> int:
    """Validate a bitmap to be added; returns its granularity bits."""
    if version < 3:
        raise ImageError("bitmaps need a version 3 image (compat=1.1)")
    if not name or len(name.encode()) > MAX_NAME_SIZE:
        raise ImageError(f"bitmap name must be 1 to {MAX_NAME_SIZE} bytes")
    if any(b.name == name for b in existing):
        raise ImageError(f"bitmap '{name}' already exists")
    if len(existing) >= MAX_BITMAPS:
        raise ImageError(f"an image holds at most {MAX_BITMAPS} bitmaps")
    gbits = granularity.bit_length() - 1
    if granularity != 1 << gbits or not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
        raise ImageError(f"granularity {granularity} must be a power of two from 512 to 2G")
    return gbits
