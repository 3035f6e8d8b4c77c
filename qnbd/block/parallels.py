"""Parallels disk images (qemu's `parallels` driver, docs/interop/parallels.txt), read-only.

Layout (little-endian): a 64-byte header, then the BAT (block allocation table), one
32-bit entry per cluster of the virtual disk, then data clusters.

    0   magic[16]   "WithoutFreeSpace" (BAT entries count 512-byte sectors) or
                    "WithouFreSpacExt" (BAT entries count clusters)
    16  version     2
    28  tracks      sectors per cluster
    32  bat_entries
    36  nb_sectors  virtual size in sectors (64-bit; the low 32 bits for the old magic)
    44  inuse       0x746F6E59 while an image is open for writing
    48  data_off    first data sector
    56  ext_off     format extension (dirty bitmaps, parallels_ext.py), in sectors

A BAT entry of 0 is an unallocated cluster, which reads as zeros (these images have no
backing file here). qnbd serves these images read-only; their dirty bitmaps are offered
(-B), as qemu loads them on a read-only open.
"""

import errno
import struct

from ..errors import ImageError, IOFailure
from ..fileio import File, open_file
from ..lock import lock_image
from ..signatures import PARALLELS_MAGIC_CLUSTERS as MAGIC_CLUSTERS, \
    PARALLELS_MAGIC_SECTORS as MAGIC_SECTORS
from .base import HOLE, ZERO, Extent
from .parallels_ext import SECTOR, ParallelsBitmaps, read_bitmaps

HEADER = struct.Struct("<16sIIIIIQIIIQ")
# qemu's limits (parallels_open): clusters and catalogs it refuses as invalid.
_MAX_TRACKS = 0x7FFFFFFF // 513
_MAX_BAT = 0x7FFFFFFF // 4


class ParallelsImage:
    supports_fast_zero = False
    # qemu's parallels driver works in sectors, so requests are 512-byte aligned.
    request_alignment = SECTOR

    def __init__(self, path: str, read_only: bool = True, force_share: bool = False):
        if not read_only:
            raise ImageError(f"'{path}': qnbd serves parallels images read-only "
                             "(use -r, or -s for a writable overlay)")
        self.read_only = True
        self.file: File = open_file(path, writable=False)
        try:
            lock_image(self.file, False, force_share, metadata=False)  # rule 11
            self._read_header(path)
        except BaseException:
            self.file.close()
            raise

    def _read_header(self, path: str) -> None:
        raw = self.file.pread(HEADER.size, 0)
        if len(raw) < HEADER.size:
            raise ImageError(f"'{path}': the parallels header is truncated")
        (magic, version, _heads, _cylinders, tracks, bat_entries, nb_sectors, _inuse,
         _data_off, _flags, ext_off) = HEADER.unpack(raw)
        if magic not in (MAGIC_SECTORS, MAGIC_CLUSTERS) or version != 2:
            raise ImageError(f"'{path}': Image not in Parallels format")
        if tracks == 0:
            raise ImageError(f"'{path}': Invalid image: Zero sectors per track")
        if tracks > _MAX_TRACKS:
            raise ImageError(f"'{path}': Invalid image: Too big cluster")
        if bat_entries > _MAX_BAT:
            raise ImageError(f"'{path}': Catalog too large")
        if magic == MAGIC_SECTORS:
            nb_sectors &= 0xFFFFFFFF
        self.cluster_size = tracks * SECTOR
        self.unit = SECTOR if magic == MAGIC_SECTORS else self.cluster_size
        self.size = nb_sectors * SECTOR
        table = self.file.pread(4 * bat_entries, HEADER.size)
        if len(table) != 4 * bat_entries:
            raise ImageError(f"'{path}': the block allocation table is truncated")
        self.bat = struct.unpack(f"<{bat_entries}I", table)
        file_size = self.file.size()
        for index, entry in enumerate(self.bat):
            if entry and entry * self.unit >= file_size:
                raise ImageError(f"'{path}': BAT entry {index} points past the end of "
                                 "the file")
        # qemu reads the extension on every read-only open, and fails the open when it
        # cannot (parallels_open, parallels_read_format_extension).
        self.bitmaps = (read_bitmaps(self.file, path, ext_off * SECTOR, self.cluster_size,
                                     self.size, file_size)
                        if ext_off else ParallelsBitmaps())

    def _host(self, offset: int) -> tuple[int | None, int]:
        """(host offset or None when unallocated, bytes left in this cluster)."""
        index, within = divmod(offset, self.cluster_size)
        left = self.cluster_size - within
        if index >= len(self.bat) or not self.bat[index]:
            return None, left
        return self.bat[index] * self.unit + within, left

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while length:
            host, left = self._host(offset)
            n = min(left, length)
            if host is None:
                out += bytes(n)
            else:
                data = self.file.pread(n, host)
                out += data + bytes(n - len(data))  # a short last cluster reads zeros
            offset += n
            length -= n
        return bytes(out)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Runs of allocated (data) and unallocated (zero) clusters, as qemu's
        parallels_co_block_status answers through the block layer."""
        end = min(offset + length, self.size)
        host, left = self._host(offset)
        allocated = host is not None
        start = offset
        offset += left
        while offset < end and (self._host(offset)[0] is not None) == allocated:
            offset += self.cluster_size
        return [Extent(min(offset, end) - start, 0 if allocated else HOLE | ZERO,
                       1 if allocated else 0)]

    def _refuse(self, *args, **kw):
        raise IOFailure("the device is read-only", errno.EPERM)

    write = write_zeroes = discard = _refuse

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.file.fd >= 0:
            self.file.close()
