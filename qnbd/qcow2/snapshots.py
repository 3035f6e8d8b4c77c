"""The internal snapshot table: qcow2.rst, "Snapshots". Read-only here: where snapshot
metadata lies (to protect it), that the table is sane, what qemu-img info and snapshot -l
list, and which snapshot a user's `-l` names (qemu's block/snapshot.c)."""

import struct
from collections import namedtuple

from ..block.options import split_options
from ..errors import ImageError, printable

# Fixed part of an entry, bytes 0-39: L1 table offset and size, id and name lengths,
# date (seconds, nanoseconds), VM clock (ns), VM state size (32 bits), extra data size.
_ENTRY = struct.Struct(">QIHHIIQII")
# Extra data, as far as it goes (qcow2.rst): 64-bit VM state size, virtual disk size,
# icount. Older writers wrote less; what is missing has its default.
_EXTRA = struct.Struct(">QQq")
MAX_EXTRA_DATA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 64 << 20  # qemu's QCOW_MAX_SNAPSHOTS_SIZE
MAX_SNAPSHOTS = 65536  # qemu's QCOW_MAX_SNAPSHOTS
SNAPSHOT_OPT_BASE = "snapshot."  # qemu-nbd/qemu-img -l snapshot.id=…,snapshot.name=…


# One entry of the table. disk_size None: not recorded (extra data shorter than 16
# bytes); icount -1: not recorded. raw_id, raw_name and extra_rest are as stored, so
# that rewriting the table keeps them byte for byte: the id and name (None: encode the
# str), extra data past the fields we know (qcow2.rst: "must be preserved").
# collections.namedtuple rather than typing.NamedTuple: `qnbd check` reads the table,
# and importing typing costs its start-up a few ms (issue 17).
Snapshot = namedtuple("Snapshot", (
    "id", "name", "l1_offset", "l1_size", "date_sec", "date_nsec", "vm_clock_nsec",
    "vm_state_size", "disk_size", "icount", "raw_id", "raw_name", "extra_rest"),
    defaults=(0, 0, 0, 0, None, -1, None, None, b""))


def read_table(file, offset: int, count: int, cluster_size: int,
               file_size: int) -> tuple[list[Snapshot], int]:
    """Parse `count` entries at `offset`; returns the snapshots and the table's size."""
    snapshots = []
    pos = offset
    for n in range(count):
        raw = file.pread(_ENTRY.size, pos)
        if len(raw) < _ENTRY.size:
            raise ImageError(f"snapshot table entry {n} is past the end of the file")
        l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_size, \
            extra_len = _ENTRY.unpack(raw)
        if extra_len > MAX_EXTRA_DATA:
            raise ImageError(f"snapshot {n} has {extra_len} bytes of extra data (too many)")
        extra = file.pread(extra_len, pos + _ENTRY.size)
        pos += _ENTRY.size + extra_len
        names = file.pread(id_len + name_len, pos)
        pos += id_len + name_len
        # The entry's bytes must be in the file; its padding need not be (qemu does not
        # write the last entry's padding, so the file may end before it).
        if pos - offset > MAX_TABLE_BYTES or pos > file_size:
            raise ImageError(f"snapshot table entry {n} is past the end of the file")
        pos += -(pos - offset) % 8
        if l1_offset % cluster_size or l1_offset + l1_size * 8 > file_size:
            raise ImageError(f"snapshot {n} L1 table offset 0x{l1_offset:x} is invalid")
        # Each extra field counts only if the entry holds all of it (qcow2_read_snapshots).
        large, disk, icount = _EXTRA.unpack(extra[:_EXTRA.size].ljust(_EXTRA.size, b"\0"))
        have = len(extra) // 8
        snapshots.append(Snapshot(
            names[:id_len].decode("utf-8", "replace"), names[id_len:].decode("utf-8", "replace"),
            l1_offset, l1_size, date_sec, date_nsec, vm_clock,
            large if have >= 1 else vm_size, disk if have >= 2 else None,
            icount if have >= 3 else -1, names[:id_len], names[id_len:],
            extra[_EXTRA.size:]))
    return snapshots, pos - offset


def encode_table(snapshots: list[Snapshot], disk_size: int) -> bytes:
    """The table as qemu's qcow2_write_snapshots lays it out: each entry 8-byte aligned,
    extra data at least the three known fields (a snapshot that did not record its disk
    size gets `disk_size`, the image's, as qemu fills it in when reading), unknown extra
    data kept. The 32-bit VM state size is 0 when the size needs 64 bits."""
    out = bytearray()
    for s in snapshots:
        out += bytes(-len(out) % 8)
        sid = s.raw_id if s.raw_id is not None else s.id.encode()
        name = s.raw_name if s.raw_name is not None else s.name.encode()
        extra = _EXTRA.pack(s.vm_state_size, disk_size if s.disk_size is None
                            else s.disk_size, s.icount) + s.extra_rest
        out += _ENTRY.pack(s.l1_offset, s.l1_size, len(sid), len(name), s.date_sec,
                           s.date_nsec, s.vm_clock_nsec,
                           s.vm_state_size if s.vm_state_size <= 0xFFFFFFFF else 0,
                           len(extra))
        out += extra + sid + name
    if len(out) > MAX_TABLE_BYTES:
        raise ImageError("the snapshot table would exceed 64 MiB")
    return bytes(out)


def find_by_id_or_name(snapshots: list[Snapshot], text: str) -> Snapshot | None:
    """qcow2's find_snapshot_by_id_or_name (what qemu-img snapshot -a looks up): an id
    first, then a name."""
    return next((s for s in snapshots if s.id == text), None) or \
        next((s for s in snapshots if s.name == text), None)


def next_id(snapshots: list[Snapshot]) -> str:
    """qcow2's find_new_snapshot_id: one more than the largest id read as a number
    (strtoul: its leading digits, 0 when there are none)."""
    def number(text: str) -> int:
        digits = len(text) - len(text.lstrip("0123456789"))
        return int(text[:digits]) if digits else 0
    return str(max((number(s.id.strip()) for s in snapshots), default=0) + 1)


def parse_selector(text: str) -> tuple[str | None, str | None, bool]:
    """A user's snapshot argument as qemu-nbd -l and qemu-img convert -l read it:
    "snapshot.id=ID,snapshot.name=NAME" (either or both), else one ID or NAME.
    Returns (id, name, either): with `either`, the one value is tried as an id, then
    as a name (bdrv_snapshot_load_tmp_by_id_or_name)."""
    if not text.startswith(SNAPSHOT_OPT_BASE):
        return text, text, True
    values = {}
    for key, value in split_options(text):
        if key not in ("snapshot.id", "snapshot.name"):
            raise ImageError(f"Invalid parameter '{printable(key)}' (known: snapshot.id, "
                             "snapshot.name)")
        values[key] = value
    return values.get("snapshot.id"), values.get("snapshot.name"), False


def find(snapshots: list[Snapshot], selector: str) -> Snapshot:
    """The snapshot a -l argument names (qcow2's find_snapshot_by_id_and_name: with an id
    and a name, both must match)."""
    sid, name, either = parse_selector(selector)
    if either:
        candidates = [s for s in snapshots if s.id == sid] or \
            [s for s in snapshots if s.name == name]
    else:
        candidates = [s for s in snapshots
                      if (sid is None or s.id == sid) and (name is None or s.name == name)]
        if sid is None and name is None:
            raise ImageError("Failed to load snapshot: snapshot.id and snapshot.name are "
                             "both missing")
    if not candidates:
        raise ImageError(f"Failed to load snapshot '{printable(selector)}': Can't find "
                         "snapshot")
    return candidates[0]
