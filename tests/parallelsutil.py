"""A writer of Parallels Format Extensions carrying dirty bitmaps, per qemu's
docs/interop/parallels.txt ("Format Extension", "Dirty bitmaps feature"), for tests:
qemu-img cannot write them. It appends to an image that qemu-img made: the extension
cluster, then the bitmap data clusters, at cluster-aligned offsets past the data area,
and points the header's ext_off at the extension.

    add_bitmaps(path, {ident: (granularity, [(offset, length), ...])})  the usual case
    add_extension(path, build)  any feature list: build(place, cluster, disk_size) returns
                                the features' bytes; place(data) appends one cluster and
                                gives its sector
"""

import hashlib
import os
import struct
import uuid

from qnbd.block.parallels import HEADER
from qnbd.block.parallels_ext import (BITMAP_FEATURE, DIRTY_BITMAP_FEATURE, END_OF_FEATURES,
                                      EXT_HEADER, EXT_MAGIC, FEATURE_HEADER, L1_ALL_CLEAR,
                                      L1_ALL_SET, SECTOR)

_EXT_OFF = 56  # the header's ext_off field (parallels.txt "Header")


def geometry(path) -> tuple[int, int, int]:
    """(cluster size, data offset, disk size), in bytes."""
    with open(path, "rb") as f:
        fields = HEADER.unpack(f.read(HEADER.size))
    tracks, nb_sectors, data_off = fields[4], fields[6], fields[8]
    return tracks * SECTOR, data_off * SECTOR, nb_sectors * SECTOR


def feature(magic: int, data: bytes, flags: int = 0, data_size: int | None = None) -> bytes:
    size = len(data) if data_size is None else data_size
    return FEATURE_HEADER.pack(magic, flags, size, 0) + data + bytes(-len(data) % 8)


def bitmap_feature(disk_sectors: int, ident: bytes, granularity_sectors: int,
                   l1: list[int], l1_size: int | None = None) -> bytes:
    data = BITMAP_FEATURE.pack(disk_sectors, ident, granularity_sectors,
                               len(l1) if l1_size is None else l1_size)
    return feature(DIRTY_BITMAP_FEATURE, data + struct.pack(f"<{len(l1)}Q", *l1))


def add_extension(path, build, checksum_ok: bool = True) -> None:
    cluster, data_off, disk_size = geometry(path)
    with open(path, "r+b") as f:
        end = os.path.getsize(path)
        ext = data_off + max(0, -(-(end - data_off) // cluster)) * cluster
        f.truncate(ext + cluster)

        def place(data: bytes) -> int:
            where = os.path.getsize(path)
            f.seek(where)
            f.write(data.ljust(cluster, b"\0"))
            f.flush()
            return where // SECTOR

        body = build(place, cluster, disk_size) + feature(END_OF_FEATURES, b"")
        body = body.ljust(cluster - EXT_HEADER.size, b"\0")
        digest = hashlib.md5(body).digest() if checksum_ok else bytes(16)
        f.seek(ext)
        f.write(EXT_HEADER.pack(EXT_MAGIC, digest) + body)
        f.seek(_EXT_OFF)
        f.write(struct.pack("<Q", ext // SECTOR))


def bitmap_l1(place, cluster: int, disk_size: int, granularity: int, dirty) -> list[int]:
    """The L1 table of a bitmap whose `dirty` (offset, length) ranges are set: all-clear
    and all-set chunks as entries 0 and 1, the others written to clusters by `place`."""
    nbits = -(-disk_size // granularity)
    chunks = -(-(-(-nbits // 8)) // cluster)
    bits = bytearray(chunks * cluster)
    for offset, length in dirty:
        for b in range(offset // granularity, (offset + length - 1) // granularity + 1):
            bits[b >> 3] |= 1 << (b & 7)
    l1 = []
    for i in range(chunks):
        chunk = bytes(bits[i * cluster:(i + 1) * cluster])
        if chunk == bytes(cluster):
            l1.append(L1_ALL_CLEAR)
        elif chunk == b"\xff" * cluster:
            l1.append(L1_ALL_SET)
        else:
            l1.append(place(chunk))
    return l1


def add_bitmaps(path, bitmaps: dict[bytes, tuple[int, list]]) -> list[str]:
    """Add one bitmap per 16-byte id; their names (the ids as qemu prints them)."""
    def build(place, cluster: int, disk_size: int) -> bytes:
        return b"".join(
            bitmap_feature(disk_size // SECTOR, ident, granularity // SECTOR,
                           bitmap_l1(place, cluster, disk_size, granularity, dirty))
            for ident, (granularity, dirty) in bitmaps.items())

    add_extension(path, build)
    return [str(uuid.UUID(bytes=ident)) for ident in bitmaps]
