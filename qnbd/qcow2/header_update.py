"""In-place updates of a qcow2 header: feature bits, the refcount table's location, and
the whole header cluster (extensions, backing name).

Every update is a barrier (docs/DESIGN.md, "Durability"): the header is what everything
else hangs from, so a change to it is durable before anything relies on it (the dirty
bit before the first deferred refcount, rule 6; the corrupt bit, rule 7; a new refcount
table before the old one is freed; a new bitmap directory before the old is released).
Callers that make the header point at new tables sync those first (Barrier.BEFORE_HEADER).
"""

import struct

from ..block.storage import Barrier, Storage
from . import header as hdr

_U64 = struct.Struct(">Q")
_REFTABLE_LOCATION = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
_INCOMPATIBLE = hdr.field_offset("incompatible_features")
_AUTOCLEAR = hdr.field_offset("autoclear_features")
_REFTABLE = hdr.field_offset("refcount_table_offset")
_L1_LOCATION = struct.Struct(">IQ")  # l1_size, l1_table_offset
_L1 = hdr.field_offset("l1_size")
_SIZE = hdr.field_offset("size")
_SNAPSHOT_TABLE = struct.Struct(">IQ")  # nb_snapshots, snapshots_offset
_SNAPSHOTS = hdr.field_offset("nb_snapshots")
# size, crypt_method, l1_size, l1_table_offset: adjacent, inside the first sector
_ACTIVE = struct.Struct(">QIIQ")


class HeaderWriter:
    def __init__(self, storage: Storage, header: hdr.Header):
        self.storage = storage
        self.header = header

    def set_incompatible(self, bits: int, on: bool) -> None:
        h = self.header
        h.incompatible_features = (h.incompatible_features | bits) if on \
            else (h.incompatible_features & ~bits)
        self._write(_U64.pack(h.incompatible_features), _INCOMPATIBLE)

    def clear_autoclear(self, bits: int) -> None:
        self.header.autoclear_features &= ~bits
        self._write(_U64.pack(self.header.autoclear_features), _AUTOCLEAR)

    def move_reftable(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self._write(_REFTABLE_LOCATION.pack(offset, clusters), _REFTABLE)

    def move_l1(self, offset: int, entries: int) -> None:
        """Both fields in one write, as qcow2_grow_l1_table does: a crash leaves either
        the old table or the new one, never a mix."""
        self.header.l1_table_offset = offset
        self.header.l1_size = entries
        self._write(_L1_LOCATION.pack(entries, offset), _L1)

    def switch_snapshot_table(self, count: int, offset: int) -> None:
        """Both fields in one write within the first sector, as qcow2_write_snapshots
        does: a crash leaves the old table or the new one."""
        self.header.nb_snapshots = count
        self.header.snapshots_offset = offset
        self._write(_SNAPSHOT_TABLE.pack(count, offset), _SNAPSHOTS)

    def switch_active(self, size: int, l1_offset: int, l1_entries: int) -> None:
        """A new active layer (an applied snapshot): its size and L1 table in one write
        within the first sector, so a crash leaves the old layer or the new one whole."""
        h = self.header
        h.size, h.l1_table_offset, h.l1_size = size, l1_offset, l1_entries
        self._write(_ACTIVE.pack(size, h.crypt_method, l1_entries, l1_offset), _SIZE)

    def set_size(self, size: int) -> None:
        self.header.size = size
        self._write(_U64.pack(size), _SIZE)

    def rewrite(self) -> None:
        """The header cluster's contents (fields, extensions, backing name)."""
        self._write(self.header.encode(), 0)

    def _write(self, data: bytes, offset: int) -> None:
        self.storage.pwrite(data, offset)
        self.storage.sync(Barrier.HEADER)
