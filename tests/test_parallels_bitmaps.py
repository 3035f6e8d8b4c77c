"""Dirty bitmaps of parallels images (qemu docs/interop/parallels.txt, "Format Extension"):
qnbd serve -B exports them as qemu-nbd -B does, with the same map; an extension qemu cannot
load stops the open in one line. The images come from qemu-img (and their data from
qemu-io); the extension from tests/parallelsutil.py, since qemu-img cannot write one."""

import os
import struct
import subprocess
import sys
import uuid

import pytest

from bitmaputil import expected_dirty, info_bitmaps, qemu_dirty_map, qnbd
from nbdserver import run_serve, short_tmpdir
from parallelsutil import add_bitmaps, add_extension, bitmap_feature, feature
from peers import run
from qnbd.block.parallels_ext import DIRTY_BITMAP_FEATURE, L1_ALL_SET, MAX_EXT_CLUSTER

MiB = 1 << 20
ID_A, ID_B = bytes(range(16)), bytes(range(16, 32))
# Bitmap A at 512 bytes covers 16 MiB per 4 KiB chunk: with these runs its L1 table has a
# data cluster, an all-clear, an all-set and a data cluster again (the disk's tail).
DIRTY_A = [(0, 4096), (MiB + 512, 3 * MiB), (32 * MiB, 16 * MiB), (60 * MiB, 4 * MiB - 512)]
DIRTY_B = [(5 * MiB, 1)]


def dirty_map(uri: str, name: str) -> list[tuple[int, int]]:
    """The dirty runs nbdinfo --map reports, as (offset, length)."""
    out = run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri).stdout
    runs = []
    for line in out.splitlines():
        offset, length, flags = (int(x) for x in line.split()[:3])
        if flags & 1:
            runs.append((offset, length))
    return runs


@pytest.fixture
def bitmap_image(tmp_path):
    img = str(tmp_path / "disk.parallels")
    run("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4k", img, "64M")
    run("qemu-io", "-f", "parallels", "-c", "write -P 7 1M 64k", "-c", "write -P 8 40M 1k",
        img)
    names = add_bitmaps(img, {ID_A: (512, DIRTY_A), ID_B: (64 << 10, DIRTY_B)})
    return img, names


@pytest.mark.parametrize("mode", ["-r", "-s"])
def test_bitmaps_as_qemu_nbd(servers, bitmap_image, mode):
    img, (name_a, name_b) = bitmap_image
    assert name_a == str(uuid.UUID(bytes=ID_A))  # qemu names a bitmap by its id
    maps = {}
    for program in ("qemu-nbd", "qnbd"):
        server = servers(program, mode, "-f", "parallels", "-B", name_a, "-B", name_b, img)
        uri = f"nbd+unix:///?socket={server.sock}"
        maps[program] = (dirty_map(uri, name_a), dirty_map(uri, name_b),
                         run("nbdinfo", "--map", uri).stdout)
    assert maps["qnbd"] == maps["qemu-nbd"]
    # What both show is what was written (bitmap B: one whole 64 KiB granule).
    assert maps["qnbd"][0] == [(0, 4096), (MiB + 512, 3 * MiB), (32 * MiB, 16 * MiB),
                               (60 * MiB, 4 * MiB - 512)]
    assert maps["qnbd"][1] == [(5 * MiB, 64 << 10)]


def test_unknown_bitmap_as_qemu_nbd(bitmap_image):
    img, _ = bitmap_image
    sock = os.path.join(short_tmpdir(), "s")
    qemu = run("qemu-nbd", "-r", "-k", sock, "-B", "nope", img, check=False, timeout=30)
    ours = run_serve("-r", "-k", sock, "-B", "nope", img)
    assert qemu.returncode == ours.returncode == 1
    assert "Bitmap 'nope' is not found" in qemu.stderr
    assert ours.stderr.strip().splitlines() == ["qnbd serve: Bitmap 'nope' is not found"]


def _one(l1_of, **fields):
    """A builder of one bitmap feature over the whole disk, fields overridden."""
    def build(place, cluster, size):
        args = dict(disk_sectors=size // 512, ident=ID_A, granularity_sectors=1,
                    l1=l1_of(place, cluster, size))
        return bitmap_feature(**{**args, **fields})
    return build


def _all_set(place, cluster, size):
    return [L1_ALL_SET] * 4  # 4 KiB clusters, 512-byte granules, 64 MiB: 4 chunks


def _twice(place, cluster, size):
    return _one(_all_set)(place, cluster, size) * 2


def _raw(data: bytes):
    return lambda place, cluster, size: data


