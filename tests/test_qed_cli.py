"""`qnbd info|create|check|serve` on QED images, against qemu-img, qemu-io and libnbd:
same JSON and text, same bytes, same counts and exit codes; served images read as
qemu reads them and stay clean after writes; QEMU's locks keep writers apart both ways."""

import json
import os
import shutil
import subprocess
import time

import nbd
import pytest

from qnbd.formats import open_image
from qnbd.lock import ImageInUse

from cli_util import qemu_img_info, qemu_img_info_text, qnbd, qnbd_ok, qnbd_subprocess
from images import MiB
from peers import qemu_img, qemu_io, run
from qedimages import SHAPES
from workload import converted


def _qemu_img(*args, cwd=None):
    return run("qemu-img", *args, cwd=cwd).stdout


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_info_matches_qemu_img(shape, tmp_path, monkeypatch):
    image = os.path.basename(shape.build(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / image).read_bytes()
    assert json.loads(qnbd_ok("info", "--output=json", image)) == qemu_img_info(image)
    assert qnbd_ok("info", image) == qemu_img_info_text(image)
    assert (json.loads(qnbd_ok("info", "--output=json", "--backing-chain", image))
            == qemu_img_info(image, "--backing-chain"))
    assert (tmp_path / image).read_bytes() == before


def test_info_of_need_check_image_matches_qemu_img(tmp_path, monkeypatch):
    """NEED_CHECK is not qemu's dirty flag (qed.c leaves is_dirty unset); info reads
    the header only and repairs nothing."""
    image = os.path.basename(SHAPES[0].build(tmp_path))
    monkeypatch.chdir(tmp_path)
    _poke(image, 16, 2)
    ours = json.loads(qnbd_ok("info", "--output=json", image))
    assert ours == qemu_img_info(image) and ours["dirty-flag"] is False
    assert open(image, "rb").read()[16] == 2


CREATE_CASES = [
    [],
    ["-o", "cluster_size=4096,table_size=2"],
    ["-o", "cluster_size=1M,table_size=16"],
    ["-b", "base.raw", "-F", "raw"],
    ["-o", "backing_file=base.qcow2,backing_fmt=qcow2,table_size=8"],
]


@pytest.mark.parametrize("options", CREATE_CASES, ids=lambda o: " ".join(o) or "default")
def test_create_like_qemu_img(options, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _qemu_img("create", "-q", "-f", "raw", "base.raw", "1M")
    _qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    ours = qnbd_ok("create", "-f", "qed", *options, "a.qed", "3000")
    theirs = _qemu_img("create", "-f", "qed", *options, "b.qed", "3000")
    assert ours.replace("a.qed", "b.qed") == theirs.replace("size=3072", "size=3000")
    assert (tmp_path / "a.qed").read_bytes() == (tmp_path / "b.qed").read_bytes()
    assert run("qemu-img", "check", "a.qed").returncode == 0
    out = qemu_io("a.qed", "qed", "write -P 9 0 3k", "read -P 9 0 3k").stdout
    assert "read 3072/3072" in out


@pytest.mark.parametrize("options,message", [
    (["-o", "cluster_size=1000"], "QED cluster size must be within range"),
    (["-o", "table_size=3"], "QED table size must be within range"),
    (["-o", "cluster_size=64M"], "less than 0 bytes"),  # qemu's 64-bit limit wraps
    (["-b", "missing.raw", "-F", "raw"], "Could not open backing image"),
    (["-b", "base.raw"], "Backing file specified without backing format"),
    (["-o", "backing_fmt=raw"], "Backing format cannot be used without backing file"),
])
def test_create_errors(options, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _qemu_img("create", "-q", "-f", "raw", "base.raw", "1M")
    rc, out, err = qnbd("create", "-f", "qed", *options, "a.qed", "1M")
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err


def _small(tmp_path):
    """4 KiB clusters, 2-cluster tables: header 0-4k, L1 4k-12k; qemu then appends the
    data of a write before the L2 table that maps it."""
    image = str(tmp_path / "s.qed")
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", image, "4M")
    qemu_io(image, "qed", "write -P 1 0 8k", f"write -P 2 {2 * MiB} 4k")
    return image


def _poke(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "little"))


def _peek(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "little")


def _l2_entry(image, i):
    return _peek(image, 4096) + 8 * i


def _damage(tmp_path, kind):
    image = _small(tmp_path)
    if kind == "leaks":
        with open(image, "ab") as f:
            f.write(bytes(3 * 4096))
    elif kind == "past-eof":
        _poke(image, _l2_entry(image, 1), 1 << 30)
    elif kind == "twice":
        _poke(image, _l2_entry(image, 5), _peek(image, _l2_entry(image, 0)))
    elif kind == "l1-past-eof":
        _poke(image, 4096 + 8, 1 << 30)
    elif kind == "unaligned":
        _poke(image, _l2_entry(image, 1), _peek(image, _l2_entry(image, 1)) + 8)
    return image


@pytest.mark.parametrize("kind", ["clean", "leaks", "past-eof", "twice", "l1-past-eof",
                                  "unaligned"])
@pytest.mark.parametrize("output", ["human", "json"])
def test_check_matches_qemu_img(kind, output, tmp_path):
    image = _damage(tmp_path, kind)
    theirs = run("qemu-img", "check", "-f", "qed", f"--output={output}", image, check=False)
    rc, out, err = qnbd("check", "-f", "qed", f"--output={output}", image)
    assert (rc, out) == (theirs.returncode, theirs.stdout), err
    assert rc == {"clean": 0, "leaks": 3}.get(kind, 2)


@pytest.mark.parametrize("kind", ["past-eof", "l1-past-eof", "unaligned"])
def test_check_repair_matches_qemu_img(kind, tmp_path):
    image = _damage(tmp_path, kind)
    copy = str(tmp_path / "copy.qed")
    shutil.copyfile(image, copy)
    theirs = run("qemu-img", "check", "-r", "all", copy, check=False)
    rc, out, err = qnbd("check", "-r", "all", image)
    assert (rc, out) == (theirs.returncode, theirs.stdout), err
    assert rc == (0 if kind == "l1-past-eof" else 3)  # the cluster it named is leaked
    assert "1 corruptions" in out
    assert open(image, "rb").read() == open(copy, "rb").read()


def test_check_repair_cuts_leaked_tail(tmp_path):
    """Unlike qemu (which leaves QED leaks), leaked clusters at the end of the file are
    cut off: what a crash during append-only allocation leaves is then clean."""
    image = _damage(tmp_path, "leaks")
    rc, out, err = qnbd("check", "-r", "leaks", image)
    assert rc == 0, out + err
    assert "3 leaked clusters\n    0 corruptions" in out and "No errors were found" in out
    assert run("qemu-img", "check", image).returncode == 0
    assert os.path.getsize(image) == 12288 + 5 * 4096  # data 3 clusters, L2 2


def test_check_unfixable_keeps_need_check(tmp_path):
    image = _damage(tmp_path, "twice")
    _poke(image, 16, 2)  # NEED_CHECK
    rc, out, _ = qnbd("check", "-r", "all", image)
    assert rc == 2 and "1 errors were found" in out
    assert open(image, "rb").read()[16] == 2  # not repaired: NEED_CHECK stays


def test_serve_reads_writes_and_leaves_clean(tmp_path, serve):
    shape = SHAPES[2]  # raw backing
    image = shape.build(tmp_path)
    expected = bytearray(converted(image, "qed", tmp_path))
    server = serve(image)  # probed as qed
    h = nbd.NBD()
    h.connect_uri(server.uri)
    try:
        assert h.get_size() == len(expected)
        assert h.pread(len(expected), 0) == bytes(expected)
        for i in range(12):
            off = i * 1000003 % (len(expected) - 70000)
            h.pwrite(bytes([i + 1]) * 70000, off)
            expected[off:off + 70000] = bytes([i + 1]) * 70000
        h.zero(3 * MiB, MiB)  # count, offset
        expected[MiB:4 * MiB] = bytes(3 * MiB)
        h.flush()
        assert h.pread(len(expected), 0) == bytes(expected)
        # qemu refuses to open an image qnbd serves read-write (QEMU's lock bytes).
        r = run("qemu-io", "-f", "qed", "-c", "read 0 512", image, check=False)
        assert r.returncode != 0 and "lock" in r.stderr
    finally:
        h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    assert run("qemu-img", "check", image).returncode == 0
    assert converted(image, "qed", tmp_path) == bytes(expected)


def test_serve_format_option_and_nbdinfo(tmp_path, serve):
    image = SHAPES[0].build(tmp_path)
    server = serve(image, "-f", "qed", "-r")
    out = run("nbdinfo", "--map", server.uri).stdout
    assert "data" in out and "hole,zero" in out
    r = qnbd_subprocess("serve", "-f", "qcow2", "-k", str(tmp_path / "x.sock"), image)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def _hold_with_qemu_io(path, read_only):
    """qemu-io keeps the image open (and locked) while its stdin does."""
    p = subprocess.Popen(["qemu-io", "-f", "qed", *(["-r"] if read_only else []), path],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ino = os.stat(path).st_ino
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any(f":{ino} " in line and "OFDLCK" in line for line in f):
                return p
        time.sleep(0.02)
    p.kill()
    raise AssertionError("qemu-io took no lock")


@pytest.mark.parametrize("qemu_writes", [True, False], ids=["qemu-writer", "qemu-reader"])
def test_qemu_locks(tmp_path, qemu_writes):
    image = SHAPES[0].build(tmp_path)
    holder = _hold_with_qemu_io(image, read_only=not qemu_writes)
    try:
        with pytest.raises(ImageInUse):
            open_image(image, "qed", read_only=False)
        if qemu_writes:
            with pytest.raises(ImageInUse):
                open_image(image, "qed", read_only=True)
        else:
            open_image(image, "qed", read_only=True).close()  # readers share
        open_image(image, "qed", read_only=True, force_share=True).close()
    finally:
        holder.kill()
        holder.wait()
