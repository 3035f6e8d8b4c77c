"""Probing, as qemu probes (docs/DESIGN.md rule 14; issue 16.5 and 16.6): a probed raw image
refuses client writes that would make block 0 probe as another format, and containers
qnbd has no driver for are never exported as raw unless `-f raw` is given."""

import subprocess

import nbd
import pytest

from cli_util import qnbd_subprocess
from nbdserver import make_raw, run_serve
from peers import qemu_img
from qcow2util import sha256


def _client(server) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri)
    return h


@pytest.fixture
def planted_header(tmp_path):
    """The first sector of a qcow2 image naming a host file as its backing file."""
    path = str(tmp_path / "evil.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", path)
    with open(path, "rb") as f:
        return f.read(512)


def test_probed_raw_refuses_a_format_header_in_block_0(tmp_path, serve, planted_header):
    """Issue 16.5: served without -f, a client wrote a qcow2 header to a raw image and
    the next probe opened /etc/hostname as its backing file. As qemu-nbd: EPERM, the
    sector stays as it was; other writes to block 0 and beyond still succeed."""
    path = make_raw(tmp_path / "disk.img", 4 << 20)
    server = serve(path)
    h = _client(server)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(planted_header, 0)
    assert e.value.errno == "EPERM"  # libnbd gives the name
    with pytest.raises(nbd.Error) as e:
        h.pwrite(planted_header[:4], 0)  # the magic alone, then the old version bytes
        h.pwrite(planted_header[4:8], 4)
    with open(path, "rb") as f:
        assert f.read(8) != planted_header[:8]
    h.pwrite(b"boot" * 128, 0)  # a sector that probes as raw: allowed
    h.pwrite(planted_header, 4096)  # past block 0: nothing probes there
    assert h.pread(512, 0) == b"boot" * 128
    h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    assert err.count("probing guessed raw") == 1  # warned once, at the first refusal
    assert qemu_img("info", "--output=json", path).stdout.count('"format": "raw"') == 1


def test_explicit_raw_lifts_the_restriction(tmp_path, serve, planted_header):
    path = make_raw(tmp_path / "disk.img", 4 << 20)
    server = serve(path, "-f", "raw")
    h = _client(server)
    h.pwrite(planted_header, 0)
    h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    with open(path, "rb") as f:
        assert f.read(512) == planted_header


# (QED has a driver since issue 12: probed as qed, tests/test_qed_cli.py.)
FOREIGN = [("vmdk", []), ("vdi", []), ("vpc", []), ("vhdx", []),
           ("vmdk", ["-o", "subformat=streamOptimized"])]


@pytest.mark.parametrize("fmt,options", FOREIGN, ids=["vmdk", "vdi", "vpc", "vhdx",
                                                       "vmdk-stream"])
def test_foreign_formats_are_never_served_as_raw(tmp_path, serve, fmt, options):
    """Issue 16.6: VMDK, VDI, VHD and VHDX images made by qemu-img are named by
    `qnbd info` and refused by `qnbd serve` in one line; `-f raw` exports their bytes."""
    path = str(tmp_path / f"image.{fmt}")
    qemu_img("create", "-q", "-f", fmt, *options, path, "8M")
    before = sha256(path)
    r = qnbd_subprocess("info", path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"qnbd info: '{path}' is a {fmt} image, a format qnbd cannot open "
        "(give -f raw to use its bytes as they are)"]
    r = run_serve("-k", str(tmp_path / "s"), path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"is a {fmt} image" in r.stderr
    server = serve(path, "-f", "raw", "-r")
    h = _client(server)
    with open(path, "rb") as f:
        assert h.pread(512, 0) == f.read(512)
    h.shutdown()
    server.stop()
    assert sha256(path) == before
    assert subprocess.run(["qemu-img", "check", "-f", fmt, path],
                          capture_output=True).returncode in (0, 63)
