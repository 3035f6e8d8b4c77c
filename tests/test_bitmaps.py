"""Persistent dirty bitmaps: what qnbd stores must mean the same to qemu (qemu-nbd -B,
qemu-img info/check), and `qnbd bitmap` must do what `qemu-img bitmap` does."""

import random
import shutil
import signal
import subprocess
import sys

import pytest

from qnbd.formats import open_image
from qnbd.errors import ImageError

from images import MiB
from bitmaputil import SIZE, expected_dirty, info_bitmaps, qemu_dirty_map, qnbd
from peers import check_clean, qemu_img, qemu_io


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "b.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
    return path


def random_updates(dev, rng, count=30):
    ranges = []
    for _ in range(count):
        off = rng.randrange(0, SIZE - 1)
        n = min(rng.randrange(1, 3 * MiB), SIZE - off)
        kind = rng.choice(["write", "zero", "discard"])
        if kind == "write":
            dev.write(off, b"\x5a" * n)
        elif kind == "zero":
            dev.write_zeroes(off, n, may_trim=rng.random() < 0.5)
        else:
            dev.discard(off, n)
        ranges.append((off, n))
    return ranges


def test_in_use_while_open_and_cleared_on_close(image):
    qemu_img("bitmap", "--add", image, "b0")
    dev = open_image(image, read_only=False)
    try:
        flags = info_bitmaps(image, force=True)[0]["flags"]
        assert "in-use" in flags and "auto" in flags
        dev.write(0, b"x" * 4096)
    finally:
        dev.close()
    assert info_bitmaps(image)[0]["flags"] == ["auto"]
    check_clean(image)


def test_read_only_open_leaves_bitmaps_alone(image):
    qemu_img("bitmap", "--add", image, "b0")
    before = open(image, "rb").read()
    open_image(image, read_only=True).close()
    assert open(image, "rb").read() == before


@pytest.mark.parametrize("granularity", [512, 65536, 1 << 20, 4 << 20])
def test_qemu_reads_the_dirty_set_qnbd_stored(image, granularity):
    qemu_img("bitmap", "--add", "-g", str(granularity), image, "b")
    dev = open_image(image, read_only=False)
    try:
        ranges = random_updates(dev, random.Random(granularity))
        ours = [(o, n) for o, n in _offsets(dev.bitmaps.get("b").extents(0, SIZE))]
    finally:
        dev.close()
    check_clean(image)
    expected = expected_dirty(ranges, granularity)
    assert ours == expected
    assert qemu_dirty_map(image, "b") == expected


def _offsets(extents):
    pos = 0
    for length, dirty in extents:
        if dirty:
            yield pos, length
        pos += length


def test_dirty_sets_accumulate_and_disabled_bitmaps_stay(image):
    qemu_img("bitmap", "--add", image, "on")
    qemu_img("bitmap", "--add", "--disable", image, "off")
    rng = random.Random(3)
    all_ranges = []
    for _session in range(3):
        dev = open_image(image, read_only=False)
        try:
            all_ranges += random_updates(dev, rng, count=5)
        finally:
            dev.close()
        check_clean(image)
    assert qemu_dirty_map(image, "on") == expected_dirty(all_ranges, 65536)
    assert qemu_dirty_map(image, "off") == []


def test_bitmap_tracks_writes_made_by_qemu_then_qnbd(image):
    qemu_img("bitmap", "--add", image, "b")
    qemu_io(image, "qcow2", "write 0 64k", f"write {10 * MiB} 100k")
    dev = open_image(image, read_only=False)
    try:
        dev.write(20 * MiB, b"q" * 10)
    finally:
        dev.close()
    assert qemu_dirty_map(image, "b") == expected_dirty(
        [(0, 65536), (10 * MiB, 100 * 1024), (20 * MiB, 10)], 65536)


