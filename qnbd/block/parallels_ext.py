"""The Parallels Format Extension's dirty bitmaps (qemu docs/interop/parallels.txt, "Format
Extension" and "Dirty bitmaps feature"), read-only, as qemu's parallels driver loads them
when it opens an image read-only, and as qemu-nbd -B then exports them.

Layout (little-endian): the header's ext_off names one cluster (in sectors) that holds

    0   magic       EXT_MAGIC
    8   checksum    MD5 of the rest of the cluster (bytes 24 to its end)
    24  features, each a FEATURE_HEADER (magic, flags, data_size, unused) and data_size
        bytes of data padded to 8; the last one has magic END_OF_FEATURES.

A dirty bitmap feature's data is a BITMAP_FEATURE (disk size in sectors, a 16-byte id,
granularity in sectors, l1_size) and its L1 table: per cluster of bitmap data, 0 (all
bits clear), 1 (all set) or the sector of the cluster holding them. Bitmap data is
chunked as qcow2's (bit n covers guest bytes [n*g, (n+1)*g), numbered from each byte's
least significant bit), so the L1 table becomes a qcow2-style table and the bits are a
paged `DirtyBitmap` (bitmap_data.py): only the clusters a reader asks for are read.

qemu names each bitmap by its id printed as a UUID, and refuses to open an image whose
extension it cannot load; the same checks here give the same one-line errors. Memory is
bounded whatever the image claims: one extension cluster of at most MAX_EXT_CLUSTER bytes,
whose size bounds the L1 tables, and at most MAX_BITMAPS bitmaps.
"""

import hashlib
import struct
import sys
import uuid
from array import array
from dataclasses import dataclass

from ..errors import ImageError
from .bitmap_data import TABLE_ENTRY_ALL_ONES, ChunkReader, DirtyBitmap, bitmap_bytes

SECTOR = 512
EXT_MAGIC = 0xAB234CEF23DCEA87
END_OF_FEATURES = 0
DIRTY_BITMAP_FEATURE = 0x20385FAE252CB34A
EXT_HEADER = struct.Struct("<Q16s")
FEATURE_HEADER = struct.Struct("<QQII")
BITMAP_FEATURE = struct.Struct("<Q16sII")
L1_ALL_CLEAR, L1_ALL_SET = 0, 1
# qemu's bound on a bitmap's granularity (bdrv_create_dirty_bitmap: a power of two of at
# most UINT32_MAX bytes).
MAX_GRANULARITY = 1 << 31
# Our bounds, not qemu's: the extension cluster is read whole (qemu's default cluster is
# 1 MiB), and every bitmap it lists is kept described in memory.
MAX_EXT_CLUSTER = 16 << 20
MAX_BITMAPS = 65535


@dataclass(frozen=True)
class BitmapFeature:
    """One bitmap as the extension describes it. `auto` is False: the image is opened
    read-only, so its bitmaps record nothing (qemu marks them read-only)."""
    name: str
    granularity_bits: int
    auto: bool = False

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits


class ParallelsBitmaps:
    """The bitmaps of a parallels image: listed and found by name, never changed.
    `persistent` is False: qemu loads them as bitmaps that are not persistent, which
    qemu-img convert --bitmaps does not copy."""

    persistent = False

    def __init__(self, loaded: dict[str, DirtyBitmap] | None = None):
        self.loaded = loaded or {}

    def describe(self) -> list[BitmapFeature]:
        return [b.entry for b in self.loaded.values()]

    def get(self, name: str) -> DirtyBitmap:
        try:
            return self.loaded[name]
        except KeyError:
            raise ImageError(f"Bitmap '{name}' is not found") from None


