"""Small helpers to read and damage qcow2 images on purpose in tests.

Offsets are those of qemu docs/interop/qcow2.rst, "Header" and "Header extensions".
Everything works on files with plain `struct`, never through the engine under test.
"""

import hashlib
import json
import struct

from peers import qemu_img

# name -> (offset, struct code), qcow2.rst "Header" (bytes 0-103) and "Additional fields".
HEADER_FIELDS = {
    "magic": (0, ">4s"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

EXT_END = 0
EXT_FEATURE_TABLE = 0x6803F857
EXT_BACKING_FORMAT = 0xE2792ACA

COPIED = 1 << 63






def read_field(path, name: str) -> int:
    offset, code = HEADER_FIELDS[name]
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(code, f.read(struct.calcsize(code)))[0]


def patch_bytes(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def patch_fields(path, **fields) -> None:
    """Overwrite header fields by name, e.g. patch_fields(p, cluster_bits=8)."""
    for name, value in fields.items():
        offset, code = HEADER_FIELDS[name]
        patch_bytes(path, offset, struct.pack(code, value))


def read_u64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def patch_u64(path, offset: int, value: int) -> None:
    patch_bytes(path, offset, struct.pack(">Q", value))


def truncate(path, length: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(length)


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def extensions_start(path) -> int:
    return 72 if read_field(path, "version") == 2 else read_field(path, "header_length")


def read_extensions(path) -> list[tuple[int, bytes]]:
    """The header extensions before the end marker, as (type, payload)."""
    with open(path, "rb") as f:
        head = f.read(1 << read_field(path, "cluster_bits"))
    pos = extensions_start(path)
    out = []
    while True:
        ext_type, length = struct.unpack_from(">II", head, pos)
        pos += 8
        if ext_type == EXT_END:
            return out
        out.append((ext_type, head[pos:pos + length]))
        pos += length + (-length % 8)


def write_extensions(path, exts: list[tuple[int, bytes]]) -> int:
    """Rewrite the header extension area (end marker included); returns its end offset.
    A backing file name, if any, must be rewritten by the caller after it."""
    raw = b"".join(struct.pack(">II", t, len(d)) + d + bytes(-len(d) % 8) for t, d in exts)
    raw += struct.pack(">II", EXT_END, 0)
    start = extensions_start(path)
    patch_bytes(path, start, raw)
    return start + len(raw)


def feature_entry(kind: int, bit: int, name: str) -> bytes:
    return struct.pack(">BB46s", kind, bit, name.encode())


def qemu_info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", "-U", str(path)).stdout)


def qemu_says_corrupt(path) -> bool:
    return qemu_info(path).get("format-specific", {}).get("data", {}).get("corrupt", False)


EXT_BITMAPS = 0x23852875


def extension_locations(path) -> dict[int, tuple[int, int]]:
    """Header extension type -> (offset of its payload in the file, payload length)."""
    with open(path, "rb") as f:
        head = f.read(1 << read_field(path, "cluster_bits"))
    pos = extensions_start(path)
    out = {}
    while pos + 8 <= len(head):
        ext_type, length = struct.unpack_from(">II", head, pos)
        if ext_type == EXT_END:
            break
        out[ext_type] = (pos + 8, length)
        pos += 8 + length + (-length % 8)
    return out


def bitmap_locations(path) -> dict[str, tuple[int, int]]:
    """(offset, length) of the bitmaps extension, the bitmap directory, the first
    bitmap's table and its first data cluster (qcow2.rst "Bitmaps extension")."""
    ext = extension_locations(path)[EXT_BITMAPS]
    with open(path, "rb") as f:
        f.seek(ext[0])
        _nb, _reserved, dir_size, dir_offset = struct.unpack(">IIQQ", f.read(24))
        f.seek(dir_offset)
        table_offset, table_size = struct.unpack(">QI", f.read(12))
        f.seek(table_offset)
        table = struct.unpack(f">{table_size}Q", f.read(8 * table_size))
    data = next(e & ((1 << 56) - 512) for e in table if e & ((1 << 56) - 512))
    return {"bitmap_ext": ext, "bitmap_dir": (dir_offset, dir_size),
            "bitmap_table": (table_offset, 8 * table_size), "bitmap_data": (data, 512)}
