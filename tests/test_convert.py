"""`qnbd convert` against `qemu-img convert`, run side by side on images qemu-img made:
the output compares equal to the source (qemu-img compare), is clean (qemu-img check) and
as sparse as qemu-img's own output (the same runs allocated, per qemu-img map)."""

import json
import os
import subprocess

import pytest

from bitmaputil import qemu_dirty_map
from cli_util import qemu_img_check, qnbd, qnbd_ok, qnbd_on_terminal
from images import RAW, SHAPES
from lockutil import leave_bitmaps_in_use
from nbdserver import wait_for_socket
from peers import qemu_img, qemu_io, run

MiB = 1 << 20


# qemu allocates the first 4 KiB of every raw file it creates (file-posix.c,
# allocate_first_block, for alignment probing): raw outputs are compared after it.
RAW_FIRST_BLOCK = 4096


def _layout(path, fmt):
    """qemu-img map of `path` as runs of unallocated / zero / data, host offsets left
    out (they depend on allocation order, not on sparseness)."""
    start = RAW_FIRST_BLOCK if fmt == "raw" else 0
    entries = json.loads(run("qemu-img", "map", "-f", fmt, "--output=json", "-s", start,
                             path).stdout)
    runs = []
    for e in entries:
        kind = "data" if e["data"] and not e["zero"] else \
            "zero" if e["present"] else "unallocated"
        if e["data"] and e["zero"]:
            kind = "data"  # a host-file hole inside an allocated cluster: still allocated
        if runs and runs[-1][2] == kind:
            runs[-1][1] += e["length"]
        else:
            runs.append([e["start"], e["length"], kind])
    return runs


def _compare(src, src_fmt, out, out_fmt):
    p = run("qemu-img", "compare", "-f", src_fmt, "-F", out_fmt, src, out, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


CASES = [(shape, out) for shape in SHAPES + [RAW] for out in ("qcow2", "raw", "qcow2-c")]


@pytest.mark.parametrize("shape,out", CASES, ids=lambda v: getattr(v, "name", v))
def test_matrix_like_qemu_img(tmp_path, shape, out):
    src = shape.build(tmp_path)
    out_fmt, compress = out.split("-")[0], ["-c"] if out.endswith("-c") else []
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    qnbd_ok("convert", "-f", shape.fmt, "-O", out_fmt, *compress, src, ours)
    qemu_img("convert", "-f", shape.fmt, "-O", out_fmt, *compress, src, theirs)
    _compare(src, shape.fmt, ours, out_fmt)
    assert _layout(ours, out_fmt) == _layout(theirs, out_fmt)
    if out_fmt == "qcow2":
        assert qemu_img_check(ours).returncode == 0
    if compress:
        # Packed as qemu packs compressed clusters: the same file, give or take a cluster.
        assert os.path.getsize(ours) <= os.path.getsize(theirs) + 65536
    if out_fmt == "raw":
        assert 0 <= os.stat(theirs).st_blocks - os.stat(ours).st_blocks \
            <= RAW_FIRST_BLOCK // 512


@pytest.mark.parametrize("backing,how", [("qcow2", "-B"), ("raw", "-B"), ("raw", "-o")])
def test_backing_target_copies_only_the_top(tmp_path, backing, how):
    """-B, or -o backing_file=… (which qemu-img convert takes as -B)."""
    shape = next(s for s in SHAPES if s.backing == backing and not s.v2)
    src = shape.build(tmp_path)
    base = os.path.basename(src).replace(".qcow2", f"-base.{backing}")
    target_args = ["-B", base, "-F", backing] if how == "-B" else \
        ["-o", f"backing_file={base},backing_fmt={backing}"]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for tool, target in ((qnbd_ok, ours), (qemu_img, theirs)):
        tool("convert", "-O", "qcow2", *target_args, src, target)
    _compare(src, "qcow2", ours, "qcow2")
    assert _layout(ours, "qcow2") == _layout(theirs, "qcow2")
    assert qemu_img_check(ours).returncode == 0


@pytest.mark.parametrize("backing", ["qcow2", "raw"])
def test_compressed_target_over_a_backing_file(tmp_path, backing):
    """-c with -B: clusters the top holds in part are read whole (through the chain) and
    compressed, zero runs over the backing file become zero clusters, as qemu-img."""
    shape = next(s for s in SHAPES if s.backing == backing and not s.v2)
    src = shape.build(tmp_path)
    base = os.path.basename(src).replace(".qcow2", f"-base.{backing}")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for tool, target in ((qnbd_ok, ours), (qemu_img, theirs)):
        tool("convert", "-c", "-O", "qcow2", "-B", base, "-F", backing, src, target)
    _compare(src, "qcow2", ours, "qcow2")
    assert _layout(ours, "qcow2") == _layout(theirs, "qcow2")
    assert qemu_img_check(ours).returncode == 0


def test_compressed_runs_smaller_than_a_target_cluster(tmp_path):
    """4 KiB source clusters under a 64 KiB target cluster: a zero run, data and the
    backing file's data share one target cluster, which is written once, compressed."""
    base, src = tmp_path / "base.raw", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "raw", base, "1M")
    qemu_io(base, "raw", "write -P 0x11 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw",
             "-F", "raw", src, "1M")
    qemu_io(src, "qcow2", "write -z 0 4k", "write -P 1 4k 4k", "write -P 2 68k 4k",
            "write -z 72k 4k", "write -z 128k 64k")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for tool, target in ((qnbd_ok, ours), (qemu_img, theirs)):
        tool("convert", "-c", "-O", "qcow2", "-B", "base.raw", "-F", "raw", src, target)
    _compare(src, "qcow2", ours, "qcow2")
    assert _layout(ours, "qcow2") == _layout(theirs, "qcow2")
    check = json.loads(run("qemu-img", "check", "--output=json", ours).stdout)
    assert check["compressed-clusters"] == 2


