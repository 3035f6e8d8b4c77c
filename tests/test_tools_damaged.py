"""The tools of issue 11 on damaged images: map, convert (also -c and -l), snapshot -l,
info and resize give a one-line error, never a traceback, and write nothing into the
image (serve -l's errors: tests/test_snapshots.py)."""

import struct

import pytest

from cli_util import qnbd, qnbd_subprocess
from peers import qemu_img, qemu_io
from qcow2util import patch_u64, read_field


def _image(tmp_path, snapshot=False):
    image = str(tmp_path / "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    qemu_io(image, "qcow2", "write -P 1 0 1M")
    if snapshot:
        qemu_img("snapshot", "-c", "s1", image)
    return image


def _l1_past_eof(image):
    patch_u64(image, read_field(image, "l1_table_offset"), (1 << 63) | (1 << 40))


def _snapshot_l1_past_eof(image):
    # qcow2.rst "Snapshots": an entry starts with its L1 table offset (8 bytes).
    patch_u64(image, read_field(image, "snapshots_offset"), 1 << 40)


def _snapshot_extra_too_big(image):
    # bytes 36-39 of an entry: the size of its extra data.
    with open(image, "r+b") as f:
        f.seek(read_field(image, "snapshots_offset") + 36)
        f.write(struct.pack(">I", 1 << 20))


DAMAGE = {
    "l1-entry-past-eof": (_l1_past_eof, False),
    "snapshot-l1-past-eof": (_snapshot_l1_past_eof, True),
    "snapshot-extra-too-big": (_snapshot_extra_too_big, True),
}
COMMANDS = [
    ["map", "--output=json"], ["map"], ["convert", "-O", "raw", "{image}", "{out}"],
    ["convert", "-c", "-O", "qcow2", "{image}", "{out}"], ["snapshot", "-l"], ["info"],
    ["resize", "{image}", "+1M"], ["convert", "-l", "s1", "{image}", "{out}"],
]


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c[:2]))
def test_one_line_error_image_untouched(tmp_path, damage, command):
    patch, with_snapshot = DAMAGE[damage]
    image = _image(tmp_path, with_snapshot)
    patch(image)
    before = open(image, "rb").read()
    out = str(tmp_path / "out.img")
    args = [a.format(image=image, out=out) for a in command]
    if "{image}" not in command:
        args.append(image)
    rc, _, err = qnbd(*args)
    if rc == 0:
        # Some damage is not in the way of some commands (info reads only the header
        # and the snapshot table; a resize needs no L2 table): they succeed cleanly.
        assert err == ""
        if args[0] == "resize":
            return  # it did what it was asked
    else:
        assert rc == 1 and err.count("\n") == 1 and err.startswith("qnbd "), err
        assert "Traceback" not in err
    assert open(image, "rb").read() == before


def test_no_traceback_from_a_separate_process(tmp_path):
    image = _image(tmp_path)
    _l1_past_eof(image)
    p = qnbd_subprocess("convert", "-O", "raw", image, tmp_path / "o.raw")
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
