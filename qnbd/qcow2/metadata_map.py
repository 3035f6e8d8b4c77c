"""Which host clusters hold metadata, to stop data writes from landing on them.

docs/DESIGN.md rule 8 (QEMU's "overlap checks", qcow2.rst does not spell it out): a data write
whose host range overlaps the header, L1 table, L2 tables, refcount table or blocks,
snapshot table or L1 tables, or the bitmap directory means the refcounts or mappings are
inconsistent. The write is refused and the image marked corrupt (rule 7).
"""

from ..errors import IOFailure


class MetadataMap:
    def __init__(self, cluster_bits: int, mark_corrupt):
        """mark_corrupt(reason) is called when an overlap is found (rule 7)."""
        self.cluster_bits = cluster_bits
        self._mark_corrupt = mark_corrupt
        self.clusters: set[int] = set()

    def add(self, cluster: int) -> None:
        self.clusters.add(cluster)

    def remove(self, cluster: int) -> None:
        self.clusters.discard(cluster)

    def add_range(self, offset: int, length: int) -> None:
        if length > 0:
            first = offset >> self.cluster_bits
            last = (offset + length - 1) >> self.cluster_bits
            self.clusters.update(range(first, last + 1))

    def check_free(self, cluster: int, count: int) -> None:
        """Clusters about to be allocated must not be metadata."""
        for c in range(cluster, cluster + count):
            if c in self.clusters:
                self._overlap(c, "allocation")

    def check_data_write(self, offset: int, length: int) -> None:
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for c in range(first, last + 1):
            if c in self.clusters:
                self._overlap(c, "data write")

    def _overlap(self, cluster: int, what: str):
        reason = (f"{what} at host offset 0x{cluster << self.cluster_bits:x} would "
                  "overwrite metadata")
        self._mark_corrupt(reason)
        raise IOFailure(reason)
