"""The first bytes by which each format qnbd has a driver for is recognised (qemu's
probe functions). Here rather than in the drivers so that the format registry can
probe a file without importing any driver (qnbd/formats.py): a `qnbd check` of a qcow2
image loads neither the QED nor the parallels code."""

QCOW_MAGIC = b"QFI\xfb"  # qcow2.rst, "Header": magic, shared with qcow version 1
QED_MAGIC = b"QED\0"  # qed_spec.txt, "Header": magic
# parallels.txt: BAT entries count 512-byte sectors / clusters.
PARALLELS_MAGIC_SECTORS = b"WithoutFreeSpace"
PARALLELS_MAGIC_CLUSTERS = b"WithouFreSpacExt"


def is_parallels(head: bytes) -> bool:
    return head[:16] in (PARALLELS_MAGIC_SECTORS, PARALLELS_MAGIC_CLUSTERS)
