"""Image locks against real qemu-img, qemu-io and qemu-nbd processes (DESIGN.md rule 11):
a writer excludes every other writer and every lock-taking reader; -U readers pass."""

import subprocess
import sys

import nbd
import pytest

from qnbd.formats import open_image
from qnbd.errors import ImageError
from qnbd.lock import ImageInUse
from qnbd.qcow2.check import check_image

from peers import qemu_img
from qcow2util import sha256


@pytest.fixture
def qcow2(tmp_path):
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    return path


@pytest.fixture
def raw(tmp_path):
    path = str(tmp_path / "img.raw")
    qemu_img("create", "-q", "-f", "raw", path, "4M")
    return path


def qemu(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("tool", ["qemu-nbd", "qemu-io"])
def test_qemu_writer_excludes_qnbd(qcow2, qemu_holder, tool):
    holder = qemu_holder(qcow2, tool=tool)
    with pytest.raises(ImageInUse) as e:
        open_image(qcow2, "qcow2", read_only=False)
    message = str(e.value)
    assert "in use" in message and "'write' lock" in message and "\n" not in message
    assert f"[{holder.pid}]" in message  # names the holder
    with pytest.raises(ImageInUse, match="shared 'write' lock"):
        open_image(qcow2, "qcow2", read_only=True)
    with pytest.raises(ImageInUse):
        check_image(qcow2)
    # -U style: a shared read-only open works.
    dev = open_image(qcow2, "qcow2", read_only=True, force_share=True)
    dev.close()
    assert check_image(qcow2, force_share=True).exit_code == 0


def test_qnbd_writer_excludes_qemu(qcow2):
    dev = open_image(qcow2, "qcow2", read_only=False)
    try:
        r = qemu("qemu-img", "info", qcow2)
        assert r.returncode != 0 and 'Failed to get shared "write" lock' in r.stderr
        r = qemu("qemu-io", "-c", "read 0 512", qcow2)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr
        r = qemu("qemu-nbd", "-r", "-f", "qcow2", "-k", qcow2 + ".sock", qcow2)
        assert r.returncode != 0 and "lock" in r.stderr
        assert qemu("qemu-img", "check", "-r", "all", qcow2).returncode != 0
        # -U readers keep working.
        assert qemu("qemu-img", "info", "-U", qcow2).returncode == 0
        assert qemu("qemu-io", "-r", "-U", "-c", "read 0 512", qcow2).returncode == 0
        # A second qnbd open conflicts like another process (OFD locks are per open).
        with pytest.raises(ImageInUse):
            open_image(qcow2, "qcow2", read_only=False)
    finally:
        dev.close()
    assert qemu("qemu-io", "-c", "write 0 512", qcow2).returncode == 0  # released


def test_readers_share(qcow2, qemu_holder):
    qemu_holder(qcow2, read_only=True)
    dev = open_image(qcow2, "qcow2", read_only=True)
    try:
        assert qemu("qemu-img", "info", qcow2).returncode == 0
        r = qemu("qemu-io", "-c", "write 0 512", qcow2)
        assert r.returncode != 0 and "lock" in r.stderr
    finally:
        dev.close()
    with pytest.raises(ImageInUse):  # the qemu-nbd -r still refuses writers
        open_image(qcow2, "qcow2", read_only=False)


def test_raw_like_qemu_nbd(raw, qemu_holder):
    """Raw has no metadata: qemu-nbd shares write on it and only refuses resizes."""
    dev = open_image(raw, "raw", read_only=False)
    try:
        r = qemu("qemu-img", "resize", "-f", "raw", raw, "8M")
        assert r.returncode != 0 and "lock" in r.stderr
        assert qemu("qemu-io", "-f", "raw", "-c", "write 0 512", raw).returncode == 0
    finally:
        dev.close()
    qemu_holder(raw, fmt="raw")
    open_image(raw, "raw", read_only=False).close()  # as a second qemu-nbd would


def test_force_share_needs_read_only(qcow2):
    with pytest.raises(ImageError, match="read-only"):
        open_image(qcow2, "qcow2", read_only=False, force_share=True)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_over_a_served_image_is_refused_and_leaves_it_intact(tmp_path, serve, fmt):
    """Issue 16.7: `qnbd create` truncated an image a `qnbd serve` was writing (rc 0, the
    client then got EIO). Like `qemu-img create`, it now locks before emptying the file:
    it fails in one line and the image, and the client's session, are untouched."""
    path = str(tmp_path / f"served.{fmt}")
    qemu_img("create", "-q", "-f", fmt, path, "4M")
    server = serve(path, "-f", fmt)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"kept" * 1024, 65536)
    h.flush()
    before = sha256(path)
    qemu_says = qemu("qemu-img", "create", "-f", fmt, path, "1M")
    assert qemu_says.returncode == 1
    assert "Is another process using the image" in qemu_says.stderr
    for create_fmt in ("qcow2", "raw"):
        r = subprocess.run([sys.executable, "-m", "qnbd.cli", "create", "-f", create_fmt,
                            path, "1M"], capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "Is another process using the image" in r.stderr
    assert sha256(path) == before
    assert h.pread(4096, 65536) == b"kept" * 1024
    h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    assert qemu_img("info", "--output=json", path).stdout.count(f'"format": "{fmt}"') == 1


@pytest.mark.parametrize("args", [["bitmap", "--add"], ["check", "-r", "all"]],
                         ids=["bitmap", "check-r"])
def test_other_writing_tools_refuse_a_served_image(tmp_path, serve, args):
    """The other commands that write (qnbd bitmap, qnbd check -r) lock too."""
    path = str(tmp_path / "served.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    server = serve(path, "-f", "qcow2")
    before = sha256(path)
    extra = ["b"] if args[0] == "bitmap" else []
    r = subprocess.run([sys.executable, "-m", "qnbd.cli", *args, path, *extra],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "in use" in r.stderr, r.stderr
    assert sha256(path) == before
    code, err = server.stop()
    assert code == 0, err
