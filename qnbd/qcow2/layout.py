"""The numbers every part of the qcow2 engine derives from the header: cluster and table
geometry (qcow2.rst, "Cluster mapping"), fixed for the life of an open image. Derived values are computed once (hot paths read
them per request)."""

from dataclasses import dataclass
from functools import cached_property

from .entries import SUBCLUSTER_BITS, CompressedLayout
from .header import Header


@dataclass(frozen=True)
class Layout:
    version: int
    size: int  # virtual disk size in bytes
    cluster_bits: int
    external: bool = False  # guest data in an external data file, at the guest offset
    extended_l2: bool = False  # 128-bit L2 entries with subclusters (incompatible bit 4)

    @classmethod
    def of(cls, header: Header) -> "Layout":
        return cls(header.version, header.size, header.cluster_bits, header.external_data,
                   header.extended_l2)

    @cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @cached_property
    def entry_words(self) -> int:
        """64-bit words an L2 entry takes: 2 with extended L2 entries."""
        return 2 if self.extended_l2 else 1

    @cached_property
    def l2_bits(self) -> int:
        """log2 of the entries in one L2 table (8- or 16-byte entries, one cluster a
        table)."""
        return self.cluster_bits - 2 - self.entry_words

    @cached_property
    def subcluster_bits(self) -> int:
        """log2 of the unit an L2 entry allocates and zeroes: the cluster, or one of its
        32 subclusters (qcow2.rst, "Extended L2 Entries")."""
        return self.cluster_bits - SUBCLUSTER_BITS if self.extended_l2 else self.cluster_bits

    @cached_property
    def subcluster_size(self) -> int:
        return 1 << self.subcluster_bits

    @cached_property
    def table_shift(self) -> int:
        """log2 of the guest bytes one L2 table maps (one L1 entry's reach)."""
        return self.cluster_bits + self.l2_bits

    @cached_property
    def compressed(self) -> CompressedLayout:
        return CompressedLayout(self.cluster_bits)

    def l2_index(self, guest: int) -> int:
        return (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
