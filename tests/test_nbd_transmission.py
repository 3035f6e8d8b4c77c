"""The transmission phase against `qnbd serve`: every command, flag and error rule of
proto.md "Request types" and "Error values", through libnbd (strict mode off to send what a
careful client would not) and a raw socket (unknown commands, oversize payloads)."""

import errno
import struct

import nbd
import pytest
from hypothesis import given, settings, strategies as st

from fuzz import targets
from nbdserver import RawClient, make_raw
from qnbd.errors import IOFailure, NotFast
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from qnbd.nbd.catalog import transmission_flags
from qnbd.nbd.handshake import Session
from qnbd.nbd.transmission import Request, RequestParser, Transmission, allowed_flags, check

SIZE = 4 << 20


# --- sans-I/O parser ---

def req(cmd, offset=0, length=0, flags=0, cookie=7, payload=b""):
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def test_parser_pipelined_and_split_requests():
    stream = req(p.CMD_WRITE, 0, 3, payload=b"abc") + req(p.CMD_READ, 0, 3, cookie=8) + req(p.CMD_DISC)
    parser = RequestParser()
    out = []
    for i in range(0, len(stream), 5):
        out += parser.feed(stream[i:i + 5])
    assert [(r.cmd, r.cookie, r.payload) for r in out] == [(1, 7, b"abc"), (0, 8, None), (2, 7, None)]
    assert parser.disconnected
    assert parser.feed(req(p.CMD_READ)) == []  # nothing after DISC


def test_parser_skips_oversize_write_payload():
    parser = RequestParser(max_payload=16)
    out = parser.feed(req(p.CMD_WRITE, 0, 40, payload=b"x" * 30))
    assert out == [Request(7, p.CMD_WRITE, 0, 0, 40, None)]
    out = parser.feed(b"y" * 10 + req(p.CMD_FLUSH, cookie=9))
    assert [(r.cmd, r.cookie) for r in out] == [(p.CMD_FLUSH, 9)]


# --- against the server, through libnbd ---

@pytest.fixture
def image(tmp_path):
    return make_raw(tmp_path / "disk.raw", SIZE, b"\x11" * 65536, 65536)


@pytest.fixture
def server(image, serve):
    return serve(image, "-f", "raw", "-e", "0", "--discard", "unmap")


