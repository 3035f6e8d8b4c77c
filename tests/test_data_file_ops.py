"""External data files (docs/DESIGN.md rule 13) beside qemu-img: data_file_raw images
are created with their metadata preallocated (every cluster mapped to the same offset
of the data file, so an existing raw file can be wrapped), resized with their data file,
and refuse compressed writes in one line."""

import json
import os

import nbd
import pytest

from cli_util import qnbd, qnbd_ok
from peers import run

KiB = 1024


def _map(image) -> list[dict]:
    """qemu-img map of an image, without "zero": for a data file cluster, that is the
    file system's answer about the data file (qemu allocates a few blocks of a new data
    file, qnbd leaves it sparse; both read as zeros)."""
    out = run("qemu-img", "map", "--output=json", os.path.basename(image),
              cwd=os.path.dirname(image)).stdout
    merged: list[dict] = []
    for e in json.loads(out):
        e.pop("zero")
        last = merged[-1] if merged else None
        if last and {k: v for k, v in last.items() if k not in ("start", "length", "offset")} \
                == {k: v for k, v in e.items() if k not in ("start", "length", "offset")} \
                and ("offset" not in e or e["offset"] == last["offset"] + last["length"]):
            last["length"] += e["length"]
        else:
            merged.append(e)
    return merged


def _check(image) -> None:
    """qemu-img check clean, run beside the image (qemu opens a relative data file name
    from its working directory)."""
    r = run("qemu-img", "check", os.path.basename(image), cwd=os.path.dirname(image),
            check=False)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def _both_create(tmp_path, options: str, size: str):
    """The same qcow2 created by qnbd (mine) and by qemu-img (theirs), each with its
    data file beside it."""
    paths = []
    for who in ("mine", "theirs"):
        opts = options.format(data=f"{who}.data")
        image = str(tmp_path / f"{who}.qcow2")
        if who == "mine":
            qnbd_ok("create", "-q", "-f", "qcow2", "-o", opts, image, size)
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, f"{who}.qcow2",
                size, cwd=tmp_path)
        paths.append(image)
    return paths


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
@pytest.mark.parametrize("size", ["1M", "1000k"])
def test_data_file_raw_create_maps_every_cluster_as_qemu(tmp_path, cluster_size, size):
    mine, theirs = _both_create(
        tmp_path, f"data_file={{data}},data_file_raw=on,cluster_size={cluster_size}", size)
    assert _map(mine) == _map(theirs)
    assert all(e["data"] and e["offset"] == e["start"] for e in _map(mine))
    assert os.path.getsize(tmp_path / "mine.data") == os.path.getsize(tmp_path / "theirs.data")
    _check(mine)
    # What is written through qemu lands in the data file, where the guest sees it.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 5 4096 8192", "mine.qcow2", cwd=tmp_path)
    with open(tmp_path / "mine.data", "rb") as f:
        assert f.read(16384)[4096:12288] == b"\5" * 8192
    _check(mine)


def test_extended_l2_data_file_raw_as_qemu(tmp_path):
    """With extended L2 entries qemu preallocates the clusters but leaves their
    subclusters unallocated (reading as zeros): created and grown alike."""
    mine, theirs = _both_create(
        tmp_path, "data_file={data},data_file_raw=on,extended_l2=on,cluster_size=16384",
        "1000k")
    for step in ("1000k", "3M"):
        if step != "1000k":
            qnbd_ok("resize", "-q", mine, step)
            run("qemu-img", "resize", "-q", "theirs.qcow2", step, cwd=tmp_path)
        assert _map(mine) == _map(theirs), step
        assert os.path.getsize(tmp_path / "mine.data") == \
            os.path.getsize(tmp_path / "theirs.data"), step
        _check(mine)
    rc, _, err = qnbd("create", "-f", "qcow2", "-o", "data_file=mine.data,data_file_raw=on,"
                      "keep_data_file=on,extended_l2=on", str(tmp_path / "w.qcow2"), "1M")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "extended_l2" in err


def test_keep_data_file_wraps_an_existing_raw_file(tmp_path, serve):
    """keep_data_file=on (qemu 10.1's option): the raw file keeps its bytes and the new
    qcow2 image shows them, through qnbd serve and through qemu."""
    raw = tmp_path / "disk.raw"
    content = os.urandom(600 * KiB) + bytes(400 * KiB)
    raw.write_bytes(content)
    image = str(tmp_path / "wrap.qcow2")
    qnbd_ok("create", "-q", "-f", "qcow2", "-o",
            "data_file=disk.raw,data_file_raw=on,keep_data_file=on,cluster_size=4096",
            image, str(len(content)))
    assert raw.read_bytes() == content
    _check(image)
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", "wrap.qcow2", "disk.raw",
            cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    server = serve(image, "-r")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    try:
        assert h.pread(len(content), 0) == content
    finally:
        h.shutdown()


@pytest.mark.parametrize("options,message", [
    ("data_file=disk.raw,keep_data_file=on", "requires 'preallocation=metadata' or "
     "'data_file_raw=on'"),
    ("keep_data_file=on", "Must not use 'keep_data_file=on' without 'data_file'")])
def test_keep_data_file_refusals(tmp_path, options, message):
    (tmp_path / "disk.raw").write_bytes(b"\1" * 4096)
    rc, _, err = qnbd("create", "-f", "qcow2", "-o", options, str(tmp_path / "w.qcow2"),
                      "1M")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and message in err
    assert (tmp_path / "disk.raw").read_bytes() == b"\1" * 4096


@pytest.mark.parametrize("raw", ["off", "on"])
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_resize_resizes_the_data_file_as_qemu(tmp_path, raw, cluster_size):
    mine, theirs = _both_create(
        tmp_path, f"data_file={{data}},data_file_raw={raw},cluster_size={cluster_size}",
        "1000k")
    for image in (mine, theirs):
        run("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 300k", os.path.basename(image),
            cwd=tmp_path)
    steps = [("1500k",), ("3M",)] + ([] if raw == "on" else [("--shrink", "2M")])
    for step in steps:
        qnbd_ok("resize", *step[:-1], mine, step[-1])
        run("qemu-img", "resize", "-q", *step[:-1], "theirs.qcow2", step[-1], cwd=tmp_path)
        assert os.path.getsize(tmp_path / "mine.data") == \
            os.path.getsize(tmp_path / "theirs.data"), step
        assert _map(mine) == _map(theirs), step
        _check(mine)
        r = run("qemu-img", "compare", "mine.qcow2", "theirs.qcow2", cwd=tmp_path,
                check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_compressed_writes_refused_in_one_line(tmp_path):
    """qcow2.rst, "External data file": no compressed clusters; qemu-img convert -c
    fails too."""
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(256 * KiB))
    theirs = run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 "data_file=t.data", "src.raw", "t.qcow2", cwd=tmp_path, check=False)
    rc, _, err = qnbd("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                      f"data_file={tmp_path}/m.data", str(src), str(tmp_path / "m.qcow2"))
    assert theirs.returncode == rc == 1
    assert err.strip() == "qnbd convert: Compression is not supported with external " \
                          "data files"
    _check(str(tmp_path / "m.qcow2"))
