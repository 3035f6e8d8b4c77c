"""Issue 16, items 1 and 2, against a real `qnbd serve`: a client that goes silent in the
middle of the TLS upgrade gives its slot back at --handshake-timeout, and one BLOCK_STATUS
over a whole fine dirty bitmap costs what its reply carries."""

import struct
import subprocess
import threading
import time

import nbd
import pytest

from nbdserver import RawClient, make_raw, rss
from qcow2util import bitmap_locations, read_field
from qnbd.nbd import protocol as p
from tlsutil import make_pki

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")), {"alice": "/CN=alice"})


def test_silent_client_after_starttls_gives_its_slot_back(tmp_path, serve, pki):
    image = make_raw(tmp_path / "a.raw", MiB, b"served", 0)
    # -e 1 (the default): one client at a time, the next waits for the slot.
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"], "--handshake-timeout", "1")
    silent = RawClient(server.sock, timeout=10)
    silent.greeting()
    silent.send_option(p.OPT_STARTTLS)
    assert silent.option_replies() == [(p.REP_ACK, b"")]
    # ... and never starts the TLS handshake.
    start = time.monotonic()
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(pki["alice"])
    h.connect_uri(server.uri)
    assert h.pread(6, 0) == b"served"
    h.shutdown()
    assert time.monotonic() - start < 5
    assert silent.closed_by_server()
    silent.close()
    code, err = server.stop()
    assert code == 0, err


def test_sigterm_while_a_client_is_silent_mid_tls(tmp_path, serve, pki):
    image = make_raw(tmp_path / "a.raw", MiB)
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"], "--handshake-timeout", "30")
    silent = RawClient(server.sock, timeout=10)
    silent.greeting()
    silent.send_option(p.OPT_STARTTLS)
    assert silent.option_replies() == [(p.REP_ACK, b"")]
    start = time.monotonic()
    code, err = server.stop(timeout=15)
    assert code == 0, err
    assert time.monotonic() - start < 8
    silent.close()


def _alternating_bitmap_image(path) -> str:
    """A 4 GiB qcow2 image with a bitmap of granularity 512 whose bits alternate: marked
    all dirty by qemu (so qemu writes every bitmap data cluster), then each data cluster
    overwritten with 0x55. Refcounts stay right; qemu-img check passes."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4G"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "512", path, "b"], check=True)
    writes = [arg for i in range(4) for arg in ("-c", f"write -z {i}G 1G")]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, path], check=True, capture_output=True)
    table_offset, table_bytes = bitmap_locations(path)["bitmap_table"]
    cluster = 1 << read_field(path, "cluster_bits")
    with open(path, "r+b") as f:
        f.seek(table_offset)
        table = struct.unpack(f">{table_bytes // 8}Q", f.read(table_bytes))
        data = [e & ((1 << 56) - 512) for e in table]
        assert len(data) == 16 and all(data)   # 4 GiB / 512 bits = 1 MiB of bitmap
        for offset in data:
            f.seek(offset)
            f.write(b"\x55" * cluster)
    return path


def test_fine_bitmap_block_status_is_bounded(tmp_path, serve):
    image = _alternating_bitmap_image(str(tmp_path / "bm.qcow2"))
    server = serve(image, "-r", "-B", "b", "-e", "0")
    other = nbd.NBD()
    other.connect_uri(server.uri)
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:b")
    h.connect_uri(server.uri)
    before = rss(server.proc.pid)
    # Another client's reads go on while the block status is answered.
    latencies = []
    done = threading.Event()

    def reads():
        while not done.is_set():
            start = time.monotonic()
            other.pread(4096, 0)
            latencies.append(time.monotonic() - start)
    reader = threading.Thread(target=reads)
    reader.start()
    seen = []

    def cb(meta, offset, entries, err):
        seen.append(list(entries))
        return 0
    start = time.monotonic()
    try:
        h.block_status(4 * GiB - 512, 0, cb)
    finally:
        elapsed = time.monotonic() - start
        done.set()
        reader.join()
    after = rss(server.proc.pid)
    (entries,) = seen
    # 65,536 descriptors of 512 bytes, alternating clean and dirty.
    assert len(entries) == 2 * 65536 and entries[:4] == [512, 1, 512, 0]
    assert elapsed < 1.0, f"block status took {elapsed:.2f} s"
    assert after - before < 64 * MiB, f"server grew by {(after - before) >> 20} MiB"
    assert latencies and max(latencies) < 1.0
    h.shutdown()
    other.shutdown()
