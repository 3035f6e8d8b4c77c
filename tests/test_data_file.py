"""External data files (qcow2.rst, incompatible bit 2, autoclear bit 1, extension
0x44415441; docs/DESIGN.md rule 13), against images and checks made by qemu."""

import json
import os
import random

import pytest

from qnbd.errors import ImageError
from qnbd.formats import image_info, open_image

from cli_util import qnbd
from images import MiB
from peers import qemu_img, qemu_io, run
from workload import Model, apply_ops, random_ops

SIZE = 4 * MiB


def make(tmp_path, raw: bool, name="img"):
    """An image with its data file beside it, made and written by qemu. qemu opens a
    relative data file name from its working directory, so it runs in the image's."""
    opts = f"data_file={name}.data" + (",data_file_raw=on" if raw else "")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, f"{name}.qcow2", str(SIZE),
        cwd=tmp_path)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "write -z 128k 64k",
        "-c", "write -P 9 1M 100k", "-c", "discard 1M 64k", "-c", "write -P 3 3M 10k",
        f"{name}.qcow2", cwd=tmp_path)
    return str(tmp_path / f"{name}.qcow2"), str(tmp_path / f"{name}.data")


def qemu_content(image, tmp_path) -> bytes:
    out = str(tmp_path / "expected.raw")
    run("qemu-img", "convert", "-U", "-O", "raw", os.path.basename(image), out,
        cwd=os.path.dirname(image))
    with open(out, "rb") as f:
        return f.read()


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_reads_equal_qemu(tmp_path, raw):
    image, _data = make(tmp_path, raw)
    expected = qemu_content(image, tmp_path)
    dev = open_image(image, read_only=True)
    try:
        assert bytes(dev.read(0, dev.size)) == expected
        for off in range(0, SIZE, 65536):  # block status agrees with the data
            for e in dev.block_status(off, 65536):
                if e.flags & 2:
                    assert expected[off:off + e.length].count(0) == e.length
                break
    finally:
        dev.close()


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_workload_checked_by_qemu(tmp_path, raw, seed):
    image, data = make(tmp_path, raw)
    start = qemu_content(image, tmp_path)
    dev = open_image(image, read_only=False)
    model = Model(start, dev.cluster_size, discard_keeps=False)
    try:
        apply_ops(dev, model, random_ops(random.Random(seed), SIZE, 60))
        assert bytes(dev.read(0, SIZE)) == model.data
    finally:
        dev.close()
    r = run("qemu-img", "check", os.path.basename(image), cwd=tmp_path, check=False)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    assert qemu_content(image, tmp_path) == model.data
    with open(data, "rb") as f:
        raw_content = f.read()
    if raw:  # the data file alone is the disk (rule 13)
        assert raw_content[:SIZE] == model.data


def test_create_and_info_match_qemu(tmp_path):
    for raw in (False, True):
        opts = "data_file=mine.data" + (",data_file_raw=on" if raw else "")
        rc, out, err = qnbd("create", "-f", "qcow2", "-o", opts, str(tmp_path / "mine.qcow2"),
                            "4M")
        assert rc == 0, err
        run("qemu-img", "create", "-f", "qcow2", "-o", opts.replace("mine", "theirs"),
            "theirs.qcow2", "4M", cwd=tmp_path)
        mine = image_info(str(tmp_path / "mine.qcow2"))
        theirs = json.loads(run("qemu-img", "info", "--output=json", "theirs.qcow2",
                                cwd=tmp_path).stdout)
        assert mine["format-specific"]["data"]["data-file-raw"] == raw
        assert mine["format-specific"]["data"]["data-file"] == "mine.data"
        theirs["format-specific"]["data"]["data-file"] = "mine.data"
        assert mine["format-specific"] == theirs["format-specific"]
        assert os.path.getsize(tmp_path / "mine.data") == SIZE
        # qemu reads and writes what qnbd made.
        run("qemu-io", "-f", "qcow2", "-c", "write -P 5 0 1M", "-c", "read -P 5 0 1M",
            "mine.qcow2", cwd=tmp_path)
        r = run("qemu-img", "check", "mine.qcow2", cwd=tmp_path)
        assert "No errors were found" in r.stdout


def test_data_file_under_the_backing_policy(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "img").mkdir()
    image = str(tmp_path / "img" / "i.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={elsewhere}/d.raw", image,
             "1M")
    open_image(image, backing_policy="any").close()
    for policy in ("same-dir", "none"):
        with pytest.raises(ImageError, match="data file .* not allowed"):
            open_image(image, backing_policy=policy)


def _lock_bytes(path) -> set[int]:
    """The lock bytes any process holds on `path` (/proc/locks: OFD locks by inode)."""
    st = os.stat(path)
    held = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            dev_inode = parts[5].split(":")
            if int(dev_inode[2]) == st.st_ino:
                held.update(range(int(parts[6]), int(parts[7]) + 1))
    return held


def test_data_file_locked_as_qemu_locks_it(tmp_path):
    """qemu locks a data file as a data child: it holds read and write and refuses to
    share resize; a second writer of the raw file is allowed, as with qemu-nbd."""
    image, data = make(tmp_path, raw=False)
    dev = open_image(image, read_only=False)
    try:
        mine = _lock_bytes(data)
    finally:
        dev.close()
    sock = str(tmp_path / "s")
    run("qemu-nbd", "--fork", "-f", "qcow2", "-k", sock, "img.qcow2", cwd=tmp_path)
    try:
        theirs = _lock_bytes(data)
    finally:
        # Without -t, qemu-nbd ends when its first client leaves.
        run("qemu-io", "-f", "raw", "-c", "read 0 512", f"nbd+unix:///?socket={sock}")
    assert mine == theirs and mine
    qemu_io(data, "raw", "read 0 512")


def test_unsupported_combinations_are_one_line(tmp_path):
    image, _ = make(tmp_path, raw=False)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=s.data", "s.qcow2", "1M",
        cwd=tmp_path)
    rc, _out, err = qnbd("create", "-f", "qcow2", "-o", "compat=0.10,data_file=x.data",
                         str(tmp_path / "x.qcow2"), "1M")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "compatibility level" in err
    rc, _out, err = qnbd("create", "-f", "qcow2", "-o", "data_file=y.data,data_file_raw=on",
                         "-b", image, "-F", "qcow2", str(tmp_path / "y.qcow2"))
    assert rc == 1 and "data-file-raw" in err
    os.unlink(tmp_path / "img.data")
    with pytest.raises(ImageError, match="img.data"):
        open_image(image)
