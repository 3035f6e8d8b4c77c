"""`qnbd info` against `qemu-img info` on images qemu-img made: same JSON, same text."""

import hashlib
import json
import struct

import pytest

from cli_util import qemu_img_info, qemu_img_info_text, qnbd, qnbd_ok, qnbd_subprocess
from peers import run


def _qemu_img(*args, cwd=None):
    p = run("qemu-img", *args, cwd=cwd, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _set_incompatible_bits(path, bits):
    with open(path, "r+b") as f:  # qcow2.rst "Header": incompatible_features, byte 72
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", value | bits))


def _make(tmp_path, name):
    """Build image `name` in tmp_path with qemu-img; returns its path relative to it."""
    q = lambda *a: _qemu_img(*a, cwd=tmp_path)  # noqa: E731
    if name == "raw":
        q("create", "-q", "-f", "raw", "d.raw", "3000")
        return "d.raw"
    if name == "chain":
        q("create", "-q", "-f", "raw", "base.raw", "2M")
        q("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2")
        (tmp_path / "sub").mkdir()
        q("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "../mid.qcow2", "-F",
          "qcow2", "sub/top.qcow2", "4M")
        return "sub/top.qcow2"
    if name == "bitmaps":
        q("create", "-q", "-f", "qcow2", "b.qcow2", "64M")
        q("bitmap", "--add", "b.qcow2", "b1")
        q("bitmap", "--add", "-g", "512k", "--disable", "b.qcow2", "b2")
        return "b.qcow2"
    if name == "dirty":
        q("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "d.qcow2", "1M")
        _set_incompatible_bits(tmp_path / "d.qcow2", 1)  # dirty bit
        return "d.qcow2"
    opts = {"v3": "", "v2": "compat=0.10", "lazy": "lazy_refcounts=on",
            "zstd": "compression_type=zstd", "small": "cluster_size=512,refcount_bits=1",
            "big": "cluster_size=2M,refcount_bits=64",
            "extl2": "extended_l2=on,cluster_size=16k"}[name]
    q("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), "i.qcow2", "1G")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 300k", tmp_path / "i.qcow2", check=False)
    return "i.qcow2"


NAMES = ["v3", "v2", "lazy", "zstd", "small", "big", "extl2", "raw", "bitmaps", "dirty",
         "chain"]


@pytest.mark.parametrize("name", NAMES)
def test_json_and_text_match_qemu_img(tmp_path, monkeypatch, name):
    image = _make(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    before = hashlib.sha256((tmp_path / image).read_bytes()).digest()
    ours = json.loads(qnbd_ok("info", "--output=json", image))
    assert ours == qemu_img_info(image, "-U", cwd=tmp_path)
    assert qnbd_ok("info", image) == qemu_img_info_text(image, "-U", cwd=tmp_path)
    assert hashlib.sha256((tmp_path / image).read_bytes()).digest() == before


def test_backing_chain_matches_qemu_img(tmp_path, monkeypatch):
    image = _make(tmp_path, "chain")
    monkeypatch.chdir(tmp_path)
    ours = json.loads(qnbd_ok("info", "--output=json", "--backing-chain", image))
    assert [i["filename"] for i in ours] == ["sub/top.qcow2", "sub/../mid.qcow2",
                                             "sub/../base.raw"]
    assert ours == qemu_img_info(image, "--backing-chain", cwd=tmp_path)
    assert (qnbd_ok("info", "--backing-chain", image)
            == qemu_img_info_text(image, "--backing-chain", cwd=tmp_path))


def test_bitmaps_listed_in_directory_order(tmp_path, monkeypatch):
    image = _make(tmp_path, "bitmaps")
    monkeypatch.chdir(tmp_path)
    ours = json.loads(qnbd_ok("info", "--output=json", image))
    bitmaps = ours["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"], b["granularity"]) for b in bitmaps] == [
        ("b1", ["auto"], 65536), ("b2", [], 524288)]


def test_force_format(tmp_path):
    img = tmp_path / "i.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    raw = json.loads(qnbd_ok("info", "--output=json", "-f", "raw", img))
    # qemu counts whole sectors: the 196616-byte file is 197120 bytes of raw image.
    assert raw["format"] == "raw"
    assert raw["virtual-size"] == qemu_img_info(img, "-f", "raw")["virtual-size"]


def _broken(tmp_path, kind):
    path = tmp_path / "broken.qcow2"
    if kind == "missing":
        return path
    # Extended L2 entries need 16 KiB clusters (qcow2.rst, cluster_bits): 4 KiB ones.
    _qemu_img("create", "-q", "-f", "qcow2",
              *(["-o", "cluster_size=4k"] if kind == "extl2" else []), path, "1M")
    data = bytearray(path.read_bytes())
    if kind == "version":
        data[4:8] = struct.pack(">I", 7)
    elif kind == "truncated":
        data = data[:40]
    elif kind == "l1 past eof":
        data[40:48] = struct.pack(">Q", 1 << 40)
    elif kind == "extl2":
        data[72:80] = struct.pack(">Q", 1 << 4)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "Could not open"),
    ("version", "unsupported qcow2 version 7"),
    ("truncated", "too short"),
    ("l1 past eof", "past the end of the file"),
    ("extl2", "extended L2 entries need clusters of at least 16384 bytes"),
])
def test_broken_image_one_line_error(tmp_path, kind, message):
    path = _broken(tmp_path, kind)
    before = path.read_bytes() if path.exists() else None
    rc, _out, err = qnbd("info", path)
    assert rc == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if before is not None:
        assert path.read_bytes() == before


def test_not_qcow2_with_forced_format_as_a_process(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    p = qnbd_subprocess("info", "-f", "qcow2", raw)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == "qnbd info: not a qcow2 image (bad magic)"