def test_bitmap_left_in_use_by_a_killed_process_is_refused_and_removable(image):
    qemu_img("bitmap", "--add", image, "b")
    code = ("import os, sys; from qnbd.formats import open_image;"
            "d = open_image(sys.argv[1], read_only=False); d.write(0, b'x' * 65536);"
            "d.flush(); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, image], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert "in-use" in info_bitmaps(image)[0]["flags"]
    dev = open_image(image, read_only=True)
    try:
        with pytest.raises(ImageError, match="inconsistent"):
            dev.bitmaps.get("b")
    finally:
        dev.close()
    qnbd("bitmap", "--remove", image, "b")
    assert info_bitmaps(image) == []
    check_clean(image)


# -- qnbd bitmap against qemu-img bitmap ------------------------------------------------

# Each step: (bitmap name, qemu-img bitmap arguments). "src" is dirty, "tgt" too.
SCENARIOS = [
    [("a", ["--add"]), ("b", ["--add", "-g", "128k"])],
    [("a", ["--add", "--disable"])],
    [("tgt", ["--clear"])],
    [("tgt", ["--disable"]), ("tgt", ["--enable"])],
    [("tgt", ["--remove"])],
    [("a", ["--add"]), ("a", ["--merge", "src"])],
    [("a", ["--add", "-g", "1M", "--merge", "src", "--disable"])],
    [("tgt", ["--merge", "src"]), ("src", ["--clear"])],
]


@pytest.mark.parametrize("steps", SCENARIOS,
                         ids=lambda s: "; ".join(f"{n} {' '.join(a)}" for n, a in s))
def test_qnbd_bitmap_equals_qemu_img_bitmap(tmp_path, steps):
    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_img("bitmap", "--add", base, "src")
    qemu_img("bitmap", "--add", "-g", "256k", base, "tgt")
    qemu_io(base, "qcow2", "write 0 1M", f"write -z {7 * MiB} 300k", f"discard {30 * MiB} 2M")
    mine, theirs = str(tmp_path / "mine.qcow2"), str(tmp_path / "theirs.qcow2")
    shutil.copy(base, mine)
    shutil.copy(base, theirs)
    for name, args in steps:
        qemu_img("bitmap", *args, theirs, name)
        qnbd("bitmap", *args, mine, name)
        check_clean(mine)
    assert info_bitmaps(mine) == info_bitmaps(theirs)
    for b in info_bitmaps(theirs):
        assert qemu_dirty_map(mine, b["name"]) == qemu_dirty_map(theirs, b["name"]), b


def test_qnbd_bitmap_merge_from_another_file(tmp_path):
    src, dst = str(tmp_path / "src.qcow2"), str(tmp_path / "dst.qcow2")
    for p in (src, dst):
        qemu_img("create", "-q", "-f", "qcow2", p, str(SIZE))
    qemu_img("bitmap", "--add", src, "s")
    qemu_io(src, "qcow2", f"write {5 * MiB} 64k")
    qnbd("bitmap", "--add", "--merge", "s", "-b", src, "-F", "qcow2", dst, "d")
    assert qemu_dirty_map(dst, "d") == [(5 * MiB, 65536)]
    check_clean(dst)


@pytest.mark.parametrize("args, message", [
    (["--remove"], "not found"),
    (["--add", "-g", "1000"], "power of two"),
    ([], "at least one"),
])
def test_qnbd_bitmap_errors_are_one_line(image, args, message):
    qemu_img("bitmap", "--add", image, "exists")
    r = qnbd("bitmap", *args, image, "missing", check=False)
    assert r.returncode == 1
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = qnbd("bitmap", "--add", image, "exists", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_bitmaps_need_v3(tmp_path):
    path = str(tmp_path / "v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "1M")
    r = qnbd("bitmap", "--add", path, "b", check=False)
    assert r.returncode == 1 and "compat=1.1" in r.stderr


def test_store_refused_midway_writes_nothing(image, monkeypatch):
    """Storing two bitmaps takes five allocations (data and table of each, directory).
    When a later one is refused as inconsistent (here: injected at the fourth), nothing
    may have been written: every allocation comes before every write."""
    from qnbd.errors import IOFailure

    qemu_img("bitmap", "--add", image, "a")
    qemu_img("bitmap", "--add", image, "b")
    dev = open_image(image, read_only=False)
    dev.write(0, b"x" * 65536)  # dirties both bitmaps
    dev.flush()
    before = open(image, "rb").read()
    real_allocate = dev.refcounts.allocate
    calls = []

    def allocate(count=1):
        calls.append(count)
        if len(calls) == 4:
            raise IOFailure("allocation would overwrite metadata (injected)")
        return real_allocate(count)

    monkeypatch.setattr(dev.refcounts, "allocate", allocate)
    with pytest.raises(IOFailure, match="injected"):
        dev.close()
    assert open(image, "rb").read() == before


def test_bitmap_table_larger_than_a_refcount_region(tmp_path):
    """512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters, so a
    bitmap table of 64 clusters (8 GiB at granularity 512) cannot sit beside any region's
    own block; it is placed past the end of the image with the blocks describing it."""
    path = str(tmp_path / "small.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
             path, "8G")
    qnbd("bitmap", "--add", "-g", "512", path, "fine")
    dev = open_image(path, read_only=False)
    try:
        dev.write(5 << 30, b"w" * 4096)
    finally:
        dev.close()
    check_clean(path)
    assert qemu_dirty_map(path, "fine") == [(5 << 30, 4096)]
