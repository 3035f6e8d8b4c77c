"""Test images made by qemu-img: the matrix of qcow2 shapes the engine must handle.

Each shape builds an image (plus any backing files) in a directory, with scattered data
written by qemu's own code, so the engine is checked against images it did not make.
"""

import os
import random
import subprocess
from dataclasses import dataclass, field

from peers import qemu_img, qemu_io

MiB = 1 << 20








def scatter_raw(path, size, seed, density=0.3, unit=48 * 1024):
    """A sparse raw file with random bytes in some places and holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(rng.randrange(1, unit), size - pos)
            if rng.random() < density:
                f.seek(pos)
                f.write(rng.randbytes(n))
            pos += n + rng.randrange(0, unit)


@dataclass
class Shape:
    name: str
    options: str = ""  # qemu-img -o for the top image
    backing: str | None = None  # None, "qcow2" or "raw"
    compress: str | None = None  # None, "zlib" or "zstd"
    fmt: str = "qcow2"
    size: int = 12 * MiB
    extra_io: list = field(default_factory=list)
    bitmaps: list = field(default_factory=list)  # persistent bitmaps qemu-img adds

    @property
    def v2(self):
        return "compat=0.10" in self.options

    def build(self, directory, seed=1):
        """Create the image; returns its path."""
        d = str(directory)
        src = os.path.join(d, f"{self.name}-src.raw")
        scatter_raw(src, self.size, seed)
        image = os.path.join(d, f"{self.name}.{self.fmt}")
        if self.fmt == "raw":
            os.rename(src, image)
            return image
        opts = self.options
        if self.backing:
            base = os.path.join(d, f"{self.name}-base.{self.backing}")
            # A base smaller than the overlay: the tail must read as zeros.
            scatter_raw(base + ".tmp", self.size - 3 * MiB, seed + 100)
            if self.backing == "raw":
                os.rename(base + ".tmp", base)
            else:
                qemu_img("convert", "-f", "raw", "-O", "qcow2", base + ".tmp", base)
                os.unlink(base + ".tmp")
            qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.basename(base),
                     "-F", self.backing, *(["-o", opts] if opts else []), image, str(self.size))
            # Sparse writes on top of the backing file: some clusters partly overwritten.
            rng = random.Random(seed + 200)
            cmds = []
            for _ in range(12):
                off = rng.randrange(0, self.size - 70000)
                cmds.append(f"write -P {rng.randrange(1, 255)} {off} {rng.randrange(1, 70000)}")
            cmds.append(f"write -z {2 * MiB} {MiB}")
            qemu_io(image, "qcow2", *cmds)
        else:
            args = ["convert", "-f", "raw", "-O", "qcow2"]
            if self.compress:
                args.append("-c")
                if self.compress == "zstd":
                    opts = ",".join(filter(None, [opts, "compression_type=zstd"]))
            if opts:
                args += ["-o", opts]
            qemu_img(*args, src, image)
            os.unlink(src)
            # Zero clusters (v3) / deallocation (v2) and a discard, done by qemu.
            qemu_io(image, "qcow2", f"write -z {MiB} {MiB + 4096}")
            # qemu 7.2 fails some discards on 512-byte-cluster images with EIO; the image
            # stays consistent (qemu-img check), so a failed discard only means less variety.
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"discard {5 * MiB} {MiB}", image],
                           capture_output=True)
        for c in self.extra_io:
            qemu_io(image, "qcow2", c)
        for name in self.bitmaps:
            qemu_img("bitmap", "--add", image, name)
        return image


SHAPES = [
    Shape("v3"),
    Shape("v2", "compat=0.10"),
    Shape("c512", "cluster_size=512", size=4 * MiB),
    Shape("c4k-r1", "cluster_size=4096,refcount_bits=1"),
    Shape("c2m-r64", "cluster_size=2M,refcount_bits=64", size=24 * MiB),
    Shape("lazy", "lazy_refcounts=on"),
    Shape("qcow2-backing", backing="qcow2"),
    Shape("raw-backing", backing="raw"),
    Shape("v2-backing", "compat=0.10", backing="qcow2"),
    Shape("zlib", compress="zlib"),
    Shape("zstd", compress="zstd"),
    # Extended L2 entries (qcow2.rst, "Extended L2 Entries"): 2 KiB subclusters; 512 B
    # ones over a backing file, where unallocated subclusters show it through; and
    # compressed clusters, which have no subclusters.
    Shape("extl2", "extended_l2=on"),
    Shape("extl2-c16k-backing", "extended_l2=on,cluster_size=16k", backing="qcow2"),
    Shape("extl2-zlib", "extended_l2=on,cluster_size=32k", compress="zlib"),
]
RAW = Shape("raw", fmt="raw")
