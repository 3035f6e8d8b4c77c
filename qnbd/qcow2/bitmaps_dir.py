"""The persistent-bitmap directory, read-only: qcow2.rst, "Bitmaps extension" and
"Bitmap directory".

The bitmaps header extension points to a contiguous directory of variable-length entries,
one per bitmap (its table location, flags, type, granularity, name). Everything is checked
against the spec's rules and qemu's implementation limits before it is returned, so a
damaged directory gives a one-line ImageError, never a bad index or a huge read.
"""

import struct
from dataclasses import dataclass

from ..errors import ImageError
from . import header as hdr

EXTENSION = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type,
#                                    granularity_bits, name_size, extra_data_size

FLAG_IN_USE = 1 << 0  # not saved cleanly: may be inconsistent
FLAG_AUTO = 1 << 1  # enabled: must track every write
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1

# qemu's limits (block/qcow2-bitmap.c, block/qcow2.h)
MAX_BITMAPS = 65535
MAX_NAME_SIZE = 1023
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_ENTRIES = 0x8000000


@dataclass(frozen=True)
class BitmapEntry:
    name: str
    table_offset: int
    table_size: int  # entries (one per cluster of bitmap data)
    flags: int
    type: int
    granularity_bits: int
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


@dataclass(frozen=True)
class Directory:
    offset: int
    size: int
    entries: tuple[BitmapEntry, ...]


def read_directory(file, header: hdr.Header, file_size: int) -> Directory | None:
    """The bitmap directory of the image open as `file` (a fileio.File), or None when the
    image has no bitmaps extension or its autoclear bit is clear: then, by the spec, the
    extension's data is not consistent and must not be used."""
    ext = header.extension(hdr.EXT_BITMAPS)
    if ext is None or not header.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        return None
    if header.version < 3:
        raise ImageError("bitmaps extension in a version 2 image")
    if len(ext) < EXTENSION.size:
        raise ImageError(f"bitmaps extension is {len(ext)} bytes long (at least "
                         f"{EXTENSION.size})")
    nb, reserved, size, offset = EXTENSION.unpack_from(ext)
    if reserved:
        raise ImageError("bitmaps extension has a non-zero reserved field")
    if not 1 <= nb <= MAX_BITMAPS:
        raise ImageError(f"bitmaps extension holds {nb} bitmaps (1 to {MAX_BITMAPS})")
    if not ENTRY.size * nb <= size <= MAX_DIRECTORY_SIZE:
        raise ImageError(f"bitmap directory size {size} is invalid for {nb} bitmaps")
    if offset % header.cluster_size or offset == 0:
        raise ImageError(f"bitmap directory offset 0x{offset:x} is not aligned to a cluster")
    if offset + size > file_size:
        raise ImageError(f"bitmap directory offset 0x{offset:x} is past the end of the file")
    data = file.pread(size, offset)
    if len(data) != size:
        raise ImageError("bitmap directory is truncated")
    entries = _parse_entries(data, nb, header, file_size)
    return Directory(offset, size, entries)


def _parse_entries(data: bytes, nb: int, header: hdr.Header, file_size: int):
    entries = []
    names = set()
    pos = 0
    for index in range(nb):
        if pos + ENTRY.size > len(data):
            raise ImageError(f"bitmap directory entry {index} runs past the directory end")
        (table_offset, table_size, flags, type_, gran_bits, name_size,
         extra_size) = ENTRY.unpack_from(data, pos)
        var_end = pos + ENTRY.size + extra_size + name_size
        if var_end > len(data):
            raise ImageError(f"bitmap directory entry {index} runs past the directory end")
        extra = data[pos + ENTRY.size:pos + ENTRY.size + extra_size]
        raw_name = data[pos + ENTRY.size + extra_size:var_end]
        end = var_end + (-var_end % 8)  # entries are padded to 8 bytes with zeros
        if any(data[var_end:end]):
            raise ImageError(f"bitmap directory entry {index} has non-zero padding")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ImageError(f"bitmap {index} has a name that is not valid UTF-8") from None
        entry = BitmapEntry(name, table_offset, table_size, flags, type_, gran_bits, extra)
        _check_entry(entry, index, header, file_size)
        if name in names:
            raise ImageError(f"bitmap name '{name}' appears twice")
        names.add(name)
        entries.append(entry)
        pos = end
    if pos != len(data):
        raise ImageError(f"bitmap directory size {len(data)} does not match its "
                         f"{nb} entries ({pos} bytes)")
    return tuple(entries)


def _check_entry(e: BitmapEntry, index: int, header: hdr.Header, file_size: int) -> None:
    what = f"bitmap '{e.name}'" if e.name else f"bitmap {index}"
    if not 1 <= len(e.name.encode()) <= MAX_NAME_SIZE:
        raise ImageError(f"{what}: name length must be 1 to {MAX_NAME_SIZE} bytes")
    if e.flags & ~KNOWN_FLAGS:
        raise ImageError(f"{what}: reserved flags 0x{e.flags & ~KNOWN_FLAGS:x} are set")
    if e.type != TYPE_DIRTY_TRACKING:
        raise ImageError(f"{what}: unknown bitmap type {e.type}")
    if not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS:
        raise ImageError(f"{what}: granularity 2^{e.granularity_bits} is out of range "
                         f"(2^{MIN_GRANULARITY_BITS} to 2^{MAX_GRANULARITY_BITS})")
    cs = header.cluster_size
    if e.table_size > MAX_TABLE_ENTRIES:
        raise ImageError(f"{what}: bitmap table of {e.table_size} entries is too large")
    # One bit per granularity-sized chunk of the disk, stored in whole clusters.
    covered = e.table_size * cs * 8 << e.granularity_bits
    if covered < header.size:
        raise ImageError(f"{what}: bitmap table of {e.table_size} entries is too small "
                         "for the virtual size")
    if e.table_offset % cs:
        raise ImageError(f"{what}: table offset 0x{e.table_offset:x} is not aligned to a "
                         "cluster")
    if e.table_offset + e.table_size * 8 > file_size:
        raise ImageError(f"{what}: table offset 0x{e.table_offset:x} is past the end of "
                         "the file")
