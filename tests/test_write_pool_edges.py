"""Edges of the pooled write path (qnbd/nbd/writes.py) found by reviewing it: each test
states the guarantee docs/DESIGN.md gives and failed on the code before its fix."""

import errno
import json
import random
import threading
import nbd
import pytest

from inprocess import close_pooled, pooled_connections
from nbdserver import serve  # noqa: F401 (fixture)
from peers import check_clean, qemu_img, qemu_io, run
from qnbd import fileio
from qnbd.block.plan import HostWrite
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from test_write_pool import (KiB, MiB, control_connection, loop,  # noqa: F401
                             replies, request, spin, wait)


@pytest.fixture
def held_by_offset(monkeypatch):
    """HostWrites wait until the event of their file offset is set."""
    events: dict[int, threading.Event] = {}
    real = HostWrite.perform

    def perform(self):
        assert events.setdefault(self.offset, threading.Event()).wait(10)
        real(self)

    monkeypatch.setattr(HostWrite, "perform", perform)
    return lambda offset: events.setdefault(offset, threading.Event())


def test_probed_raw_block0_cannot_be_assembled_from_two_concurrent_writes(
        tmp_path, loop, held_by_offset):  # noqa: F811
    """Rule 14: a probed raw image never lets a client write a first sector that would
    probe as another format. Two byte-disjoint writes to block 0 from two connections:
    a large one from byte 4 (a qcow2 version at 4..7) goes to the pool; while it is out
    a small one writes the qcow2 magic at 0..3. It must wait for the first (both touch
    the first sector, the unit its check covers) and then be refused, as run one after
    the other; checked against the bytes the first was still changing, both succeeded
    and the image opened as qcow2 next time."""
    path = str(tmp_path / "disk.img")
    qemu_img("create", "-q", "-f", "raw", path, "4M")
    export = Export.open(ExportConfig(image=path))   # no format: probed (rule 14)
    assert export.device.probed is not None
    (a, b), server = pooled_connections(loop, export, 2)
    try:
        a.data_received(request(p.CMD_WRITE, 1, 4, payload=b"\0\0\0\3" + bytes(128 * KiB - 4)))
        spin(loop, 0.05)
        b.data_received(request(p.CMD_WRITE, 2, 0, payload=b"QFI\xfb"))
        spin(loop, 0.05)
        assert not b.transport.data   # it waits for the write out
        held_by_offset(4).set()
        wait(loop, lambda: len(a.transport.data) == 16 and len(b.transport.data) == 16)
        assert [e for _c, e, _d in replies(a.transport.data + b.transport.data, {})] \
            == [0, p.EPERM]
    finally:
        held_by_offset(4).set()
        close_pooled(server, export)
    info = run("qemu-img", "info", "--output=json", path)   # probes as the next open would
    assert json.loads(info.stdout)["format"] == "raw"


def test_a_waiting_control_command_is_not_overtaken_by_later_writes(
        tmp_path, loop, held_by_offset):  # noqa: F811
    """Control-socket commands see every earlier write completed, and while one waits no
    new write leaves the loop (it cannot starve). A WRITE that arrives after the command
    runs inline instead: under a steady stream of large writes (a slow disk, one out at
    every moment) the command would otherwise wait for ever."""
    path = str(tmp_path / "disk.raw")
    qemu_img("create", "-q", "-f", "raw", path, "4M")
    export = Export.open(ExportConfig(image=path, format="raw"))
    (a, b), server = pooled_connections(loop, export, 2)
    seen = []
    control = control_connection(server, lambda line: seen.append(line) or b"{}\n")
    try:
        a.data_received(request(p.CMD_WRITE, 1, 1 * MiB, payload=b"\x55" * 256 * KiB))
        spin(loop, 0.05)
        control.data_received(b'{"command": "exports"}\n')
        b.data_received(request(p.CMD_WRITE, 2, 2 * MiB, payload=b"\x66" * 256 * KiB))
        spin(loop, 0.05)
        assert not seen
        held_by_offset(1 * MiB).set()
        wait(loop, lambda: len(a.transport.data) == 16)
        spin(loop, 0.2)
        assert seen, "the command still waits: the write sent after it went out beside it"
    finally:
        held_by_offset(1 * MiB).set()
        held_by_offset(2 * MiB).set()
        close_pooled(server, export)


