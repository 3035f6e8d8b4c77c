"""Persistent dirty bitmaps: qcow2.rst "Bitmaps extension", "Bitmap directory",
"Bitmap table", "Bitmap data" and "Dirty tracking bitmaps"; qemu docs/interop/bitmaps.rst.

On disk: the header extension points to a directory of variable-length entries; each entry
points to a bitmap table whose entries point to data clusters (or are 0: all zeros, or
0 with bit 0 set: all ones). Bit n of the data covers guest bytes [n*g, (n+1)*g), bits
are numbered from the least significant bit of each byte.

In memory: one `DirtyBitmap` (bitmap_data.py, paged from disk) per usable entry.
docs/DESIGN.md rule 9 gives the life cycle: in_use set on disk at read-write open, every
write/zero/discard marks the `auto` bitmaps, clean close stores them and clears in_use. An
entry found in_use at open is inconsistent: kept on disk untouched, never loaded or
exported, only removable.
"""

import struct
import sys
from array import array
from collections import namedtuple

from ..block.bitmap_data import (  # noqa: F401 (the table encoding, named here too)
    TABLE_ENTRY_ALL_ONES, TABLE_ENTRY_OFFSET_MASK, bitmap_bytes)
from ..errors import ImageError, printable

BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
_ENTRY = struct.Struct(">QIIBBHI")  # fixed part of a directory entry, bytes 0-23
_U64 = struct.Struct(">Q")

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1

TABLE_ENTRY_RESERVED = 0xFF000000000001FE

# qemu's implementation limits (block/qcow2-bitmap.c, BME_*), adopted so images stay
# portable and so that no size an image claims makes us allocate more than qemu would.
MAX_BITMAPS = 65535
MAX_NAME_SIZE = 1023
MAX_DIRECTORY_SIZE = 64 << 20
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_SIZE = 0x8000000  # entries
MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap data (table entries x cluster size)


def table_entries(disk_size: int, granularity: int, cluster_size: int) -> int:
    return -(-bitmap_bytes(disk_size, granularity) // cluster_size)


# A named tuple, not a dataclass: `qnbd check` reads the directory, and the dataclasses
# import costs its start-up more than checking a sparse image (issue 17).
class DirectoryEntry(namedtuple("DirectoryEntry", ("name", "table_offset", "table_size",
                                                   "flags", "granularity_bits", "type",
                                                   "extra_data"),
                                defaults=(TYPE_DIRTY_TRACKING, b""))):
    __slots__ = ()

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
        raise ImageError(f"bitmap directory (0x{offset:x}, {size} bytes) runs past the end "
                         f"of the file ({file_size} bytes)")
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
        if not name_size:
            raise ImageError(f"bitmap directory entry {n} has an empty name")
        if name in names:
            raise ImageError(f"{where} appears twice in the bitmap directory")
        names.add(name)
        if not satisfies_constraints(table_offset, table_size, flags, kind, gbits, name_size,
                                     disk_size, cluster_size):
            raise ImageError(f"Bitmap '{printable(name)}' doesn't satisfy the constraints")
        if table_offset + table_size * 8 > file_size:
            raise ImageError(f"{where} table (0x{table_offset:x}, {table_size * 8} bytes) "
                             "runs past the end of the file")
        entries.append(DirectoryEntry(name, table_offset, table_size, flags, gbits, kind,
                                      extra))
    if pos != size:
        raise ImageError(f"bitmap directory size {size} does not match its {nb} entries")
    return entries


def satisfies_constraints(table_offset: int, table_size: int, flags: int, kind: int,
                          gbits: int, name_size: int, disk_size: int,
                          cluster_size: int) -> bool:
    """qemu's check_constraints (block/qcow2-bitmap.c): what every directory entry must
    satisfy before anything is read or allocated for it. Bounding table_size by
    MAX_PHYS_SIZE bounds the table read (at most 8 MiB, with 512-byte clusters) and the
    bitmap itself, whatever disk size the header claims. A table too large for the disk
    is tolerated (its extra entries are ignored); too small is an error unless the
    bitmap is in_use (inconsistent anyway, never loaded)."""
    if (table_size == 0 or table_offset == 0 or table_offset % cluster_size
            or table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS
            or flags & ~FLAGS_KNOWN or name_size > MAX_NAME_SIZE
            or kind != TYPE_DIRTY_TRACKING):
        return False
    phys = table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    return bool(flags & FLAG_IN_USE) or disk_size <= (phys * 8) << gbits


def read_table(file, entry: DirectoryEntry, cluster_size: int, file_size: int) -> array:
    """The bitmap table's entries, each checked (reserved bits, alignment, bounds); its
    size is bounded by the constraints read_directory enforced."""
    table = array("Q", file.pread(entry.table_size * 8, entry.table_offset))
    if sys.byteorder == "little":
        table.byteswap()  # stored big-endian
    for e in table:
        offset = e & TABLE_ENTRY_OFFSET_MASK
        if e & TABLE_ENTRY_RESERVED or (offset and e & TABLE_ENTRY_ALL_ONES):
            raise ImageError(f"bitmap '{printable(entry.name)}' table entry 0x{e:016x} is "
                             "invalid")
        if offset % cluster_size or offset + cluster_size > file_size:
            raise ImageError(f"bitmap '{printable(entry.name)}' data cluster 0x{offset:x} is "
                             "invalid")
    return table


def data_clusters(table) -> list[int]:
    """Host offsets of the data clusters a bitmap table owns."""
    return [e & TABLE_ENTRY_OFFSET_MASK for e in table if e & TABLE_ENTRY_OFFSET_MASK]


def encode_table(table: list[int]) -> bytes:
    return struct.pack(f">{len(table)}Q", *table)


def check_new_bitmap(name: str, granularity: int, existing: list, version: int,
                     disk_size: int, cluster_size: int) -> int:
    """Validate a bitmap to be added (qemu's check_constraints_on_bitmap); returns its
    granularity bits."""
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
    nbytes = bitmap_bytes(disk_size, granularity)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        raise ImageError("Too much space will be occupied by the bitmap. "
                         "Use larger granularity")
    return gbits