def test_compressed_into_existing_targets(tmp_path):
    """-c -n: into an empty image (qemu-img's), and refused over allocated clusters
    (compression never overwrites) with a one-line error, the target still clean."""
    src = SHAPES[0].build(tmp_path)
    empty, full = tmp_path / "empty.qcow2", tmp_path / "full.qcow2"
    for target in (empty, full):
        qemu_img("create", "-q", "-f", "qcow2", target, "12M")
    qemu_io(full, "qcow2", "write -P 0x55 0 12M")
    qnbd_ok("convert", "-c", "-n", src, empty)
    _compare(src, "qcow2", empty, "qcow2")
    rc, _, err = qnbd("convert", "-c", "-n", src, full)
    assert rc == 1 and "already allocated" in err and err.count("\n") == 1
    assert qemu_img_check(full).returncode == 0


def test_into_existing_target(tmp_path):
    """-n: zero runs of the source must overwrite what the target held."""
    src = SHAPES[0].build(tmp_path)
    target = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", target, "12M")  # the source's size
    qemu_io(target, "qcow2", "write -P 0x55 0 12M")
    qnbd_ok("convert", "-n", src, target)  # the target's format is probed
    _compare(src, "qcow2", target, "qcow2")
    assert qemu_img_check(target).returncode == 0


def test_sparse_zero_writes_everything(tmp_path):
    src = tmp_path / "s.raw"
    qemu_img("create", "-q", "-f", "raw", src, "4M")
    qemu_io(src, "raw", "write -P 1 1M 64k")
    qnbd_ok("convert", "-S", "0", "-O", "raw", src, tmp_path / "o.raw")
    _compare(src, "raw", tmp_path / "o.raw", "raw")
    assert os.stat(tmp_path / "o.raw").st_blocks * 512 >= 4 * MiB


def test_compressed_short_last_cluster_and_zstd(tmp_path):
    src = tmp_path / "s.raw"
    qemu_img("create", "-q", "-f", "raw", src, str(3 * MiB + 5000))
    qemu_io(src, "raw", "write -P 7 0 1M", f"write -P 9 {3 * MiB} 5000")
    out = tmp_path / "o.qcow2"
    qnbd_ok("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, out)
    _compare(src, "raw", out, "qcow2")
    check = run("qemu-img", "check", "--output=json", out, check=False)
    assert check.returncode == 0 and json.loads(check.stdout)["compressed-clusters"] == 17


@pytest.mark.parametrize("args,message", [
    (["-c", "-O", "raw"], "Compression not supported"),
    (["-O", "vmdk"], "vmdk"),
    (["-S", "1000"], "512"),
])
def test_bad_options_one_line_error(tmp_path, args, message):
    src = tmp_path / "s.raw"
    qemu_img("create", "-q", "-f", "raw", src, "1M")
    rc, _, err = qnbd("convert", *args, src, tmp_path / "o")
    assert rc == 1 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_smaller_existing_target_is_refused_untouched(tmp_path):
    src, target = tmp_path / "s.raw", tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "raw", src, "2M")
    qemu_img("create", "-q", "-f", "qcow2", target, "1M")
    before = target.read_bytes()
    rc, _, err = qnbd("convert", "-n", src, target)
    assert rc == 1 and "smaller" in err and err.count("\n") == 1
    assert target.read_bytes() == before


def test_progress_on_a_terminal(tmp_path):
    src = tmp_path / "s.raw"
    qemu_img("create", "-q", "-f", "raw", src, "8M")
    rc, shown = qnbd_on_terminal("convert", "-p", "-O", "qcow2", src, tmp_path / "o.qcow2")
    assert rc == 0
    assert b"(100.00/100%)" in shown and b"(25.00/100%)" in shown


@pytest.mark.parametrize("extra", [[], ["-U"]])
def test_source_as_target_is_refused_untouched(tmp_path, extra):
    src = SHAPES[0].build(tmp_path)
    before = open(src, "rb").read()
    os.symlink(src, tmp_path / "alias.qcow2")
    rc, _, err = qnbd("convert", *extra, "-O", "qcow2", src, tmp_path / "alias.qcow2")
    assert rc == 1 and err.count("\n") == 1 and "both the source and the target" in err
    assert open(src, "rb").read() == before


