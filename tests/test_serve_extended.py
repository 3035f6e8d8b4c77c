"""Extended headers with a real client: libnbd 1.20+ negotiates NBD_OPT_EXTENDED_HEADERS by
default (Debian 13 has 1.22; run `../shared/tools/debian13.sh ./dev test
tests/test_serve_extended.py`). On older libnbd these tests skip; the raw-socket tests in
test_serve_core.py and the sans-I/O ones in test_nbd_core.py cover the wire everywhere."""

import subprocess

import nbd
import pytest


pytestmark = pytest.mark.skipif(
    not hasattr(nbd.NBD, "get_extended_headers_negotiated"),
    reason=f"libnbd {nbd.NBD().get_version()} has no extended headers "
           "(get_extended_headers_negotiated appeared in 1.20)")

GiB = 1 << 30


@pytest.fixture
def server(tmp_path, serve):
    image = str(tmp_path / "six.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "6G"], check=True)
    return serve(image, "-f", "qcow2", "--discard", "unmap")


def connect(server) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri)
    return h


def test_libnbd_negotiates_extended_headers(server):
    h = connect(server)
    assert h.get_extended_headers_negotiated()
    assert h.get_structured_replies_negotiated()
    h.pwrite(b"\x5a" * 65536, 5 * GiB)
    assert h.pread(65536, 5 * GiB) == b"\x5a" * 65536
    h.shutdown()


def test_five_gib_zero_in_one_request_and_block_status_64(server):
    h = connect(server)
    h.pwrite(b"\x01" * 65536, 0)
    h.pwrite(b"\x02" * 65536, 5 * GiB + 65536)
    # One WRITE_ZEROES with a 64-bit effect length: 5 GiB.
    h.zero(5 * GiB, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 0) == bytes(65536)
    seen = []

    def cb(meta, offset, entries, err):
        seen.append((meta, offset, list(entries)))
        return 0
    h.block_status_64(6 * GiB, 0, cb)
    (meta, offset, entries), = seen
    assert meta == "base:allocation" and offset == 0
    lengths = [e[0] for e in entries]
    flags = [e[1] for e in entries]
    # One descriptor longer than 4 GiB: only extended headers can carry it.
    assert lengths[0] >= 5 * GiB and flags[0] & nbd.STATE_ZERO
    assert sum(lengths) == 6 * GiB
    h.shutdown()


def test_libnbd_without_extended_headers_still_served(server):
    h = nbd.NBD()
    h.set_request_extended_headers(False)
    h.connect_uri(server.uri)
    assert not h.get_extended_headers_negotiated()
    h.pwrite(b"compact", 0)
    assert h.pread(7, 0) == b"compact"
    h.shutdown()
