"""The transmission core, sans-I/O: request bytes and an export in, reply bytes out, for
both header forms (compact, and extended from extension-ext-header proto.md), the three
reply forms, large requests and the block status payload filter. No sockets."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from fuzz import targets
from qnbd.block.base import HOLE, ZERO, Extent
from qnbd.errors import IOFailure
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from qnbd.nbd.catalog import Catalog, transmission_flags
from qnbd.nbd.handshake import Close, Handshake, Ready, Send, Session
from qnbd.nbd.requests import ProtocolError
from qnbd.nbd.transmission import STREAM_CHUNK, Transmission

MiB = 1 << 20
SIZE = 8 << 30   # large enough for 64-bit effect lengths; nothing is allocated


class MemDevice:
    """A sparse device: the first `data_end` bytes hold data (offset & 0xFF), the rest
    reads as zeros and reports HOLE|ZERO. Records what it was asked."""
    read_only = False
    supports_fast_zero = True

    def __init__(self, size=SIZE, data_end=16 * MiB, fail_at=None):
        self.size = size
        self.data_end = data_end
        self.fail_at = fail_at
        self.calls = []

    def read(self, offset, length):
        self.calls.append(("read", offset, length))
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise IOFailure("bad sector")
        return bytes((offset + i) & 0xFF if offset + i < self.data_end else 0
                     for i in range(min(length, 64))) + bytes(max(0, length - 64))

    def block_status(self, offset, length):
        if offset < self.data_end:
            return [Extent(min(length, self.data_end - offset), 0, 1)]
        return [Extent(length, HOLE | ZERO, 0)]

    def write(self, offset, data, fua=False):
        self.calls.append(("write", offset, len(data)))

    def write_zeroes(self, offset, length, may_trim=False, fast=False, fua=False):
        self.calls.append(("zero", offset, length))

    def discard(self, offset, length, fua=False):
        self.calls.append(("trim", offset, length))

    def flush(self):
        self.calls.append(("flush",))


def session(structured=False, extended=False, device=None, contexts=True, **cfg):
    export = Export(ExportConfig(image="-", discard="unmap", **cfg), device or MemDevice())
    ctx = Catalog([export]).contexts(export)[:1] if contexts else []
    chosen = [(c.id, c) for c in ctx]
    flags = transmission_flags(export, structured, extended, bool(chosen))
    return Session(export, flags, structured or extended, chosen, extended)


def compact(cmd, offset=0, length=0, flags=0, cookie=7, payload=b""):
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def extended(cmd, offset=0, length=0, flags=0, cookie=7, payload=b""):
    return struct.pack(">IHHQQQ", p.EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset,
                       length) + payload


def run(sess, stream: bytes, max_request=64 * MiB):
    tx = Transmission(sess, max_request)
    tx.receive_data(stream)
    steps = list(iter(tx.next_output, None))
    return tx, steps, b"".join(bytes(piece) for out in steps for piece in out)


def ext_replies(raw: bytes):
    """(flags, type, cookie, offset, payload) of each extended reply."""
    out, pos = [], 0
    while pos < len(raw):
        magic, flags, rtype, cookie, offset, n = p.EXT_REPLY.unpack_from(raw, pos)
        assert magic == p.EXTENDED_REPLY_MAGIC
        out.append((flags, rtype, cookie, offset, raw[pos + 32:pos + 32 + n]))
        pos += 32 + n
    return out


def chunk_replies(raw: bytes):
    """Simple replies as (None, error, cookie) and structured chunks as
    (flags, type, cookie, payload)."""
    out, pos = [], 0
    while pos < len(raw):
        magic = struct.unpack_from(">I", raw, pos)[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            out.append((None,) + struct.unpack_from(">IQ", raw, pos + 4))
            pos += 16
            continue
        _, flags, ctype, cookie, n = p.STRUCTURED_REPLY.unpack_from(raw, pos)
        out.append((flags, ctype, cookie, raw[pos + 20:pos + 20 + n]))
        pos += 20 + n
    return out


# --- extended headers ---

def test_extended_write_read_and_every_reply_is_extended():
    dev = MemDevice()
    sess = session(extended=True, device=dev)
    stream = (extended(p.CMD_WRITE, 4096, 3, p.CMD_FLAG_PAYLOAD_LEN, cookie=1, payload=b"abc")
              + extended(p.CMD_READ, 100, 4, cookie=2)
              + extended(p.CMD_FLUSH, cookie=3) + extended(p.CMD_DISC, cookie=4))
    tx, _, raw = run(sess, stream)
    r = ext_replies(raw)
    assert [(x[1], x[2], x[3]) for x in r] == [
        (p.REPLY_TYPE_NONE, 1, 4096),
        (p.REPLY_TYPE_OFFSET_DATA, 2, 100),    # header offset echoes the request's
        (p.REPLY_TYPE_NONE, 3, 0)]
    assert all(x[0] & p.REPLY_FLAG_DONE for x in r)
    assert r[1][4] == struct.pack(">Q", 100) + bytes([100, 101, 102, 103])
    assert ("write", 4096, 3) in dev.calls and tx.finished


def test_extended_64bit_effect_lengths():
    dev = MemDevice()
    sess = session(extended=True, device=dev)
    five = 5 << 30
    _, _, raw = run(sess, extended(p.CMD_WRITE_ZEROES, 0, five, cookie=1)
                    + extended(p.CMD_TRIM, 0, five, cookie=2)
                    + extended(p.CMD_CACHE, 0, five, cookie=3)
                    + extended(p.CMD_WRITE_ZEROES, SIZE - 1, 2, cookie=4))
    r = ext_replies(raw)
    assert [(x[1], x[2]) for x in r[:3]] == [(p.REPLY_TYPE_NONE, c) for c in (1, 2, 3)]
    assert ("zero", 0, five) in dev.calls and ("trim", 0, five) in dev.calls
    assert r[3][1] == p.REPLY_TYPE_ERROR and struct.unpack(">I", r[3][4][:4])[0] == p.ENOSPC


def test_extended_block_status_ext_chunk_with_64bit_descriptors():
    sess = session(extended=True)
    _, _, raw = run(sess, extended(p.CMD_BLOCK_STATUS, 0, 6 << 30, cookie=9))
    (flags, rtype, cookie, offset, payload), = ext_replies(raw)
    assert rtype == p.REPLY_TYPE_BLOCK_STATUS_EXT and flags & p.REPLY_FLAG_DONE
    cid, count = struct.unpack_from(">II", payload)
    assert (cid, count) == (1, 2) and len(payload) == 8 + 16 * count
    assert struct.unpack_from(">QQQQ", payload, 8) == (16 * MiB, 0, (6 << 30) - 16 * MiB,
                                                       HOLE | ZERO)


def test_extended_write_without_payload_len_and_unexpected_payloads():
    """A WRITE carries its data with or without the flag (qemu 10's client leaves it out);
    a payload on a command that takes none is consumed and refused."""
    dev = MemDevice()
    sess = session(extended=True, device=dev)
    _, _, raw = run(sess, extended(p.CMD_WRITE, 0, 3, cookie=1, payload=b"abc")
                    + extended(p.CMD_TRIM, 0, 5, p.CMD_FLAG_PAYLOAD_LEN, cookie=2,
                               payload=b"12345")
                    + extended(p.CMD_FLUSH, cookie=3))
    r = ext_replies(raw)
    assert [(x[1], x[2]) for x in r] == [(p.REPLY_TYPE_NONE, 1), (p.REPLY_TYPE_ERROR, 2),
                                         (p.REPLY_TYPE_NONE, 3)]
    assert struct.unpack(">I", r[1][4][:4])[0] == p.EINVAL and ("write", 0, 3) in dev.calls


def test_block_status_payload_filter():
    export = Export(ExportConfig(image="-", allocation_depth=True), MemDevice())
    ctxs = Catalog([export]).contexts(export)
    chosen = [(c.id, c) for c in ctxs]
    flags = transmission_flags(export, True, True, True)
    assert flags & p.FLAG_BLOCK_STATUS_PAYLOAD
    sess = Session(export, flags, True, chosen, True)

    def status(ids, effect=MiB, cookie=1):
        body = struct.pack(">Q", effect) + b"".join(struct.pack(">I", i) for i in ids)
        return extended(p.CMD_BLOCK_STATUS, 0, len(body), p.CMD_FLAG_PAYLOAD_LEN,
                        cookie=cookie, payload=body)
    _, _, raw = run(sess, status([2]) + status([2, 2], cookie=2) + status([9], cookie=3)
                    + status([1, 2], cookie=4) + status([], cookie=5)
                    + status([1], effect=SIZE + 1, cookie=6))
    r = ext_replies(raw)
    by_cookie = {}
    for x in r:
        by_cookie.setdefault(x[2], []).append(x)
    only = by_cookie[1]
    assert len(only) == 1 and struct.unpack_from(">I", only[0][4])[0] == 2
    assert struct.unpack_from(">QQ", only[0][4], 8) == (MiB, 1)   # depth 1, whole effect
    for bad in (2, 3, 5, 6):
        (x,) = by_cookie[bad]
        assert x[1] == p.REPLY_TYPE_ERROR and struct.unpack(">I", x[4][:4])[0] == p.EINVAL
    assert [struct.unpack_from(">I", x[4])[0] for x in by_cookie[4]] == [1, 2]


def test_block_status_payload_needs_the_flag_advertised():
    sess = session(extended=True, contexts=False)
    assert not sess.flags & p.FLAG_BLOCK_STATUS_PAYLOAD
    body = struct.pack(">QI", 512, 1)
    _, _, raw = run(sess, extended(p.CMD_BLOCK_STATUS, 0, len(body), p.CMD_FLAG_PAYLOAD_LEN,
                                   payload=body) + extended(p.CMD_FLUSH, cookie=8))
    r = ext_replies(raw)
    assert [(x[1], x[2]) for x in r] == [(p.REPLY_TYPE_ERROR, 7), (p.REPLY_TYPE_NONE, 8)]


def test_extended_oversize_payload_skipped_and_absurd_one_disconnects():
    sess = session(extended=True)
    tx = Transmission(sess, max_request=64)
    tx.receive_data(extended(p.CMD_WRITE, 0, 100, p.CMD_FLAG_PAYLOAD_LEN, cookie=1,
                             payload=b"x" * 60))
    (err,) = ext_replies(b"".join(tx.next_output()))
    assert struct.unpack(">I", err[4][:4])[0] == p.EINVAL
    tx.receive_data(b"x" * 40 + extended(p.CMD_FLUSH, cookie=2))
    assert ext_replies(b"".join(tx.next_output()))[0][1:3] == (p.REPLY_TYPE_NONE, 2)
    tx.receive_data(extended(p.CMD_WRITE, 0, 1 << 40, p.CMD_FLAG_PAYLOAD_LEN))
    with pytest.raises(ProtocolError):
        tx.next_output()


def test_compact_magic_in_an_extended_session_is_a_protocol_error():
    tx = Transmission(session(extended=True))
    tx.receive_data(compact(p.CMD_READ, 0, 1) + bytes(4))
    with pytest.raises(ProtocolError):
        tx.next_output()


# --- large requests ---

@pytest.mark.parametrize("structured", [False, True])
def test_large_read_streams_in_bounded_steps(structured):
    dev = MemDevice(data_end=SIZE)
    sess = session(structured=structured, device=dev)
    n = 64 * MiB
    _, steps, raw = run(sess, compact(p.CMD_READ, 0, n, cookie=5))
    assert len(steps) == n // STREAM_CHUNK
    assert all(sum(len(x) for x in out) <= STREAM_CHUNK + 64 for out in steps)
    assert max(c[2] for c in dev.calls if c[0] == "read") == STREAM_CHUNK
    if structured:
        chunks = chunk_replies(raw)
        assert all(c[1] == p.REPLY_TYPE_OFFSET_DATA for c in chunks)
        assert [c[0] & p.REPLY_FLAG_DONE for c in chunks] == [0] * (len(chunks) - 1) + [1]
        assert sum(len(c[3]) - 8 for c in chunks) == n
    else:
        assert raw[:16] == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 5)
        assert len(raw) == 16 + n and raw[16:20] == bytes([0, 1, 2, 3])


def test_df_read_is_one_chunk_even_when_streamed():
    dev = MemDevice(data_end=SIZE)
    sess = session(structured=True, device=dev)
    _, steps, raw = run(sess, compact(p.CMD_READ, 0, 48 * MiB, p.CMD_FLAG_DF))
    (flags, ctype, cookie, payload), = chunk_replies(raw)
    assert ctype == p.REPLY_TYPE_OFFSET_DATA and len(payload) == 8 + 48 * MiB and len(steps) == 12


def test_failure_midway_through_a_streamed_read():
    """Structured: an error chunk ends the reply. Simple (or DF): the header announced
    every byte, so only a hard disconnect is left (proto.md "Simple reply message")."""
    sess = session(structured=True, device=MemDevice(data_end=SIZE, fail_at=20 * MiB))
    tx, steps, raw = run(sess, compact(p.CMD_READ, 0, 32 * MiB, cookie=3) + compact(p.CMD_FLUSH, cookie=4))
    chunks = chunk_replies(raw)
    assert chunks[-2][1] == p.REPLY_TYPE_ERROR and chunks[-2][0] & p.REPLY_FLAG_DONE
    assert chunks[-1] == (None, 0, 4)
    tx = Transmission(session(device=MemDevice(data_end=SIZE, fail_at=20 * MiB)))
    tx.receive_data(compact(p.CMD_READ, 0, 32 * MiB))
    with pytest.raises(ProtocolError):
        while tx.next_output() is not None:
            pass


def test_large_write_is_received_in_place_and_oversize_is_skipped():
    dev = MemDevice()
    sess = session(device=dev)
    tx = Transmission(sess)
    n = 48 * MiB
    tx.receive_data(compact(p.CMD_WRITE, 0, n, cookie=1) + b"\1" * MiB)
    assert tx.next_output() is None and tx.backlog == 0   # the payload is not buffered twice
    for _ in range(47):
        tx.receive_data(b"\1" * MiB)
    assert chunk_replies(b"".join(tx.next_output())) == [(None, 0, 1)]
    assert ("write", 0, n) in dev.calls
    big = 64 * MiB + 1
    tx.receive_data(compact(p.CMD_WRITE, 0, big, cookie=2))
    assert chunk_replies(b"".join(tx.next_output())) == [(None, p.EINVAL, 2)]
    for _ in range(64):
        tx.receive_data(b"\2" * MiB)
        assert tx.backlog == 0
    tx.receive_data(b"\2" + compact(p.CMD_FLUSH, cookie=3))
    assert chunk_replies(b"".join(tx.next_output())) == [(None, 0, 3)]


def test_write_payload_received_straight_into_its_buffer():
    """The I/O side may receive the rest of a WRITE's payload into payload_buffer() (the
    socket reads into it: no copy through receive_data); a skipped oversize payload and
    request headers have none."""
    dev = MemDevice()
    written = []
    dev.write = lambda offset, data, fua=False: written.append((offset, bytes(data)))
    tx = Transmission(session(device=dev))
    assert tx.payload_buffer() is None
    n = 3 * MiB
    data = bytes(range(256)) * (n // 256)
    tx.receive_data(compact(p.CMD_WRITE, 4096, n, cookie=1) + data[:1000])
    assert tx.next_output() is None
    got = 1000
    while (view := tx.payload_buffer()) is not None:
        k = min(len(view), 300000)
        view[:k] = data[got:got + k]
        tx.payload_received(k)
        got += k
    assert got == n and tx.backlog == 0
    assert chunk_replies(b"".join(tx.next_output())) == [(None, 0, 1)]
    assert written == [(4096, data)]
    tx.receive_data(compact(p.CMD_WRITE, 0, 64 * MiB + 1, cookie=2))
    assert tx.payload_buffer() is None   # skipped, not kept


# --- handshake: NBD_OPT_EXTENDED_HEADERS ---

def option(opt, data=b""):
    return struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data


def option_types(events):
    raw = b"".join(e.data for e in events if isinstance(e, Send))
    out = []
    while raw:
        _, opt, rtype, n = struct.unpack_from(">QIII", raw)
        out.append((opt, rtype))
        raw = raw[20 + n:]
    return out


def go(name=b""):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


@pytest.fixture
def catalog():
    return Catalog([Export(ExportConfig(image="-", name=""), MemDevice())])


def test_extended_headers_negotiation_rules(catalog):
    hs = Handshake(catalog)
    meta = struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"
    ev = hs.feed(struct.pack(">I", 3) + option(p.OPT_EXTENDED_HEADERS, b"x")
                 + option(p.OPT_EXTENDED_HEADERS) + option(p.OPT_EXTENDED_HEADERS)
                 + option(p.OPT_STRUCTURED_REPLY) + option(p.OPT_SET_META_CONTEXT, meta)
                 + option(p.OPT_GO, go()))
    types = option_types(ev)
    assert types[:4] == [(p.OPT_EXTENDED_HEADERS, p.REP_ERR_INVALID),
                         (p.OPT_EXTENDED_HEADERS, p.REP_ACK),
                         (p.OPT_EXTENDED_HEADERS, p.REP_ERR_INVALID),     # second request
                         (p.OPT_STRUCTURED_REPLY, p.REP_ERR_EXT_HEADER_REQD)]
    ready = ev[-1]
    assert isinstance(ready, Ready) and ready.session.extended and ready.session.structured
    assert ready.session.flags & p.FLAG_BLOCK_STATUS_PAYLOAD
    assert ready.session.contexts and ready.session.flags & p.FLAG_SEND_DF


def test_extended_after_structured_and_export_name_refused(catalog):
    hs = Handshake(catalog)
    ev = hs.feed(struct.pack(">I", 3) + option(p.OPT_STRUCTURED_REPLY)
                 + option(p.OPT_EXTENDED_HEADERS) + option(p.OPT_EXPORT_NAME))
    assert option_types(ev) == [(p.OPT_STRUCTURED_REPLY, p.REP_ACK),
                                (p.OPT_EXTENDED_HEADERS, p.REP_ACK)]
    assert isinstance(ev[-1], Close)


def test_no_block_status_payload_flag_without_extended_headers(catalog):
    hs = Handshake(catalog)
    meta = struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"
    ev = hs.feed(struct.pack(">I", 3) + option(p.OPT_STRUCTURED_REPLY)
                 + option(p.OPT_SET_META_CONTEXT, meta) + option(p.OPT_GO, go()))
    session = ev[-1].session
    assert not session.extended and not session.flags & p.FLAG_BLOCK_STATUS_PAYLOAD


def test_info_offers_block_status_payload_before_contexts_as_qemu_nbd(catalog):
    """qemu-nbd's INFO reply sets NBD_FLAG_BLOCK_STAT_PAYLOAD with extended headers even
    before SET_META_CONTEXT (the client may choose contexts before GO); GO without
    contexts does not."""
    hs = Handshake(catalog)
    ev = hs.feed(struct.pack(">I", 3) + option(p.OPT_EXTENDED_HEADERS)
                 + option(p.OPT_INFO, go()) + option(p.OPT_GO, go()))
    raw = b"".join(e.data for e in ev if isinstance(e, Send))
    flags = []
    while raw:
        _, opt, rtype, n = struct.unpack_from(">QIII", raw)
        body = raw[20:20 + n]
        if rtype == p.REP_INFO and struct.unpack_from(">H", body)[0] == p.INFO_EXPORT:
            flags.append((opt, p.INFO_EXPORT_PAYLOAD.unpack(body)[2]
                          & p.FLAG_BLOCK_STATUS_PAYLOAD))
        raw = raw[20 + n:]
    assert flags == [(p.OPT_INFO, p.FLAG_BLOCK_STATUS_PAYLOAD), (p.OPT_GO, 0)]
    assert not ev[-1].session.flags & p.FLAG_BLOCK_STATUS_PAYLOAD


# --- properties ---

@settings(max_examples=200, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 8), st.sampled_from([0, 1, 8, 32, 33]),
                               st.integers(0, SIZE), st.integers(0, 2**40)), max_size=6),
       split=st.integers(1, 50), ext=st.booleans())
def test_any_requests_in_any_split_give_the_same_replies(reqs, split, ext):
    """Both header forms: however the stream is cut, the replies are byte-identical, and
    each request gets exactly one final reply."""
    stream = b""
    for cmd, flags, offset, length in reqs:
        if cmd == p.CMD_WRITE or (ext and flags & p.CMD_FLAG_PAYLOAD_LEN):
            length %= 100
            payload = b"w" * length
        else:
            payload = b""
        stream += (extended if ext else compact)(cmd, offset, length % (1 << 32), flags,
                                                  payload=payload)
    sess = session(structured=True, extended=ext)
    _, _, whole = run(sess, stream)
    tx = Transmission(sess)
    pieces = []
    for i in range(0, len(stream), split):
        tx.receive_data(stream[i:i + split])
        pieces += [bytes(x) for out in iter(tx.next_output, None) for x in out]
    assert b"".join(pieces) == whole
    replies = ext_replies(whole) if ext else chunk_replies(whole)
    finals = [r for r in replies if r[0] is None or r[0] & p.REPLY_FLAG_DONE]
    expected = len(reqs)
    for i, (cmd, *_rest) in enumerate(reqs):
        if cmd == p.CMD_DISC:
            expected = i   # DISC has no reply, and nothing after it is read
            break
    assert len(finals) == expected


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_fuzz_extended_transmission(data):
    """Arbitrary bytes into an extended-header session (tests/fuzz/targets.py)."""
    targets.transmission(data)
