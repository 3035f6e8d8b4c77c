"""QED test images made by qemu-img and written by qemu-io: the shapes the QED engine must
read as qemu does (qed_spec.txt: default geometry, small clusters with several L2
tables, raw backing (QED_F_BACKING_FORMAT_NO_PROBE), probed qed and qcow2 backing)."""

import os
import random
import struct
from dataclasses import dataclass

from images import MiB, scatter_raw
from peers import qemu_img, qemu_io

FEATURES_AT = 16  # qed_spec.txt "Header": magic, cluster_size, table_size, header_size
AUTOCLEAR_AT = 32
COMPAT_AT = 24


@dataclass
class QedShape:
    name: str
    options: str = ""
    backing: str | None = None  # None, "raw", "qed" or "qcow2"
    size: int = 12 * MiB
    fmt: str = "qed"

    def build(self, directory, seed=1):
        """Create the image (and its backing file); returns its path."""
        d = str(directory)
        image = os.path.join(d, f"{self.name}.qed")
        args = ["create", "-q", "-f", "qed", *(["-o", self.options] if self.options else [])]
        if self.backing:
            base = os.path.join(d, f"{self.name}-base.{self.backing}")
            scatter_raw(base + ".tmp", self.size - 3 * MiB, seed + 100)
            if self.backing == "raw":
                os.rename(base + ".tmp", base)
            else:
                qemu_img("convert", "-f", "raw", "-O", self.backing, base + ".tmp", base)
                os.unlink(base + ".tmp")
            args += ["-b", os.path.basename(base), "-F", self.backing]
        qemu_img(*args, image, str(self.size))
        rng = random.Random(seed + 200)
        commands = []
        for _ in range(40):
            off = rng.randrange(0, self.size - 300000) // 512 * 512
            n = rng.randrange(1, 300000) // 512 * 512 or 512
            if rng.random() < 0.2:
                off, n = off // 65536 * 65536, 65536 * rng.randrange(1, 4)
                commands.append(f"write -z {off} {n}")
            else:
                commands.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
        qemu_io(image, "qed", *commands)
        return image


SHAPES = [
    QedShape("qed"),
    QedShape("qed-c4k", "cluster_size=4096,table_size=2"),
    QedShape("qed-raw", backing="raw"),
    QedShape("qed-qed", "cluster_size=8192", backing="qed"),
    QedShape("qed-qcow2", backing="qcow2"),
]


def set_u64(path, at, value=None, bits_on=0, bits_off=0):
    """Change one 64-bit little-endian header field in place; returns the new value."""
    with open(path, "r+b") as f:
        f.seek(at)
        old = struct.unpack("<Q", f.read(8))[0]
        new = value if value is not None else (old | bits_on) & ~bits_off
        f.seek(at)
        f.write(struct.pack("<Q", new))
    return new


def get_u64(path, at):
    with open(path, "rb") as f:
        f.seek(at)
        return struct.unpack("<Q", f.read(8))[0]
