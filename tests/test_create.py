"""`qnbd create`: images qemu accepts (qemu-img check, qemu-io), options and sizes read as
qemu-img reads them, qemu-img's own layout where the shape allows, one-line errors."""

import os

import pytest

from cli_util import qemu_img_check, qemu_img_info, qnbd, qnbd_ok, qnbd_subprocess
from peers import run
from qnbd.units import parse_size

MiB = 1 << 20

# (size, -o options): every cluster size, every refcount width, both versions, lazy
# refcounts, zstd, sizes 0 / 1M / 1T, and big L1 tables whose refcount blocks need many
# clusters (512-byte clusters) or a multi-cluster refcount table.
SHAPES = [
    ("1M", "compat=0.10"),
    ("1M", ""),
    ("0", ""),
    ("0", "compat=0.10"),
    ("1T", ""),
    ("1M", "cluster_size=512"),
    ("1M", "cluster_size=4k"),
    ("1M", "cluster_size=2M"),
    ("1T", "cluster_size=4k,refcount_bits=1"),
    ("1M", "refcount_bits=2"),
    ("1G", "cluster_size=512,refcount_bits=4"),
    ("1M", "refcount_bits=8"),
    ("1M", "refcount_bits=32"),
    ("1M", "cluster_size=2M,refcount_bits=64"),
    ("100G", "cluster_size=512"),
    ("127G", "cluster_size=512,refcount_bits=64"),
    ("1M", "lazy_refcounts=on"),
    ("1M", "compression_type=zstd"),
    ("1P", "cluster_size=2M,refcount_bits=1"),
    ("1G", "extended_l2=on"),
    ("1M", "extended_l2=on,cluster_size=16k"),
]


def _options(opts):
    return ["-o", opts] if opts else []


def _assert_clean(path):
    p = qemu_img_check(path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No errors were found" in p.stdout


def _expect(opts: str) -> dict:
    o = dict(kv.split("=") for kv in opts.split(",") if kv)
    return {"cluster-size": parse_size(o.get("cluster_size", "64k")),
            "compat": o.get("compat", "1.1"),
            "refcount-bits": int(o.get("refcount_bits", 16)),
            "lazy": o.get("lazy_refcounts") == "on",
            "compression": o.get("compression_type", "zlib"),
            "extended-l2": o.get("extended_l2") == "on"}


@pytest.mark.parametrize("size,opts", SHAPES, ids=[f"{s}-{o or 'default'}" for s, o in SHAPES])
def test_created_image_is_valid_and_usable(tmp_path, size, opts):
    img = tmp_path / "t.qcow2"
    qnbd_ok("create", "-q", "-f", "qcow2", *_options(opts), img, size)
    _assert_clean(img)
    info = qemu_img_info(img)
    want = _expect(opts)
    assert info["virtual-size"] == parse_size(size)
    assert info["cluster-size"] == want["cluster-size"]
    data = info["format-specific"]["data"]
    assert data["compat"] == want["compat"]
    assert data["refcount-bits"] == want["refcount-bits"]
    assert data["compression-type"] == want["compression"]
    assert data.get("lazy-refcounts", False) == want["lazy"]
    assert data.get("extended-l2", False) == want["extended-l2"]
    if parse_size(size) >= MiB:
        p = run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M",
                "-c", "read -P 0xab 0 1M", img, check=False)
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout
        _assert_clean(img)


# Shapes where qemu-img's layout is header, refcount table, one refcount block, L1: the
# file must be byte-for-byte what qemu-img writes.
SAME_AS_QEMU = [
    ("1G", ""), ("0", ""), ("1M", "compat=0.10"), ("10G", "lazy_refcounts=on"),
    ("10G", "compression_type=zstd"), ("1T", "cluster_size=4k,refcount_bits=1"),
    ("1P", "cluster_size=2M,refcount_bits=64"), ("1000", ""),
    ("3M", "cluster_size=512,refcount_bits=8"),
    ("10G", "extended_l2=on"), ("1G", "extended_l2=on,cluster_size=16k"),
]


