"""The refcounts a qcow2 image claims, as the checker (check.py) reads and repairs them:
straight from the refcount table and blocks (qcow2.rst, "Host cluster management"),
with refcount.py's block codecs, never through the engine's allocator."""

import cachetools

from ..block.storage import Barrier
from . import header as hdr
from .entries import decode_table
from .refcount import REFTABLE_ENTRY_RESERVED, SubByteBlock, WordBlock


class Unreadable(Exception):
    """A stored refcount cannot be read (its refcount block offset is invalid)."""


class StoredRefcounts:
    """The refcounts the image claims, read straight from its refcount table and blocks
    with refcount.py's block codecs; changes are kept until `write_back`."""

    def __init__(self, file, h: hdr.Header):
        self.file = file
        self.cluster_size = h.cluster_size
        self.bits = h.refcount_bits
        self.per_block = h.cluster_size * 8 // self.bits
        self.block_class = WordBlock if self.bits >= 8 else SubByteBlock
        raw = file.pread(h.refcount_table_clusters * h.cluster_size, h.refcount_table_offset)
        self.table = decode_table(raw + bytes(-len(raw) % 8))
        self._clean = cachetools.LRUCache(256)
        self._dirty: dict[int, object] = {}

    def block(self, index: int):
        """Refcount block of region `index`, or None where the table has no entry."""
        if index >= len(self.table):
            return None
        offset = self.table[index] & ~REFTABLE_ENTRY_RESERVED
        if not offset:
            return None
        if offset % self.cluster_size:
            raise Unreadable(f"refblock offset 0x{offset:x} is not aligned")
        block = self._dirty.get(offset) or self._clean.get(offset)
        if block is None:
            # Past the end of the file reads as zeros, as QEMU's file driver does.
            raw = self.file.pread(self.cluster_size, offset)
            block = self.block_class(raw + bytes(self.cluster_size - len(raw)), self.bits)
            self._clean[offset] = block
        return block

    def get(self, cluster: int) -> int:
        index, i = divmod(cluster, self.per_block)
        block = self.block(index)
        return block.get(i) if block is not None else 0

    def set(self, cluster: int, value: int) -> None:
        index, i = divmod(cluster, self.per_block)
        block = self.block(index)
        block.set(i, value)
        self._dirty[self.table[index] & ~REFTABLE_ENTRY_RESERVED] = block

    def write_back(self) -> None:
        for offset, block in sorted(self._dirty.items()):
            self.file.pwrite(block.encode(), offset)
        self.file.sync(Barrier.REPAIR)
        self._dirty.clear()
