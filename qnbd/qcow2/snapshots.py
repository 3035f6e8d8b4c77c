"""The internal snapshot table: qcow2.rst, "Snapshots". Read-only here: the engine needs
where snapshot metadata lies (to protect it) and that the table is sane."""

import struct
from typing import NamedTuple

from ..errors import ImageError

_ENTRY = struct.Struct(">QIHHIIQII")  # fixed part, bytes 0-39
MAX_EXTRA_DATA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 64 << 20  # qemu's QCOW_MAX_SNAPSHOTS_SIZE


class Snapshot(NamedTuple):
    id: str
    name: str
    l1_offset: int
    l1_size: int


def read_table(file, offset: int, count: int, cluster_size: int,
               file_size: int) -> tuple[list[Snapshot], int]:
    """Parse `count` entries at `offset`; returns the snapshots and the table's size."""
    snapshots = []
    pos = offset
    for n in range(count):
        raw = file.pread(_ENTRY.size, pos)
        if len(raw) < _ENTRY.size:
            raise ImageError(f"snapshot table entry {n} is past the end of the file")
        l1_offset, l1_size, id_len, name_len, _s, _ns, _vmclock, _vmsize, extra = \
            _ENTRY.unpack(raw)
        if extra > MAX_EXTRA_DATA:
            raise ImageError(f"snapshot {n} has {extra} bytes of extra data (too many)")
        pos += _ENTRY.size + extra
        names = file.pread(id_len + name_len, pos)
        pos += id_len + name_len
        # The entry's bytes must be in the file; its padding need not be (qemu does not
        # write the last entry's padding, so the file may end before it).
        if pos - offset > MAX_TABLE_BYTES or pos > file_size:
            raise ImageError(f"snapshot table entry {n} is past the end of the file")
        pos += -(pos - offset) % 8
        if l1_offset % cluster_size or l1_offset + l1_size * 8 > file_size:
            raise ImageError(f"snapshot {n} L1 table offset 0x{l1_offset:x} is invalid")
        snapshots.append(Snapshot(names[:id_len].decode("utf-8", "replace"),
                                  names[id_len:].decode("utf-8", "replace"),
                                  l1_offset, l1_size))
    return snapshots, pos - offset