@pytest.mark.parametrize("size,opts", SAME_AS_QEMU,
                         ids=[f"{s}-{o or 'default'}" for s, o in SAME_AS_QEMU])
def test_byte_identical_to_qemu_img(tmp_path, size, opts):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qnbd_ok("create", "-q", "-f", "qcow2", *_options(opts), ours, size)
    p = run("qemu-img", "create", "-q", "-f", "qcow2", *_options(opts), theirs, size, check=False)
    assert p.returncode == 0, p.stderr
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("backing_fmt", ["qcow2", "raw"])
def test_backing_file(tmp_path, backing_fmt):
    base = tmp_path / f"base.{backing_fmt}"
    assert run("qemu-img", "create", "-q", "-f", backing_fmt, base, "3M", check=False).returncode == 0
    assert run("qemu-io", "-f", backing_fmt, "-c", "write -P 0x5a 0 3M", base, check=False).returncode == 0
    sub = tmp_path / "sub"
    sub.mkdir()
    top = sub / "top.qcow2"
    # No size: the backing file's; the name is stored as given, relative to top's dir.
    qnbd_ok("create", "-q", "-f", "qcow2", "-b", f"../{base.name}", "-F", backing_fmt, top)
    _assert_clean(top)
    info = qemu_img_info(top)
    assert info["virtual-size"] == 3 * MiB
    assert info["backing-filename"] == f"../{base.name}"
    assert info["backing-filename-format"] == backing_fmt
    p = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 3M", "-c", "write -P 0xab 1M 1M",
            "-c", "read -P 0xab 1M 1M", "-c", "read -P 0x5a 2M 1M", top, check=False)
    assert p.returncode == 0 and "verification failed" not in p.stdout, p.stdout
    _assert_clean(top)


def test_backing_via_o_options_and_explicit_size(tmp_path):
    base = tmp_path / "base.qcow2"
    qnbd_ok("create", "-q", "-f", "qcow2", base, "1M")
    top = tmp_path / "top.qcow2"
    qnbd_ok("create", "-q", "-f", "qcow2", "-o",
            f"backing_file={base},backing_fmt=qcow2,compat=0.10", top, "5M")
    info = qemu_img_info(top)
    assert (info["virtual-size"], info["backing-filename"]) == (5 * MiB, str(base))
    assert info["format-specific"]["data"]["compat"] == "0.10"
    _assert_clean(top)


def test_overwrites_existing_file(tmp_path):
    img = tmp_path / "t.qcow2"
    img.write_bytes(b"x" * (3 * MiB))
    qnbd_ok("create", "-q", "-f", "qcow2", img, "1M")
    _assert_clean(img)


def test_raw_is_sparse_and_rounded_like_qemu(tmp_path):
    img = tmp_path / "t.raw"
    out = qnbd_ok("create", "-f", "raw", img, "1000")
    assert "Formatting" in out
    assert os.path.getsize(img) == 1024  # qemu-img rounds up to 512-byte sectors
    qnbd_ok("create", "-f", "raw", img, "1G")
    st = os.stat(img)
    assert st.st_size == 1 << 30 and st.st_blocks == 0
    assert qemu_img_info(img)["virtual-size"] == 1 << 30


SIZES = ["1m", "1g", "1t", "1b", "1B", "0x10", "0X20", "1.5k", "1.k", "1.", ".5k", "1.0",
         "0.5", "12.345M", "1e3", " 12", "12 ", "1kb", "8E", "1.5", "00x10",
         "010", "+5", "", "0x", "1.2.3", "18446744073709551616", "9223372036854775808",
         "1.5b", "0.0001k", "0x1e", "1x", "-5", ".", ".k", ".5", "+.5k", " .5k"]


def _older_qemu_refusal(text: str) -> bool:
    """qnbd parses sizes as current qemu does; older qemu-img (7.2) also refused a fraction
    without a whole part (".5k"). That is the one refusal qnbd may not share."""
    return text.lstrip(" +").startswith(".")


