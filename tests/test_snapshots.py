"""Internal snapshots made by `qemu-img snapshot -c`, read side: `qnbd info` and
`qnbd snapshot -l` list them as qemu-img does, and a snapshot loaded with `-l` (serve,
convert, the engine) reads exactly what `qemu-img convert -l` reads."""

import json
import subprocess

import nbd
import pytest

from qnbd.formats import open_image

from cli_util import qemu_img_info, qemu_img_info_text, qnbd, qnbd_ok
from nbdserver import wait_for_socket
from peers import check_clean, qemu_img, qemu_io, run

MiB = 1 << 20


def _build(tmp_path, options="", backing=False):
    """An image with three snapshots taken between writes, zero writes and discards; the
    image grows after the first (with 512-byte clusters its L1 table grows too, so the
    first snapshot's table is shorter than the image needs; qemu cannot resize a v2 image
    with snapshots, so that one is made at its final size)."""
    image = str(tmp_path / "s.qcow2")
    v2 = "compat=0.10" in options
    args = ["create", "-q", "-f", "qcow2"] + (["-o", options] if options else [])
    if backing:
        base = str(tmp_path / "base.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", base, "6M")
        qemu_io(base, "qcow2", "write -P 0x11 0 6M")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    qemu_img(*args, image, "8M" if v2 else "6M")
    qemu_io(image, "qcow2", "write -P 1 0 1M", "write -P 2 3M 100k")
    qemu_img("snapshot", "-c", "first", image)
    if not v2:
        qemu_img("resize", image, "8M")
    qemu_io(image, "qcow2", "write -P 3 512k 1M", "write -z 3M 64k", "discard 0 64k",
            "write -P 4 7M 4k")
    qemu_img("snapshot", "-c", "second one", image)
    qemu_io(image, "qcow2", "write -P 5 0 8M")
    qemu_img("snapshot", "-c", "2", image)  # a name that is also another snapshot's id
    qemu_io(image, "qcow2", "write -z 0 2M")
    return image


def _qemu_snapshot_data(tmp_path, image, selector):
    out = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", "-l", selector, image, out)
    return out.read_bytes()


SHAPES = [("v3", ""), ("v2", "compat=0.10"), ("c512", "cluster_size=512"),
          ("backing", None)]


@pytest.fixture(params=SHAPES, ids=lambda s: s[0])
def image(request, tmp_path):
    name, options = request.param
    return _build(tmp_path, options or "", backing=options is None)


def test_info_lists_snapshots_as_qemu_img(image):
    rc, out, err = qnbd("info", "--output=json", image)
    assert rc == 0, err
    ours = json.loads(out)
    assert ours == qemu_img_info(image)
    assert [s["name"] for s in ours["snapshots"]] == ["first", "second one", "2"]
    assert qnbd_ok("info", image) == qemu_img_info_text(image)


def test_snapshot_list_as_qemu_img(image):
    out = qnbd_ok("snapshot", "-l", image)
    assert out == run("qemu-img", "snapshot", "-l", image).stdout
    assert "second one" in out


# (qnbd selector, qemu-img convert -l selector): an id or a name alone is tried as an id
# first, then as a name (qemu-nbd -l); "2" is snapshot 2's id and snapshot 3's name.
SELECTORS = [("1", "snapshot.id=1"), ("first", "snapshot.name=first"),
             ("second one", "snapshot.name=second one"), ("2", "snapshot.id=2"),
             ("snapshot.name=2", "snapshot.name=2"),
             ("snapshot.id=3,snapshot.name=2", "snapshot.id=3,snapshot.name=2")]


@pytest.mark.parametrize("ours,theirs", SELECTORS, ids=[s[0] for s in SELECTORS])
def test_engine_reads_each_snapshot_as_qemu(tmp_path, image, ours, theirs):
    expected = _qemu_snapshot_data(tmp_path, image, theirs)
    dev = open_image(image, snapshot=ours)
    try:
        assert dev.read_only and dev.size == 8 * MiB
        assert bytes(dev.read(0, dev.size)) == expected
    finally:
        dev.close()
    current = open_image(image)
    try:  # the active layer is not what any snapshot holds
        assert bytes(current.read(0, current.size)) != expected
    finally:
        current.close()