@pytest.mark.parametrize("cluster_size, offset", [("16k", 0), ("32k", 4096)])
def test_a_write_of_the_advertised_maximum_size_succeeds(tmp_path, serve, cluster_size,
                                                         offset):  # noqa: F811
    """A WRITE as large as the server advertises (NBD_INFO_BLOCK_SIZE maximum, 32 MiB)
    maps more than 1024 clusters in one L2 table when they are 16 KiB (or 32 KiB and the
    write is unaligned, rewriting its clusters in place): one buffer per cluster is more
    than one pwritev takes (IOV_MAX, 1024; EINVAL). qemu-nbd writes it; so must we."""
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, "64M")
    server = serve(path, "-f", "qcow2")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    size = h.get_block_size(nbd.SIZE_MAXIMUM)
    data = random.randbytes(size)
    for _ in range(2):   # the second one rewrites the clusters the first allocated
        h.pwrite(data, offset)
    h.shutdown()
    rc, err = server.stop()
    assert rc == 0, err
    qemu_img("check", path)
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(offset) + data + bytes(64 * MiB - offset - size))
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), path)


def test_a_failed_inline_write_leaks_no_cluster(tmp_path, loop, monkeypatch):  # noqa: F811
    """A write small enough to run inline whose data write fails: the clusters allocated
    for it were never mapped and are released (qemu-img check: no leak), as a failed
    plan's are (qemu frees them too: qcow2_alloc_cluster_abort)."""
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "4M")
    failing = [True]
    real = fileio.File.pwritev

    def pwritev(self, buffers, offset):
        if failing[0] and self.path == path:
            raise OSError(errno.EIO, "injected")
        real(self, buffers, offset)

    monkeypatch.setattr(fileio.File, "pwritev", pwritev)
    export = Export.open(ExportConfig(image=path, format="qcow2"))
    (a,), server = pooled_connections(loop, export)
    try:
        # 64 KiB, unaligned: sixteen new clusters and a seventeenth, partly written.
        a.data_received(request(p.CMD_WRITE, 1, 1000, payload=b"\x77" * 64 * KiB))
        wait(loop, lambda: len(a.transport.data) == 16)
        failing[0] = False
        a.data_received(request(p.CMD_FLUSH, 2))
        wait(loop, lambda: len(a.transport.data) == 32)
        assert [e for _c, e, _d in replies(a.transport.data, {})] == [p.EIO, 0]
    finally:
        close_pooled(server, export)
    check_clean(path)
    assert "verification failed" not in qemu_io(path, "qcow2", "read -P 0 0 4M").stdout


def test_a_client_waiting_for_a_write_out_is_not_idle(tmp_path, loop, held_by_offset):  # noqa: F811
    """--idle-timeout drops clients that do nothing; one waiting for the reply to a
    write still out (a slow disk) is not doing nothing."""
    path = str(tmp_path / "disk.raw")
    qemu_img("create", "-q", "-f", "raw", path, "4M")
    export = Export.open(ExportConfig(image=path, format="raw"))
    (a,), server = pooled_connections(loop, export, idle_timeout=0.2)
    try:
        a.data_received(request(p.CMD_WRITE, 1, MiB, payload=b"\x55" * 256 * KiB))
        spin(loop, 0.6)
        held_by_offset(MiB).set()
        wait(loop, lambda: len(a.transport.data) == 16)
        assert not a.transport.closed
        assert replies(a.transport.data, {}) == [(1, 0, b"")]
        spin(loop, 0.5)
        assert a.transport.closed   # idle once answered
    finally:
        held_by_offset(MiB).set()
        close_pooled(server, export)