def test_sizes_parse_as_qemu_img_parses_them(tmp_path):
    """qemu-img create -f raw writes a file of the parsed size rounded up to 512 bytes."""
    for text in SIZES:
        path = tmp_path / "q.raw"
        p = run("qemu-img", "create", "-q", "-f", "raw", path, "--", text, check=False)
        try:
            ours = parse_size(text)
        except ValueError:
            ours = None
        if p.returncode:
            assert ours is None or _older_qemu_refusal(text), (text, ours, p.stderr)
        else:
            assert ours is not None, (text, p.stderr)
            assert -(-ours // 512) * 512 == os.path.getsize(path), text
        if path.exists():
            path.unlink()


@pytest.mark.parametrize("args,message", [
    (["-f", "qcow2", "x", "12X"], "Invalid image size specified"),
    (["-f", "qcow2", "x", "8E"], "Must be between 0 and 9223372036854775807"),
    (["-f", "qcow2", "-o", "foo=bar", "x", "1M"], "Invalid parameter 'foo'"),
    (["-f", "raw", "-o", "cluster_size=4k", "x", "1M"], "Invalid parameter 'cluster_size'"),
    (["-f", "qcow2", "-o", "refcount_bits=3", "x", "1M"], "Refcount width must be"),
    (["-f", "qcow2", "-o", "refcount_bits=x", "x", "1M"], "expects a number"),
    (["-f", "qcow2", "-o", "cluster_size=1000", "x", "1M"], "Cluster size must be"),
    (["-f", "qcow2", "-o", "cluster_size=4M", "x", "1M"], "Cluster size must be"),
    (["-f", "qcow2", "-o", "compat=2", "x", "1M"], "Invalid compat version '2'"),
    (["-f", "qcow2", "-o", "compat=0.10,refcount_bits=8", "x", "1M"], "refcount widths"),
    (["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "x", "1M"], "Lazy refcounts"),
    (["-f", "qcow2", "-o", "compat=0.10,compression_type=zstd", "x", "1M"], "Non-zlib"),
    (["-f", "qcow2", "-o", "compression_type=lz4", "x", "1M"], "compression type 'lz4'"),
    (["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x", "1M"], "expects 'on' or 'off'"),
    (["-f", "qcow2", "-o", "extended_l2=on,cluster_size=8k", "x", "1M"],
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    (["-f", "qcow2", "-o", "extended_l2=on,compat=0.10", "x", "1M"],
     "Extended L2 entries are only supported with compatibility level 1.1"),
    (["-f", "qcow2", "-o", "cluster_size=512", "x", "1T"], "too large for file format"),
    (["-f", "qcow2", "x"], "needs a size parameter"),
    (["-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2", "x"], "Could not open backing image"),
    (["-f", "qcow2", "-b", "nope.qcow2", "x", "1M"], "without backing format"),
    (["-f", "qcow2", "-F", "raw", "x", "1M"], "cannot be used without backing file"),
    (["-f", "raw", "-b", "b", "x", "1M"], "Backing file not supported"),
    (["-f", "vmdk", "x", "1M"], "Unknown file format 'vmdk'"),
    (["-f", "qcow2", "nodir/x", "1M"], "Could not create"),
])
def test_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    if message in _SUBPROCESS:
        p = qnbd_subprocess("create", *args, cwd=tmp_path)
        rc, err = p.returncode, p.stderr
    else:
        rc, _out, err = qnbd("create", *args)
    assert rc == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# A few of the error cases also run as a separate process: exit status and no traceback
# as a user sees them.
_SUBPROCESS = {"Invalid image size specified", "Invalid parameter 'foo'",
               "Could not open backing image"}


def test_backing_format_mismatch_refused(tmp_path):
    base = tmp_path / "base.raw"
    qnbd_ok("create", "-q", "-f", "raw", base, "1M")
    rc, _out, err = qnbd("create", "-f", "qcow2", "-b", base, "-F", "qcow2",
                         tmp_path / "t.qcow2")
    assert rc == 1 and "Could not open backing image" in err