def test_convert_a_snapshot(tmp_path, image):
    out = tmp_path / "out.qcow2"
    qnbd_ok("convert", "-l", "snapshot.name=second one", "-O", "qcow2", image, out)
    expected = tmp_path / "expected.qcow2"
    qemu_img("convert", "-l", "snapshot.name=second one", "-O", "qcow2", image, expected)
    p = run("qemu-img", "compare", out, expected, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("option", ["-l", "--load-snapshot"])
def test_serve_exports_a_snapshot_read_only(tmp_path, serve, option):
    image = _build(tmp_path)
    expected = _qemu_snapshot_data(tmp_path, image, "snapshot.id=1")
    server = serve(image, option, "snapshot.id=1,snapshot.name=first")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    try:
        assert h.is_read_only()
        assert h.pread(h.get_size(), 0) == expected
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
    finally:
        h.shutdown()
    # Nothing was written: the image is as qemu-img left it.
    check_clean(image)


@pytest.mark.parametrize("context", ["base:allocation", "qemu:allocation-depth"])
@pytest.mark.parametrize("load", [["-l", "snapshot.name=second one"], ["-r"]],
                         ids=["snapshot", "active"])
def test_served_snapshot_maps_as_qemu_nbd(tmp_path, serve, context, load):
    """Block status of an exported snapshot (through its own L1 table) and of the active
    layer, down a backing file shorter than the image, as qemu-nbd reports it."""
    image = _build(tmp_path, "cluster_size=512", backing=True)
    if load == ["-r"]:  # the active layer of _build is all written: a fresh overlay
        image = str(tmp_path / "overlay.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", image,
                 "8M")
        qemu_io(image, "qcow2", "write -P 6 1M 64k", "write -z 2M 64k", "write -P 7 7M 4k")
    ours = serve(image, "-A", *load)
    sock = str(tmp_path / "qemu.sock")
    qemu_nbd = subprocess.Popen(["qemu-nbd", "-A", *load, "-k", sock, image])
    try:
        wait_for_socket(sock, qemu_nbd)
        maps = [run("nbdinfo", "--json", f"--map={context}", uri).stdout
                for uri in (ours.uri, f"nbd+unix:///?socket={sock}")]
    finally:
        qemu_nbd.kill()
        qemu_nbd.wait()
    assert json.loads(maps[0]) == json.loads(maps[1])
    assert len(json.loads(maps[0])) > 3


@pytest.mark.parametrize("selector,message", [
    ("9", "Can't find snapshot"), ("snapshot.id=1,snapshot.name=2", "Can't find snapshot"),
    ("snapshot.size=1", "Invalid parameter 'snapshot.size'"),
])
def test_unknown_snapshot_one_line_error(tmp_path, selector, message):
    image = _build(tmp_path)
    before = open(image, "rb").read()
    for cmd in (["convert", "-l", selector, image, tmp_path / "o.raw"],
                ["serve", "-k", tmp_path / "s.sock", "-l", selector, image]):
        rc, _, err = qnbd(*cmd)
        assert rc == 1 and message in err and err.count("\n") == 1, err
    assert open(image, "rb").read() == before


def test_raw_has_no_snapshots(tmp_path):
    raw = tmp_path / "r.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    rc, _, err = qnbd("convert", "-l", "1", raw, tmp_path / "o.raw")
    assert rc == 1 and "no internal snapshots" in err
    assert qnbd_ok("snapshot", "-l", raw) == run("qemu-img", "snapshot", "-l", raw).stdout


def test_config_file_export_of_a_snapshot(tmp_path):
    from qnbd.config import parse_config
    from qnbd.export import Export
    image = _build(tmp_path)
    config = parse_config({"export": [{"image": image, "load_snapshot": "second one"}]})
    export = Export.open(config.exports[0])
    try:
        assert export.read_only
        assert bytes(export.read(0, export.size)) == \
            _qemu_snapshot_data(tmp_path, image, "snapshot.name=second one")
    finally:
        export.close()
