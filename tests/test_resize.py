"""`qnbd resize` against `qemu-img resize` on images qemu-img made: the same size and
content as qemu-img's own resize of a copy (qemu-img compare), qemu-img check clean;
shrinking only over an unallocated tail; power cuts during a resize leave the old or the
new size, never damage."""

import json
import random
import shutil

import pytest

from qnbd import fileio
from qnbd.formats import open_image

from cli_util import qemu_img_check, qemu_img_info, qnbd, qnbd_ok
from bitmaputil import qemu_dirty_map
from crashsim import Recorder, crash_states
from images import RAW, SHAPES
from lockutil import leave_bitmaps_in_use
from peers import qemu_img, qemu_io, run

MiB = 1 << 20


def _resize_both(tmp_path, image, fmt, *args):
    """Resize `image` with qnbd and a copy with qemu-img; returns the copy."""
    theirs = str(tmp_path / ("theirs." + fmt))
    shutil.copyfile(image, theirs)
    qnbd_ok("resize", "-f", fmt, *args[:-1], image, args[-1])
    qemu_img("resize", "-f", fmt, *args[:-1], theirs, args[-1])
    return theirs


def _same(a, b, fmt):
    p = run("qemu-img", "compare", "-f", fmt, "-F", fmt, a, b, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("shape", SHAPES + [RAW], ids=lambda s: s.name)
def test_grow_like_qemu_img(tmp_path, shape):
    image = shape.build(tmp_path)
    # c512: +64M needs an L1 table of 2048 entries, far more than the image had.
    theirs = _resize_both(tmp_path, image, shape.fmt, "+64M")
    assert qemu_img_info(image)["virtual-size"] == shape.size + 64 * MiB
    _same(image, theirs, shape.fmt)
    if shape.fmt == "qcow2":
        assert qemu_img_check(image).returncode == 0
        qemu_io(image, "qcow2", f"write -P 9 {shape.size + 60 * MiB} 1M")  # usable


def test_grow_over_a_longer_backing_file_reads_zeros(tmp_path):
    """qemu zeroes the new space where a longer backing file would show through."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "8M")
    qemu_io(base, "raw", "write -P 9 0 8M")
    for name in ("ours.qcow2", "theirs.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                 tmp_path / name, "3M")
    qnbd_ok("resize", tmp_path / "ours.qcow2", "+3M")
    qemu_img("resize", tmp_path / "theirs.qcow2", "+3M")
    _same(tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2", "qcow2")
    maps = [run("qemu-img", "map", "--output=json", tmp_path / n).stdout
            for n in ("ours.qcow2", "theirs.qcow2")]
    assert maps[0] == maps[1]
    assert qemu_img_check(tmp_path / "ours.qcow2").returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_shrink_over_an_unallocated_tail(tmp_path, fmt):
    image = str(tmp_path / f"i.{fmt}")
    qemu_img("create", "-q", "-f", fmt, image, "16M")
    qemu_io(image, fmt, "write -P 5 0 3M")
    rc, _, err = qnbd("resize", "-f", fmt, image, "--", "-8M")
    assert rc == 1 and "--shrink" in err
    theirs = _resize_both(tmp_path, image, fmt, "--shrink", "-8M")
    assert qemu_img_info(image)["virtual-size"] == 8 * MiB
    _same(image, theirs, fmt)
    if fmt == "qcow2":
        assert qemu_img_check(image).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_shrink_over_data_is_refused_untouched(tmp_path, fmt):
    image = str(tmp_path / f"i.{fmt}")
    qemu_img("create", "-q", "-f", fmt, image, "16M")
    qemu_io(image, fmt, "write -P 5 12M 4k")
    before = open(image, "rb").read()
    rc, _, err = qnbd("resize", "--shrink", "-f", fmt, image, "8M")
    assert rc == 1 and "holds data at offset" in err and err.count("\n") == 1
    assert open(image, "rb").read() == before


def _with_snapshot(tmp_path, options=""):
    image = str(tmp_path / "s.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), image, "4M")
    qemu_io(image, "qcow2", "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "one", image)
    qemu_io(image, "qcow2", "write -P 2 0 512k")
    return image


def test_grow_with_snapshots_keeps_them(tmp_path):
    image = _with_snapshot(tmp_path, "cluster_size=512")
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=one", image, before)
    qnbd_ok("resize", image, "+8M")
    assert qemu_img_check(image).returncode == 0
    after = tmp_path / "after.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=one", image, after)
    # qemu shows a snapshot at the image's current size: the new space reads zeros.
    old = before.read_bytes()
    assert after.read_bytes() == old + bytes(8 * MiB)


def test_v2_with_snapshots_cannot_be_resized_as_in_qemu_img(tmp_path):
    image = _with_snapshot(tmp_path, "compat=0.10")
    before = open(image, "rb").read()
    rc, _, err = qnbd("resize", image, "+1M")
    assert rc == 1 and "Can't resize a v2 image which has snapshots" in err
    assert run("qemu-img", "resize", image, "+1M", check=False).returncode == 1
    assert open(image, "rb").read() == before


def test_shrink_with_snapshots_like_qemu_img(tmp_path):
    """The snapshot keeps what lies past the new end: it has its own L1 table."""
    image = _with_snapshot(tmp_path)
    theirs = _resize_both(tmp_path, image, "qcow2", "--shrink", "2M")
    _same(image, theirs, "qcow2")
    assert qemu_img_check(image).returncode == 0
    snapshot = [run("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=one", path,
                    tmp_path / f"{i}.raw").returncode for i, path in enumerate((image, theirs))]
    assert snapshot == [0, 0]
    assert (tmp_path / "0.raw").read_bytes() == (tmp_path / "1.raw").read_bytes()


@pytest.mark.parametrize("args", [["+300M"], ["--shrink", "2M"]])
def test_bitmaps_follow_the_size_as_in_qemu_img(tmp_path, args):
    """Dirty bits past a shrunk end go, a grown end starts clean, and a bitmap table
    grows with the image (b1: 512-byte granularity, one table cluster covers 256 MiB):
    the bitmaps qemu reads back (qemu-nbd -B) are the ones of qemu-img's own resize of a
    copy."""
    image = str(tmp_path / "b.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    qemu_img("bitmap", "--add", image, "b0")
    qemu_img("bitmap", "--add", "-g", "512", "--disable", image, "b1")
    # Dirty past 2M, yet unallocated there (shrinking needs an unallocated tail).
    qemu_io(image, "qcow2", "write -P 1 64k 64k", "write -P 2 3M 128k", "discard 3M 128k")
    qemu_img("bitmap", "--enable", image, "b1")
    qemu_io(image, "qcow2", "write -P 3 1M 4k")
    theirs = _resize_both(tmp_path, image, "qcow2", *args)
    assert qemu_img_check(image).returncode == 0
    assert qemu_img_info(image)["format-specific"] == qemu_img_info(theirs)["format-specific"]
    for name in ("b0", "b1"):
        assert qemu_dirty_map(image, name) == qemu_dirty_map(theirs, name)
    assert qemu_dirty_map(image, "b0")  # something is dirty


def test_unloadable_bitmaps_refuse_a_resize(tmp_path):
    """A bitmap left in use cannot follow a resize (qcow2_truncate_bitmaps_check)."""
    image = str(tmp_path / "b.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    qemu_img("bitmap", "--add", image, "b0")
    leave_bitmaps_in_use(image)
    rc, _, err = qnbd("resize", image, "+1M")
    assert rc == 1 and "were not loaded" in err
    assert qemu_img_info(image)["virtual-size"] == 4 * MiB


@pytest.mark.parametrize("args,message", [
    (["+1000"], "multiple of 512"),
    (["1x"], "Invalid image size"),
    (["--", "-5M"], "must be positive"),
])
def test_bad_requests_one_line_error_untouched(tmp_path, args, message):
    image = str(tmp_path / "i.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    before = open(image, "rb").read()
    rc, _, err = qnbd("resize", "--shrink", image, *args)
    assert rc == 1 and message in err and err.count("\n") == 1, err
    assert open(image, "rb").read() == before


def test_raw_sizes_need_no_alignment(tmp_path):
    image = str(tmp_path / "r.raw")
    qemu_img("create", "-q", "-f", "raw", image, "1000")
    theirs = _resize_both(tmp_path, image, "raw", "+1")
    assert qemu_img_info(image)["virtual-size"] == qemu_img_info(theirs)["virtual-size"]


def test_power_cuts_while_growing_the_l1_table(tmp_path, monkeypatch):
    """Every crash state of every interval of a resize that moves the L1 table
    (tests/crashsim.py) is a consistent image (qemu-img check: no corruption) with the
    old content, at the old size or the new one."""
    image = str(tmp_path / "c.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", image, "1M")
    qemu_io(image, "qcow2", "write -P 3 0 1M")
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", image, expected)
    intervals = []
    recorder = Recorder(lambda r: intervals.append(r.interval(None)))
    real_open = fileio.open_file
    monkeypatch.setattr(fileio, "open_file",
                        lambda path, writable: recorder.wrap(real_open(path, writable)))
    dev = open_image(image, "qcow2", read_only=False)
    dev.resize(40 * MiB)
    dev.close()
    monkeypatch.setattr(fileio, "open_file", real_open)
    states = [contents[image] for iv in intervals for _what, contents in
              crash_states(iv, random.Random(1))]
    assert len(states) >= 10
    for i, content in enumerate(states):
        path = tmp_path / f"state{i}.qcow2"
        path.write_bytes(content)
        r = run("qemu-img", "check", "--output=json", path, check=False)
        assert r.returncode in (0, 3), r.stdout + r.stderr  # leaks allowed, no corruption
        size = json.loads(run("qemu-img", "info", "--output=json", path).stdout)["virtual-size"]
        assert size in (MiB, 40 * MiB)
        p = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, expected, check=False)
        assert p.returncode == 0, f"state {i}: {p.stdout}"
        path.unlink()
