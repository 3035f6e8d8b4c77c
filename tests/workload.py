"""Workloads for the engines and a model of what they must leave: the expected content
of an image as plain bytes, under the BlockDevice contract (qnbd/block/base.py)."""

import os

from peers import run


def converted(image, fmt, directory):
    out = os.path.join(str(directory), "expected.raw")
    # -U: the test holds it open; run beside the image, where qemu looks for a relative
    # external data file name.
    run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, out,
        cwd=os.path.dirname(str(image)) or None)
    with open(out, "rb") as f:
        return f.read()




def discard_unit(dev) -> int:
    """What a discard drops whole: a cluster, or a subcluster with qcow2 extended L2
    entries (the granularity the model zeroes discarded ranges at)."""
    layout = getattr(dev, "layout", None)
    return layout.subcluster_size if layout is not None else getattr(dev, "cluster_size", 1)


class Model:
    """The expected content of an image, as plain bytes, under the BlockDevice contract."""

    def __init__(self, content: bytes, cluster_size: int, discard_keeps: bool):
        self.data = bytearray(content)
        self.cs = cluster_size
        self.discard_keeps = discard_keeps  # v2 with backing: discard is a no-op

    def write(self, off, buf):
        self.data[off:off + len(buf)] = buf

    def zero(self, off, n):
        self.data[off:off + n] = bytes(n)

    def discard(self, off, n):
        if self.discard_keeps:
            return
        start = -(-off // self.cs) * self.cs
        end = (off + n) // self.cs * self.cs
        if off + n == len(self.data):
            end = off + n
        if start < end:
            self.zero(start, end - start)


def random_ops(rng, size, count):
    ops = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "write", "zero", "zero_trim", "discard", "flush"])
        off = rng.randrange(0, size)
        # Sizes from a few bytes to several clusters; some aligned, some not.
        n = rng.choice([1, 511, 4096, 65536, 65537, 200000, rng.randrange(1, 600000)])
        if rng.random() < 0.3:
            off = off // 65536 * 65536
        n = max(1, min(n, size - off))
        ops.append((kind, off, n, rng.randrange(1, 256)))
    return ops


def with_compressed(rng, ops, size):
    """Some writes of `ops` turned into compressed writes of whole 64 KiB-aligned runs
    (qnbd convert -c's writes; apply_ops writes them cluster by cluster)."""
    out = []
    for kind, off, n, pattern in ops:
        if kind == "write" and rng.random() < 0.5:
            off = off // 65536 * 65536
            kind, n = "compress", min(65536, size - off)
        out.append((kind, off, n, pattern))
    return out


def _compressible(pattern, n):
    unit = bytes([pattern]) * 48 + bytes(range(16))
    return (unit * (n // len(unit) + 1))[:n]


def apply_ops(dev, model, ops):
    for kind, off, n, pattern in ops:
        if kind == "compress":
            # Compressed where the cluster is free (write_compressed never overwrites),
            # an ordinary write elsewhere.
            cs = dev.cluster_size
            for pos in range(off, off + n, cs):
                buf = _compressible(pattern, min(cs, dev.size - pos))
                # Every part of the cluster (subclusters have their own states).
                if all(not e.data and e.host_offset is None
                       for e in dev.layer_status(pos, len(buf))):
                    dev.write_compressed(pos, buf)
                else:
                    dev.write(pos, buf)
                model.write(pos, buf)
        elif kind == "write":
            buf = bytes([pattern]) * n
            dev.write(off, buf, fua=pattern % 17 == 0)
            model.write(off, buf)
        elif kind in ("zero", "zero_trim"):
            dev.write_zeroes(off, n, may_trim=kind == "zero_trim")
            model.zero(off, n)
        elif kind == "discard":
            dev.discard(off, n)
            model.discard(off, n)
        else:
            dev.flush()
