"""The numbers every part of the qcow2 engine derives from the header: cluster and table
geometry (qcow2.rst, "Cluster mapping"), fixed for the life of an open image. Derived values are computed once (hot paths read
them per request)."""

from dataclasses import dataclass
from functools import cached_property

from .entries import CompressedLayout
from .header import Header


@dataclass(frozen=True)
class Layout:
    version: int
    size: int  # virtual disk size in bytes
    cluster_bits: int
    external: bool = False  # guest data in an external data file, at the guest offset

    @classmethod
    def of(cls, header: Header) -> "Layout":
        return cls(header.version, header.size, header.cluster_bits, header.external_data)

    @cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @cached_property
    def l2_bits(self) -> int:
        """log2 of the entries in one L2 table (8-byte entries, one cluster a table)."""
        return self.cluster_bits - 3

    @cached_property
    def table_shift(self) -> int:
        """log2 of the guest bytes one L2 table maps (one L1 entry's reach)."""
        return self.cluster_bits + self.l2_bits

    @cached_property
    def compressed(self) -> CompressedLayout:
        return CompressedLayout(self.cluster_bits)

    def l2_index(self, guest: int) -> int:
        return (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