HOSTILE = {
    # name: (build, checksum_ok, qemu refuses it too on every version we run)
    "bad checksum": (_one(_all_set), False, True),
    "unknown feature": (_raw(feature(0x1234, b"x" * 8)), True, True),
    "feature flags": (_raw(feature(DIRTY_BITMAP_FEATURE, b"", flags=1)), True, True),
    "data_size past the cluster": (
        _raw(feature(DIRTY_BITMAP_FEATURE, b"", data_size=1 << 31)), True, True),
    "short bitmap feature": (_raw(feature(DIRTY_BITMAP_FEATURE, b"\0" * 8)), True, True),
    "size differs from the disk": (_one(_all_set, disk_sectors=12345), True, True),
    "l1 past data_size": (_one(_all_set, l1_size=0xFFFFFFFF), True, True),
    # qemu 7.2 aborts on this granularity, qemu 10 refuses it in one line.
    "granularity not a power of two": (_one(_all_set, granularity_sectors=3), True, False),
    # qemu 7.2 reads a table shorter than the bitmap as zeros; qemu 10 refuses it.
    "l1 table too short": (_one(lambda p, c, s: [L1_ALL_SET]), True, False),
    "data cluster past the end": (_one(lambda p, c, s: [1 << 40] * 4), True, False),
    "same id twice": (_twice, True, True),
}

LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from qnbd.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_extension_refused_in_one_line(tmp_path, case):
    build, checksum_ok, qemu_refuses = HOSTILE[case]
    img = str(tmp_path / "disk.parallels")
    run("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4k", img, "64M")
    add_extension(img, build, checksum_ok=checksum_ok)
    if qemu_refuses:
        qemu = subprocess.run(["qemu-img", "info", "-f", "parallels", img],
                              capture_output=True, text=True, timeout=60)
        assert qemu.returncode == 1, qemu.stdout + qemu.stderr
    r = subprocess.run([sys.executable, "-c", LIMITED, "serve", "-r", "-k",
                        os.path.join(short_tmpdir(), "s"), img],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qnbd serve: '{img}': "), r.stderr


def test_extension_past_the_end_refused(tmp_path):
    img = str(tmp_path / "disk.parallels")
    run("qemu-img", "create", "-q", "-f", "parallels", img, "8M")
    with open(img, "r+b") as f:
        f.seek(56)
        f.write(struct.pack("<Q", 1 << 40))
    r = run_serve("-r", "-k", os.path.join(short_tmpdir(), "s"), img)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"qnbd serve: '{img}': the Format Extension cluster is past the end of the file"]


def test_convert_bitmaps_from_parallels_as_qemu_img(bitmap_image, tmp_path):
    """qemu loads a parallels image's bitmaps as not persistent: convert --bitmaps copies
    the data and none of them. qnbd does what current qemu (10) does; qemu 7.2, whose
    parallels driver did not support persistent bitmaps, refused the source instead."""
    img, _ = bitmap_image
    theirs, ours = str(tmp_path / "q.qcow2"), str(tmp_path / "o.qcow2")
    qemu = subprocess.run(["qemu-img", "convert", "--bitmaps", "-f", "parallels", "-O",
                           "qcow2", img, theirs], capture_output=True, text=True)
    qnbd("convert", "--bitmaps", "-f", "parallels", "-O", "qcow2", img, ours)
    assert info_bitmaps(ours) == []
    run("qemu-img", "compare", "-f", "parallels", "-F", "qcow2", img, ours)
    if qemu.returncode == 0:
        assert info_bitmaps(theirs) == []
    else:
        assert qemu.stderr == "qemu-img: Source lacks bitmap support\n"


def test_merge_from_a_parallels_bitmap_as_qemu_img(bitmap_image, tmp_path):
    """qemu-img bitmap --merge NAME -b IMAGE -F parallels reads the parallels bitmap."""
    img, (name_a, _) = bitmap_image
    targets = []
    for tool in ("qemu-img", "qnbd"):
        target = str(tmp_path / f"{tool}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", target, "64M")
        run("qemu-img", "bitmap", "--add", "-g", "4096", target, "m")
        merge = ["bitmap", "--merge", name_a, "-b", img, "-F", "parallels", target, "m"]
        if tool == "qemu-img":
            run("qemu-img", *merge)
        else:
            qnbd(*merge)
        targets.append(qemu_dirty_map(target, "m"))
    assert targets[0] == targets[1] == expected_dirty(DIRTY_A, 4096, 64 * MiB)


def test_extension_in_huge_clusters_refused_in_one_line(tmp_path):
    """The extension cluster is read whole: clusters above MAX_EXT_CLUSTER are refused
    (our bound on memory; qemu reads any)."""
    img = str(tmp_path / "disk.parallels")
    cluster = 2 * MAX_EXT_CLUSTER
    run("qemu-img", "create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster}",
        img, "64M")
    add_bitmaps(img, {ID_A: (512, DIRTY_A)})
    r = run_serve("-r", "-k", os.path.join(short_tmpdir(), "s"), img)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"qnbd serve: '{img}': a Format Extension in clusters of {cluster} bytes is not "
        f"supported (at most {MAX_EXT_CLUSTER})"]
