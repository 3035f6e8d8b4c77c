"""`qnbd map` against `qemu-img map`, run side by side on images qemu-img made: the same
extents, JSON and text, down backing chains of qcow2 and raw files."""

import json

import pytest

from cli_util import qnbd
from images import RAW, SHAPES
from peers import qemu_img, qemu_io, run

MiB = 1 << 20


def _both(*args):
    """(qemu-img map, qnbd map) results for the same arguments, in the same directory."""
    return run("qemu-img", "map", *args, check=False), qnbd("map", *args)


def _assert_same(*args):
    theirs, (rc, out, err) = _both(*args)
    assert theirs.returncode == 0, theirs.stderr
    assert rc == 0, err
    assert out == theirs.stdout
    return out


# Compressed runs cannot be shown in text: test_compressed_human_fails_as_qemu_img.
MATRIX = [(shape, output) for shape in SHAPES + [RAW] for output in ("json", "human")
          if not (shape.compress and output == "human")]


@pytest.mark.parametrize("shape,output", MATRIX, ids=lambda v: getattr(v, "name", v))
def test_matrix_matches_qemu_img(tmp_path, shape, output):
    image = shape.build(tmp_path)
    _assert_same(f"--output={output}", image)


def test_zero_clusters_keeping_their_allocation(tmp_path):
    """A zero write without unmap on allocated clusters (v3) keeps the host clusters:
    zero runs with an offset, shown in JSON and merged away in text."""
    image = str(tmp_path / "z.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, "qcow2", "write -P 7 0 4M", "write -z 1M 1M", "write -z -u 3M 64k",
            "discard 2M 128k")
    out = _assert_same("--output=json", image)
    assert any(e["zero"] and not e["data"] and "offset" in e for e in json.loads(out))
    _assert_same(image)


def test_three_level_chain_with_relative_names(tmp_path, monkeypatch):
    """Depth and file names down a chain named relative to each image's directory (the
    text layout shows the file each run lies in)."""
    (tmp_path / "sub").mkdir()
    qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "6M")
    qemu_io(tmp_path / "base.raw", "raw", "write -P 1 0 3M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             tmp_path / "mid.qcow2", "8M")
    qemu_io(tmp_path / "mid.qcow2", "qcow2", "write -P 2 1M 1M", "write -z 2M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "../mid.qcow2",
             "-F", "qcow2", tmp_path / "sub/top.qcow2", "10M")
    qemu_io(tmp_path / "sub/top.qcow2", "qcow2", "write -P 3 1536k 64k", "write -P 4 9M 4k")
    monkeypatch.chdir(tmp_path)
    _assert_same("--output=json", "sub/top.qcow2")
    out = _assert_same("--output=human", "sub/top.qcow2")
    assert "base.raw" in out and "mid.qcow2" in out and "top.qcow2" in out


@pytest.mark.parametrize("window", [("-s", "1M"), ("-l", "3M"), ("-s", "100k", "-l", "2M"),
                                    ("-s", "20M")])
def test_start_offset_and_max_length(tmp_path, window):
    image = SHAPES[0].build(tmp_path)
    _assert_same("--output=json", *window, image)


def test_compressed_human_fails_as_qemu_img(tmp_path):
    image = next(s for s in SHAPES if s.compress == "zlib").build(tmp_path)
    theirs, (rc, out, err) = _both(image)
    assert theirs.returncode == rc == 1
    assert err.strip().endswith(theirs.stderr.strip().split(": ", 1)[1])
    assert out == theirs.stdout


def test_bad_input_one_line_error(tmp_path):
    junk = tmp_path / "missing.qcow2"
    rc, out, err = qnbd("map", junk)
    assert rc == 1 and err.count("\n") == 1 and "missing.qcow2" in err


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_external_data_file(tmp_path, monkeypatch, raw):
    """Runs lie in the data file, at their guest offset (0 included)."""
    monkeypatch.chdir(tmp_path)
    opts = "data_file=d.raw" + (",data_file_raw=on" if raw else "")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "4M")
    qemu_io("x.qcow2", "qcow2", "write -P 1 0 64k", "write -P 2 1M 128k", "write -z 2M 64k",
            "discard 1M 64k")
    for output in ("json", "human"):
        out = _assert_same(f"--output={output}", "x.qcow2")
    assert "d.raw" in out


def test_qed_over_a_raw_backing_file(tmp_path, monkeypatch):
    """The QED engine answers for its layer too (qemu's bdrv_qed_co_block_status)."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "raw", "b.raw", "3M")
    qemu_io("b.raw", "raw", "write -P 1 0 3M")
    qemu_img("create", "-q", "-f", "qed", "-b", "b.raw", "-F", "raw", "q.qed", "4M")
    qemu_io("q.qed", "qed", "write -P 2 64k 64k", "write -z 1M 128k", "write -P 3 3M 4k")
    _assert_same("--output=json", "q.qed")
    assert "b.raw" in _assert_same("--output=human", "q.qed")