def connect(server, strict=True, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(server.uri)
    if not strict:
        h.set_strict_mode(0)
    return h


def errnum(fn, *args, **kw):
    with pytest.raises(nbd.Error) as e:
        fn(*args, **kw)
    return e.value.errnum


def test_flags_advertised(server):
    h = connect(server)
    assert h.get_size() == SIZE
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_cache()
    assert h.can_df() and h.can_fast_zero() and h.can_multi_conn() and not h.is_read_only()


def test_read_write_fua_flush(server, image):
    h = connect(server)
    assert h.pread(4096, 65536) == b"\x11" * 4096
    h.pwrite(b"hello", 10, nbd.CMD_FLAG_FUA)
    h.pwrite(b"world", SIZE - 5)
    h.flush()
    assert h.pread(5, 10) == b"hello" and h.pread(5, SIZE - 5) == b"world"
    with open(image, "rb") as f:
        assert f.read(15)[10:] == b"hello"


def test_structured_read_sends_holes_and_df_one_chunk(server):
    h = connect(server)
    chunks = []

    def cb(buf, offset, status, error):
        chunks.append((offset, len(buf), status))
        return 0
    data = h.pread_structured(4 * 65536, 0, cb)
    assert data[65536:131072] == b"\x11" * 65536 and data.count(0) == 3 * 65536
    assert (0, 65536, nbd.READ_HOLE) in chunks and (65536, 65536, nbd.READ_DATA) in chunks
    chunks.clear()
    h.pread_structured(4 * 65536, 0, cb, nbd.CMD_FLAG_DF)
    assert chunks == [(0, 4 * 65536, nbd.READ_DATA)]


def test_block_status_and_req_one(server):
    h = connect(server)
    seen = []

    def cb(meta, offset, entries, err):
        seen.append((meta, offset, list(entries)))
        return 0
    h.block_status(SIZE, 0, cb)
    assert seen == [("base:allocation", 0, [65536, 3, 65536, 0, SIZE - 131072, 3])]
    seen.clear()
    h.block_status(1000, 0, cb, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [("base:allocation", 0, [1000, 3])]
    seen.clear()
    h.block_status(SIZE - 70000, 70000, cb, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [("base:allocation", 70000, [131072 - 70000, 0])]


def test_trim_and_write_zeroes(server):
    h = connect(server)
    h.zero(4096, 65536, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(4096, 65536) == bytes(4096)
    h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 65536) == bytes(65536)
    h.pwrite(b"\x22" * 65536, 0)
    h.trim(65536, 0)
    assert h.pread(65536, 0) == bytes(65536)  # discard=unmap on raw punches a hole
    h.cache(65536, 0)


def test_errors_past_the_end(server):
    h = connect(server, strict=False)
    assert errnum(h.pread, 2, SIZE - 1) == errno.EINVAL
    assert errnum(h.pwrite, b"ab", SIZE - 1) == errno.ENOSPC
    assert errnum(h.zero, 2, SIZE - 1) == errno.ENOSPC
    assert errnum(h.trim, 2, SIZE - 1) == errno.EINVAL
    assert errnum(h.cache, 2, SIZE - 1) == errno.EINVAL
    assert errnum(h.block_status, 2, SIZE - 1, lambda *a: 0) == errno.EINVAL
    assert errnum(h.pread, 1, 1 << 62) == errno.EINVAL
    assert h.pread(2, SIZE - 2) == b"\0\0"  # the connection is still usable


def test_invalid_flags_are_einval(server):
    h = connect(server, strict=False)
    assert errnum(h.pwrite, b"x", 0, nbd.CMD_FLAG_DF) == errno.EINVAL
    assert errnum(h.trim, 1, 0, nbd.CMD_FLAG_REQ_ONE) == errno.EINVAL
    assert errnum(h.pread, 1, 0, nbd.CMD_FLAG_NO_HOLE) == errno.EINVAL
    assert errnum(h.block_status, 1, 0, lambda *a: 0, nbd.CMD_FLAG_DF) == errno.EINVAL
    h.pread(1, 0, nbd.CMD_FLAG_FUA)  # FUA is valid on every command


def test_zero_length_requests_do_not_disconnect(server):
    h = connect(server, strict=False)
    assert h.pread(0, 0) == b""
    h.pwrite(b"", 0)
    h.zero(0, 0)
    h.trim(0, 0)
    h.cache(0, 0)
    assert errnum(h.block_status, 0, 0, lambda *a: 0) == errno.EINVAL
    assert h.pread(1, 65536) == b"\x11"


def test_block_status_without_context_is_einval(server):
    h = connect(server, strict=False, meta=False)
    assert errnum(h.block_status, 512, 0, lambda *a: 0) == errno.EINVAL


def test_pipelined_requests(server):
    h = connect(server)
    cookies = [h.aio_pwrite(bytes([i]) * 4096, i * 4096) for i in range(1, 64)]
    bufs = [nbd.Buffer(4096) for _ in range(1, 64)]
    cookies += [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs, 1)]
    while h.aio_in_flight():
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    assert all(b.to_bytearray() == bytes([i]) * 4096 for i, b in enumerate(bufs, 1))


def test_read_only_export_refuses_writes(image, serve):
    server = serve(image, "-f", "raw", "-r")
    h = connect(server, strict=False)
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    assert errnum(h.pwrite, b"x", 0) == errno.EPERM
    assert errnum(h.zero, 1, 0) == errno.EPERM
    assert errnum(h.trim, 1, 0) == errno.EPERM
    assert errnum(h.pwrite, b"xx", SIZE - 1) == errno.EPERM
    assert h.pread(1, 65536) == b"\x11"
    h.flush()


def test_multi_conn_flush_covers_writes_of_other_connections(server, image):
    a, b = connect(server), connect(server)
    assert a.can_multi_conn()
    a.pwrite(b"from-a", 0)
    assert b.pread(6, 0) == b"from-a"  # one shared device: visible at once
    b.flush()


def test_single_client_export_has_no_multi_conn(image, serve):
    h = connect(serve(image, "-f", "raw"))
    assert not h.can_multi_conn()


# --- raw socket: what libnbd refuses to send ---

@pytest.fixture
def raw(server):
    c = RawClient(server.sock)
    c.go(structured=True, contexts=["base:allocation"])
    yield c
    c.close()


def test_unknown_command_einval(raw):
    raw.request(42, cookie=5)
    assert raw.simple_reply() == (p.EINVAL, 5)


def test_oversize_write_refused_without_desync(raw):
    n = (64 << 20) + 1   # one byte over the default limit
    raw.request(p.CMD_WRITE, 0, n, cookie=3, payload=b"\x33" * n)
    raw.request(p.CMD_READ, 0, 1, cookie=4)
    assert raw.simple_reply() == (p.EINVAL, 3)
    (flags, ctype, cookie, data), = raw.chunks()
    # Offset 0 is a hole in the image: a one-byte OFFSET_HOLE chunk.
    assert (ctype, cookie, data) == (p.REPLY_TYPE_OFFSET_HOLE, 4, struct.pack(">QI", 0, 1))


def test_oversize_read_refused_with_error_chunk(raw):
    raw.request(p.CMD_READ, 0, (64 << 20) + 1, cookie=6)
    (flags, ctype, cookie, payload), = raw.chunks()
    assert ctype == p.REPLY_TYPE_ERROR and cookie == 6
    assert struct.unpack(">I", payload[:4])[0] == p.EINVAL


def test_block_status_one_chunk_per_context_done(raw):
    raw.request(p.CMD_BLOCK_STATUS, 0, SIZE, cookie=9)
    (flags, ctype, cookie, payload), = raw.chunks()
    assert flags & p.REPLY_FLAG_DONE and ctype == p.REPLY_TYPE_BLOCK_STATUS
    assert len(payload) == 4 + 8 * 3


def test_disconnect_answers_earlier_requests_then_closes(raw):
    raw.request(p.CMD_WRITE, 0, 3, cookie=1, payload=b"abc")
    raw.request(p.CMD_FLUSH, cookie=2)
    raw.request(p.CMD_DISC, cookie=3)
    assert raw.simple_reply() == (0, 1)
    assert raw.simple_reply() == (0, 2)
    assert raw.closed_by_server()


def test_bad_request_magic_disconnects_only_that_client(raw, server):
    raw.s.sendall(b"\0" * 28)
    assert raw.closed_by_server()
    assert connect(server).pread(1, 65536) == b"\x11"


# --- error mapping, in process: a device that fails the way engines fail ---

class FailingDevice:
    size = 1 << 20
    read_only = False
    supports_fast_zero = True

    def __init__(self, failure):
        self.failure = failure

    def write_zeroes(self, *a, **kw):
        raise self.failure

    write = discard = write_zeroes

    def flush(self):
        pass


def run_requests(failure, *requests):
    """Feed requests to the transmission core; the reply errors."""
    export = Export(ExportConfig(image="-", discard="unmap"), FailingDevice(failure))
    tx = Transmission(Session(export, transmission_flags(export, False), False))
    tx.receive_data(b"".join(requests))
    raw = b"".join(bytes(piece) for out in iter(tx.next_output, None) for piece in out)
    return [struct.unpack_from(">IIQ", raw, i)[1] for i in range(0, len(raw), 16)]


def test_engine_errors_map_onto_nbd_errors():
    assert run_requests(NotFast(), req(p.CMD_WRITE_ZEROES, 0, 4096, p.CMD_FLAG_FAST_ZERO)) == [p.ENOTSUP]
    assert run_requests(IOFailure("disk gone"), req(p.CMD_WRITE, 0, 1, payload=b"x")) == [p.EIO]
    assert run_requests(IOFailure("full", errno.ENOSPC), req(p.CMD_TRIM, 0, 4096)) == [p.ENOSPC]
    assert run_requests(OSError(errno.EDQUOT, "quota"), req(p.CMD_WRITE, 0, 1, payload=b"x")) == [p.ENOSPC]
    # A bug in an engine costs the request (EIO), not the connection.
    assert run_requests(ZeroDivisionError(), req(p.CMD_WRITE, 0, 1, payload=b"x"),
                        req(p.CMD_FLUSH, cookie=8)) == [p.EIO, 0]



@settings(max_examples=300, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 0x3F), st.integers(0, 2**64 - 1),
                               st.integers(0, 2**32 - 1)), max_size=6),
       split=st.integers(1, 40))
