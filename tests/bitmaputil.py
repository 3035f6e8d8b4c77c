"""Reading persistent bitmaps back through qemu (qemu-img info, qemu-nbd -B) and the
dirty extents a test expects, shared by the bitmap and backup tests."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from images import MiB
from peers import qemu_img

SIZE = 64 * MiB


def info_bitmaps(image, force=False):
    args = ["info", "--output=json"] + (["-U"] if force else []) + [image]
    data = json.loads(qemu_img(*args).stdout)
    return data.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def qemu_dirty_map(image, name):
    """The dirty extents qemu itself reads from the stored bitmap (qemu-nbd -B)."""
    d = tempfile.mkdtemp(dir="/tmp")
    sock = os.path.join(d, "s")
    try:
        subprocess.run(["qemu-nbd", "--fork", "-r", "-f", "qcow2", "-B", name, "-k", sock,
                        image], check=True, capture_output=True)
        out = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}",
                              f"nbd+unix:///?socket={sock}"],
                             check=True, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def expected_dirty(ranges, granularity, size=SIZE):
    """Dirty extents, merged, for ranges marked at `granularity`."""
    bits = set()
    for off, n in ranges:
        bits.update(range(off // granularity, (off + n - 1) // granularity + 1))
    out = []
    for b in sorted(bits):
        start, end = b * granularity, min(size, (b + 1) * granularity)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + end - start)
        else:
            out.append((start, end - start))
    return out


def qnbd(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "qnbd.cli", *args], capture_output=True,
                       text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r
