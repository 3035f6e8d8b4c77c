"""qnbd check against qemu-img check: clean images of every shape, and images damaged on
purpose with struct patches (qcow2util), before and after repair by either tool."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from qnbd.block.check_result import FIX_ALL, FIX_LEAKS
from qnbd.commands.check import to_json
from qnbd.qcow2.check import check_image

from peers import qemu_img, qemu_io
from images import MiB, SHAPES
from qcow2util import COPIED, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, patch_fields, patch_u64, read_field, read_u64

L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def qemu_check(path, *args):
    """(exit code, json dict) of qemu-img check."""
    r = subprocess.run(["qemu-img", "check", "--output=json", *args, str(path)],
                       capture_output=True, text=True)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}


def qnbd_check(path, fix=0):
    result = check_image(str(path), fix)
    return result.exit_code, to_json(result)


def counts(code, report):
    """What both tools must agree on: the exit code, and the counts unless the check
    did not complete (qemu then prints no report)."""
    if code == 1:
        return code, None
    return code, report.get("corruptions", 0), report.get("leaks", 0)


def assert_agree(path):
    mine_code, mine = qnbd_check(path)
    code, theirs = qemu_check(path)
    assert counts(mine_code, mine) == counts(code, theirs), (mine, theirs)
    return code, theirs


# -- clean images ---------------------------------------------------------------------

def shaped_images():
    extra = [
        ("snapshots", "", ["snapshot -c one {}", "io:write -P 7 0 3M", "snapshot -c two {}",
                           "io:write -P 9 1M 64k"]),
        ("bitmaps", "", ["bitmap --add {} b0", "bitmap --add -g 512k {} b1",
                         "io:write -P 3 0 5M"]),
        ("bitmaps-r1-4k", "refcount_bits=1,cluster_size=4096",
         ["bitmap --add {} b0", "io:write -P 3 0 1M"]),
    ]
    return [(s.name, s) for s in SHAPES] + [(name, (opts, ops)) for name, opts, ops in extra]


def build(tmp_path, spec):
    if not isinstance(spec, tuple):
        return spec.build(tmp_path)
    opts, ops = spec
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, "8M")
    qemu_io(path, "qcow2", "write -P 1 0 2M", f"write -P 2 {4 * MiB} 1M")
    for op in ops:
        if op.startswith("io:"):
            qemu_io(path, "qcow2", op[3:])
        else:
            qemu_img(*op.format(path).split())
    return path


@pytest.mark.parametrize("name,spec", shaped_images(), ids=[n for n, _ in shaped_images()])
def test_clean_images(name, spec, tmp_path):
    path = build(tmp_path, spec)
    mine_code, mine = qnbd_check(path)
    code, theirs = qemu_check(path)
    assert code == 0 and mine_code == 0, (mine, theirs)
    theirs["filename"] = mine["filename"]
    assert mine == theirs


# -- damage ------------------------------------------------------------------------------

def layout(path):
    """Offsets of the first refcount block, the first L2 table and its first data entry."""
    cs = 1 << read_field(path, "cluster_bits")
    reftable = read_field(path, "refcount_table_offset")
    refblock = read_u64(path, reftable)
    l2 = read_u64(path, read_field(path, "l1_table_offset")) & L2_OFFSET_MASK
    return cs, reftable, refblock, l2


def refcount_at(path, cluster):
    _cs, _rt, refblock, _l2 = layout(path)
    return refblock + 2 * cluster  # 16-bit refcounts


def set_refcount(path, cluster, value):
    with open(path, "r+b") as f:
        f.seek(refcount_at(path, cluster))
        f.write(struct.pack(">H", value))


def leak_past_end(path):
    cs = layout(path)[0]
    end = -(-os.path.getsize(path) // cs)
    with open(path, "r+b") as f:
        f.truncate((end + 1) * cs)
    set_refcount(path, end, 1)


def bump_data_refcount(path):
    cs, _rt, _rb, l2 = layout(path)
    set_refcount(path, (read_u64(path, l2) & L2_OFFSET_MASK) // cs, 2)


def drop_data_refcount(path):
    cs, _rt, _rb, l2 = layout(path)
    set_refcount(path, (read_u64(path, l2) & L2_OFFSET_MASK) // cs, 0)


def clear_copied(path):
    l2 = layout(path)[3]
    patch_u64(path, l2 + 8, read_u64(path, l2 + 8) & ~COPIED)


def l2_past_eof(path):
    l2 = layout(path)[3]
    patch_u64(path, l2 + 16, COPIED | (1 << 40))


def zero_reftable_entry(path):
    patch_u64(path, layout(path)[1], 0)


def zero_refcount_of_l2(path):
    cs, _rt, _rb, l2 = layout(path)
    set_refcount(path, l2 // cs, 0)


def dirty_with_leak(path):
    leak_past_end(path)
    patch_fields(path, incompatible_features=INCOMPAT_DIRTY)


def corrupt_bit_wrong_copied(path):
    clear_copied(path)
    patch_fields(path, incompatible_features=INCOMPAT_CORRUPT)


# (damage, data survives it, qemu-img check -r all leaves it clean)
DAMAGES = [
    (leak_past_end, True, True),
    (bump_data_refcount, True, True),
    (drop_data_refcount, True, True),
    (clear_copied, True, True),
    (l2_past_eof, False, False),
    (zero_reftable_entry, True, True),
    (zero_refcount_of_l2, True, True),
    (dirty_with_leak, True, True),
    (corrupt_bit_wrong_copied, True, True),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine")
    path = str(d / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_io(path, "qcow2", "write -P 1 0 3M", f"write -P 2 {8 * MiB} 64k",
            f"write -c -P 3 {12 * MiB} 64k")
    return path


@pytest.mark.parametrize("damage,keeps_data,repairable", DAMAGES,
                         ids=[d[0].__name__ for d in DAMAGES])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_damaged(pristine, tmp_path, damage, keeps_data, repairable, mode):
    mine = str(tmp_path / "mine.qcow2")
    theirs = str(tmp_path / "theirs.qcow2")
    shutil.copy(pristine, mine)
    damage(mine)
    shutil.copy(mine, theirs)
    code, before = assert_agree(mine)
    assert code != 0, before

    fix = FIX_ALL if mode == "all" else FIX_LEAKS
    result = check_image(mine, fix)
    qemu_code, qemu_after = qemu_check(theirs, "-r", mode)
    assert counts(result.exit_code, to_json(result)) == counts(qemu_code, qemu_after), \
        (result, qemu_after)
    fixed = ("corruptions-fixed", "leaks-fixed")
    assert [to_json(result).get(k, 0) for k in fixed] == [qemu_after.get(k, 0) for k in fixed]
    # After our repair qemu agrees with us, and the image is as good as after qemu's.
    code, after = assert_agree(mine)
    assert counts(code, after) == counts(*qemu_check(theirs))
    if mode == "all" and repairable:
        assert code == 0, (after, result.messages)
        flags = read_field(mine, "incompatible_features")
        assert not flags & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    if keeps_data and code == 0:
        r = subprocess.run(["qemu-img", "compare", pristine, mine], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_cli_exit_codes_and_json(pristine, tmp_path):
    path = str(tmp_path / "x.qcow2")
    shutil.copy(pristine, path)
    leak_past_end(path)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qnbd.cli", "check", *args, path],
                              capture_output=True, text=True)
    r = cli("--output=json")
    assert r.returncode == 3
    mine = json.loads(r.stdout)
    _code, theirs = qemu_check(path)
    theirs["filename"] = mine["filename"]
    assert mine == theirs
    r = cli("-r", "leaks")
    assert r.returncode == 0
    assert "1 leaked clusters" in r.stdout and "No errors were found" in r.stdout
    assert cli().returncode == 0

    with open(path, "r+b") as f:
        f.write(b"junk")
    # Probed, the damaged file is raw, which has no check (qemu-img: 63); as qcow2 it
    # cannot be opened (1). Both as qemu-img answers.
    for fmt in ([], ["-f", "qcow2"]):
        r = cli(*fmt)
        theirs = subprocess.run(["qemu-img", "check", *fmt, path], capture_output=True)
        assert r.returncode == theirs.returncode and r.stderr.strip()