def test_fuzz_parser_and_checks_stay_in_step(reqs, split):
    """Any sequence of requests, however split, parses back to the same requests, and
    the checks answer each one without raising."""
    session = Session(Export(ExportConfig(image="-"), FailingDevice(None)),
                      p.FLAG_HAS_FLAGS | p.FLAG_SEND_FUA | p.FLAG_SEND_DF, True)
    allowed = allowed_flags(session)
    stream = b""
    expected = []
    for cmd, flags, offset, length in reqs:
        if cmd == p.CMD_WRITE:
            length %= 64
        stream += req(cmd, offset, length, flags, payload=b"w" * length if cmd == p.CMD_WRITE else b"")
        expected.append((cmd, offset, length))
        if cmd == p.CMD_DISC:
            break
    parser = RequestParser()
    got = []
    for i in range(0, len(stream), split):
        got += parser.feed(stream[i:i + split])
    assert [(r.cmd, r.offset, r.length) for r in got] == expected
    for r in got:
        err, _ = check(session, allowed, 1 << 20, r)
        assert err in (0, p.EINVAL, p.ENOSPC, p.EPERM)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=400))
def test_fuzz_request_bytes(data):
    """Arbitrary bytes, split anywhere, parse as from one piece (tests/fuzz/targets.py)."""
    targets.requests(data)
