"""serve --cache=none|directsync: the image files are opened with O_DIRECT (qemu's
cache.direct=on), every transfer aligned through bounce buffers (qnbd/direct_io.py), and
buffered I/O with a one-line notice where the file system refuses O_DIRECT."""

import os
import shutil
import subprocess
import tempfile

import pytest

from nbdserver import Server, short_tmpdir, wait_for_socket
from peers import check_clean, qemu_img, qemu_io, run

O_DIRECT = 0o40000  # x86/arm64 value, as /proc/PID/fdinfo shows the flags (octal)

# Unaligned writes inside clusters, across clusters, into new clusters, and reads back.
SIZE = 64 << 20
WRITES = [("5", 12345, 5000), ("6", 65536 - 700, 4096 + 1400), ("7", 3 << 20, 1 << 20),
          ("8", SIZE - 3000, 3000)]


@pytest.fixture
def disk_dir():
    """A directory on a disk file system (O_DIRECT has a meaning there), not tmpfs."""
    d = tempfile.mkdtemp(prefix="qnbd-direct-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _open_flags(pid: int, path: str) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.path.realpath(f"/proc/{pid}/fd/{fd}") == os.path.realpath(path):
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                return int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
    raise AssertionError(f"{path} is not open in {pid}")


def _write_both(uri: str, reference: str) -> None:
    """The same writes through the server and, by qemu-io, into a reference copy."""
    cmds = [c for pattern, offset, length in WRITES
            for c in ("-c", f"write -P {pattern} {offset} {length}")]
    run("qemu-io", "-f", "raw", *cmds, uri)
    run("qemu-io", "-f", "qcow2", *cmds, reference)
    for pattern, offset, length in WRITES:
        run("qemu-io", "-f", "raw", "-c", f"read -P {pattern} {offset} {length}", uri)


@pytest.mark.parametrize("cache, cluster", [("none", 65536), ("directsync", 512)])
def test_cache_direct_on_disk(serve, disk_dir, cache, cluster):
    image = os.path.join(disk_dir, "a.qcow2")
    reference = os.path.join(disk_dir, "ref.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", image, str(SIZE))
    qemu_io(image, "qcow2", "write -P 3 1000 300000")
    shutil.copy(image, reference)
    server = serve(image, "-f", "qcow2", f"--cache={cache}")
    assert _open_flags(server.proc.pid, image) & O_DIRECT
    _write_both(server.uri, reference)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", server.uri, reference)
    code, err = server.stop()
    assert code == 0 and "O_DIRECT" not in err
    check_clean(image)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", image, reference)


def test_cache_none_raw_keeps_unaligned_size(serve, disk_dir):
    """A write at the end of a file whose size is not block-aligned leaves the size as
    it was (the bounce buffer's whole last block is written, then the size put back)."""
    image = os.path.join(disk_dir, "a.raw")
    with open(image, "wb") as f:
        f.write(os.urandom(10000))
    reference = os.path.join(disk_dir, "ref.raw")
    shutil.copy(image, reference)
    server = serve(image, "-f", "raw", "--cache=none")
    assert _open_flags(server.proc.pid, image) & O_DIRECT
    run("qemu-io", "-f", "raw", "-c", "write -P 9 9000 1000", "-c", "write -P 4 1 4097",
        server.uri)
    run("qemu-io", "-f", "raw", "-c", "write -P 9 9000 1000", "-c", "write -P 4 1 4097",
        reference)
    qemu_img("compare", "-f", "raw", "-F", "raw", server.uri, reference)
    server.stop()
    assert os.path.getsize(image) == 10000
    qemu_img("compare", "-f", "raw", "-F", "raw", image, reference)


def test_cache_none_falls_back_where_refused():
    """ramfs refuses O_DIRECT (tmpfs accepts it on recent kernels): the server says so in
    one line and serves with buffered I/O. The server runs in its own mount namespace
    (unshare -rm) with a ramfs mounted there."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here")
    d = short_tmpdir()
    try:
        mnt = os.path.join(d, "ramfs")
        os.mkdir(mnt)
        src = os.path.join(d, "src.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", src, "64M")
        qemu_io(src, "qcow2", "write -P 5 4096 70000")
        reference = os.path.join(d, "ref.qcow2")
        shutil.copy(src, reference)
        sock = os.path.join(d, "nbd.sock")
        image = os.path.join(mnt, "a.qcow2")
        inner = f"mount -t ramfs none {mnt} && cp {src} {image} && exec \"$@\""
        server = Server(["-k", sock, "-t", "-f", "qcow2", "--cache=none", image], sock,
                        prefix=["unshare", "-rm", "sh", "-c", inner, "sh"])
        wait_for_socket(sock, server.proc)
        run("qemu-io", "-f", "raw", "-c", "write -P 6 100000 5000", server.uri)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 6 100000 5000", reference)
        qemu_img("compare", "-f", "raw", "-F", "qcow2", server.uri, reference)
        code, err = server.stop()
        notices = [line for line in err.splitlines() if "O_DIRECT" in line]
        assert len(notices) == 1 and "buffered" in notices[0], err
        assert code == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