def test_target_in_use_is_refused_untouched(qemu_holder, tmp_path):
    """A target is truncated only once its lock is ours (as qemu's raw_co_create)."""
    src = SHAPES[0].build(tmp_path)
    target = str(tmp_path / "busy.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", target, "1M")
    before = open(target, "rb").read()
    qemu_holder(target, tool="qemu-io")
    rc, _, err = qnbd("convert", "-O", "qcow2", src, target)
    assert rc == 1 and "in use" in err and err.count("\n") == 1
    assert open(target, "rb").read() == before


def _image_with_bitmaps(tmp_path):
    src = str(tmp_path / "bm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, "8M")
    qemu_img("bitmap", "--add", src, "a")
    qemu_img("bitmap", "--add", "-g", "512k", "--disable", src, "b")
    qemu_io(src, "qcow2", "write -P 1 64k 64k", "write -P 2 5M 3M")
    qemu_img("bitmap", "--enable", src, "b")
    qemu_io(src, "qcow2", "write -P 3 1M 4k")
    return src


def _bitmaps(image):
    data = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    return sorted(data["format-specific"]["data"].get("bitmaps", []),
                  key=lambda b: b["name"])


def test_bitmaps_copied_as_qemu_img(tmp_path):
    src = _image_with_bitmaps(tmp_path)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qnbd_ok("convert", "--bitmaps", "-O", "qcow2", src, ours)
    qemu_img("convert", "--bitmaps", "-O", "qcow2", src, theirs)
    assert _bitmaps(ours) == _bitmaps(theirs) and len(_bitmaps(ours)) == 2
    for name in ("a", "b"):
        assert qemu_dirty_map(ours, name) == qemu_dirty_map(theirs, name) != []
    assert qemu_img_check(ours).returncode == 0
    _compare(src, "qcow2", ours, "qcow2")


def test_inconsistent_bitmaps_refused_or_skipped(tmp_path):
    src = _image_with_bitmaps(tmp_path)
    leave_bitmaps_in_use(src)
    qemu_img("bitmap", "--remove", src, "a")
    qemu_img("bitmap", "--add", src, "c")
    out = tmp_path / "o.qcow2"
    rc, _, err = qnbd("convert", "--bitmaps", "-O", "qcow2", src, out)
    assert rc == 1 and "Cannot copy inconsistent bitmap 'b'" in err and err.count("\n") == 1
    assert not out.exists()
    rc, _, err = qnbd("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, out)
    assert rc == 0 and "Skipping inconsistent bitmap 'b'" in err
    assert [b["name"] for b in _bitmaps(out)] == ["c"]
    assert qemu_img_check(out).returncode == 0


@pytest.mark.parametrize("case,message", [
    ("raw-target", "Format driver 'raw' does not support bitmaps"),
    ("raw-source", "Source lacks bitmap support"),
    ("existing", "Bitmap already exists: a"),
])
def test_bitmap_copy_refusals(tmp_path, case, message):
    src = _image_with_bitmaps(tmp_path)
    out = tmp_path / "o.img"
    args = ["-O", "raw"] if case == "raw-target" else ["-O", "qcow2"]
    if case == "raw-source":
        src = tmp_path / "s.raw"
        qemu_img("create", "-q", "-f", "raw", src, "1M")
    if case == "existing":
        qemu_img("create", "-q", "-f", "qcow2", out, "8M")
        qemu_img("bitmap", "--add", out, "a")
        args = ["-n"]
    rc, _, err = qnbd("convert", "--bitmaps", *args, src, out)
    assert rc == 1 and message in err and err.count("\n") == 1
    if case == "existing":
        assert [b["name"] for b in _bitmaps(out)] == ["a"]


def test_compressed_into_a_data_file_image_is_refused(tmp_path):
    """qcow2.rst "External data file": no compressed clusters there."""
    src = SHAPES[0].build(tmp_path)
    target = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}",
             target, "12M")
    rc, _, err = qnbd("convert", "-c", "-n", src, target)
    assert rc == 1 and "not supported with external data files" in err
    assert qemu_img_check(target).returncode == 0


def test_from_qed_and_from_an_nbd_export(tmp_path):
    """Sources of other drivers: QED (its own layer status) and an NBD export served by
    qemu-nbd (block status only), as sparse as qemu-img makes them."""
    src = str(tmp_path / "q.qed")
    qemu_img("create", "-q", "-f", "qed", src, "8M")
    qemu_io(src, "qed", "write -P 2 64k 64k", "write -P 3 3M 1M", "write -z 3M 64k")
    sock = str(tmp_path / "s.sock")
    server = subprocess.Popen(["qemu-nbd", "-r", "-f", "qed", "-k", sock, "-t", src])
    try:
        wait_for_socket(sock, server)
        for name, source in (("qed", src), ("nbd", f"nbd+unix:///?socket={sock}")):
            ours, theirs = tmp_path / f"{name}-ours.qcow2", tmp_path / f"{name}-theirs.qcow2"
            qnbd_ok("convert", "-O", "qcow2", source, ours)
            qemu_img("convert", "-O", "qcow2", source, theirs)
            _compare(src, "qed", ours, "qcow2")
            assert _layout(ours, "qcow2") == _layout(theirs, "qcow2")
    finally:
        server.kill()
        server.wait()