def read_bitmaps(file, path: str, ext_off: int, cluster_size: int, disk_size: int,
                 file_size: int) -> ParallelsBitmaps:
    """Parse the Format Extension cluster at byte `ext_off` (block/parallels-ext.c,
    parallels_parse_format_extension: the same checks, in the same order)."""
    def fail(message: str):
        raise ImageError(f"'{path}': {message}")

    if cluster_size > MAX_EXT_CLUSTER:
        fail(f"a Format Extension in clusters of {cluster_size} bytes is not supported "
             f"(at most {MAX_EXT_CLUSTER})")
    if ext_off >= file_size:
        fail("the Format Extension cluster is past the end of the file")
    raw = file.pread(cluster_size, ext_off)
    raw += bytes(cluster_size - len(raw))  # qemu reads past the end of the file as zeros
    magic, checksum = EXT_HEADER.unpack_from(raw)
    if magic != EXT_MAGIC:
        fail(f"Wrong parallels Format Extension magic: 0x{magic:x}, expected: "
             f"0x{EXT_MAGIC:x}")
    if hashlib.md5(raw[EXT_HEADER.size:], usedforsecurity=False).digest() != checksum:
        fail("Wrong checksum in Format Extension header. Format extension is corrupted.")
    reader = ChunkReader(file, cluster_size)
    loaded: dict[str, DirtyBitmap] = {}
    pos = EXT_HEADER.size
    while True:
        if cluster_size - pos < FEATURE_HEADER.size:
            fail("the Format Extension cluster ends inside a feature header")
        magic, flags, data_size, _unused = FEATURE_HEADER.unpack_from(raw, pos)
        pos += FEATURE_HEADER.size
        if flags:
            fail("Flags for extension feature are unsupported")
        padded = data_size + (-data_size % 8)
        if padded > cluster_size - pos:
            fail("Feature data_size exceeds Format Extension cluster")
        if magic == END_OF_FEATURES:
            return ParallelsBitmaps(loaded)
        if magic != DIRTY_BITMAP_FEATURE:
            fail(f"Unknown feature: 0x{magic:x}")
        if len(loaded) == MAX_BITMAPS:
            fail(f"more than {MAX_BITMAPS} bitmaps in the Format Extension")
        bitmap = _bitmap(raw[pos:pos + data_size], fail, reader, cluster_size, disk_size,
                         file_size)
        if bitmap.name in loaded:
            fail(f"Bitmap already exists: {bitmap.name}")
        loaded[bitmap.name] = bitmap
        pos += padded


def _bitmap(data: bytes, fail, reader: ChunkReader, cluster_size: int, disk_size: int,
            file_size: int) -> DirtyBitmap:
    """One dirty bitmap feature (parallels_load_bitmap), its L1 table checked and turned
    into a qcow2-style table of host offsets."""
    if len(data) < BITMAP_FEATURE.size:
        fail(f"Too small Bitmap Feature area in Parallels Format Extension: {len(data)} "
             f"bytes, expected at least {BITMAP_FEATURE.size} bytes")
    sectors, ident, granularity, l1_size = BITMAP_FEATURE.unpack_from(data)
    if sectors * SECTOR != disk_size:
        fail(f"Bitmap size (in sectors) {sectors} differs from disk size in sectors "
             f"{disk_size // SECTOR}")
    g = granularity * SECTOR
    if not g or g > MAX_GRANULARITY or g & (g - 1):
        fail(f"Invalid bitmap granularity {g}, expected a power of two of at least "
             f"{SECTOR} bytes")
    if l1_size * 8 > len(data) - BITMAP_FEATURE.size:
        fail("Bitmaps feature corrupted: l1 table exceeds extension data_size")
    expected = -(-bitmap_bytes(disk_size, g) // cluster_size)
    if l1_size != expected:
        fail(f"Bitmap table size {l1_size} does not correspond to bitmap size and cluster "
             f"size. Expected {expected}")
    name = str(uuid.UUID(bytes=ident))  # qemu_uuid_unparse: the 16 bytes in order
    l1 = array("Q", data[BITMAP_FEATURE.size:BITMAP_FEATURE.size + 8 * l1_size])
    if sys.byteorder == "big":
        l1.byteswap()
    table = array("Q")
    for i, entry in enumerate(l1):
        if entry in (L1_ALL_CLEAR, L1_ALL_SET):
            table.append(TABLE_ENTRY_ALL_ONES if entry == L1_ALL_SET else 0)
        elif entry * SECTOR >= file_size:
            fail(f"Bitmap {name} data cluster {i} is past the end of the file")
        else:
            table.append(entry * SECTOR)
    return DirtyBitmap(BitmapFeature(name, g.bit_length() - 1), disk_size, cluster_size,
                       reader, table)
