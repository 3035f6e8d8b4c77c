"""Fuzz targets for the sans-I/O protocol code, shared by the hypothesis tests (default
suite, bounded) and the atheris harness (tests/fuzz/fuzz_nbd.py, for long runs).

Each target takes arbitrary bytes and fails with AssertionError (or lets an unexpected
exception out) when a property breaks; the project's own protocol errors are expected.
"""

import struct

from qnbd.block.null import NullDevice
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from qnbd.nbd.handshake import Close, Handshake, Ready, Send, Session, StartTLS
from qnbd.nbd.catalog import Catalog, transmission_flags
from qnbd.nbd.transmission import (ProtocolError, Request, RequestParser, Transmission,
                                   allowed_flags, check)

MODES = ("off", "on", "require")
OPTIONS = (p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_LIST, p.OPT_STARTTLS, p.OPT_INFO, p.OPT_GO,
           p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT, 4, 99)
NAMES = ("", "secret", "public", "none")
_ERR = 1 << 31


DEVICE_SIZE = 1 << 20


def _device() -> NullDevice:
    """Reads zeros, drops writes: the fuzzed core, not an engine, is under test."""
    return NullDevice(DEVICE_SIZE, read_zeroes=True)


def catalog(tls_only: bool = True) -> Catalog:
    """A TLS-only export first (so it is also the default export) and a public one. (The
    configuration refuses TLS-only exports when TLS is off.)"""
    return Catalog([Export(ExportConfig(image="-", name="secret", tls_only=tls_only), _device()),
                    Export(ExportConfig(image="-", name="public"), _device())])


def client_stream(data: bytes) -> bytes:
    """Bytes -> a client stream with a fair share of well-formed options: a byte with the
    top bit set starts an option (type from OPTIONS, payload from the next bytes or, with
    bit 6, a name-and-queries payload naming one of NAMES); other bytes start raw junk."""
    out = bytearray(struct.pack(">I", data[0] & 3 if data else 3))
    i = 1
    while i < len(data):
        b = data[i]
        if b & 0x80:
            opt = OPTIONS[b % len(OPTIONS)]
            n = data[i + 1] if i + 1 < len(data) else 0
            if b & 0x40:
                name = NAMES[n % len(NAMES)].encode()
                payload = struct.pack(">I", len(name)) + name
                payload += struct.pack(">H", 0) if opt in (p.OPT_INFO, p.OPT_GO) else \
                    struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
                if opt == p.OPT_EXPORT_NAME:
                    payload = name
            else:
                payload = data[i + 2:i + 2 + n % 24]
            out += struct.pack(">QII", p.IHAVEOPT, opt, len(payload)) + payload
            i += 2 + (0 if b & 0x40 else n % 24)
        else:
            out += data[i:i + 1 + b % 16]
            i += 1 + b % 16
    return bytes(out)


def _option_replies(data: bytes):
    """(option, reply type, payload) of a Send made of option replies."""
    pos = 0
    while pos + 20 <= len(data):
        magic, opt, rtype, n = p.OPTION_REPLY.unpack_from(data, pos)
        assert magic == p.OPT_REPLY_MAGIC
        yield opt, rtype, data[pos + 20:pos + 20 + n]
        pos += 20 + n
    assert pos == len(data)


def handshake(data: bytes) -> None:
    """Any client bytes, in any TLS mode, fed in any chunking: only events come out, and
    before STARTTLS the mode's rules hold (proto.md "TLS support"): FORCEDTLS answers
    nothing but ACK (to STARTTLS and ABORT) and TLS_REQD/INVALID, and never enters
    transmission; SELECTIVETLS never names or serves the TLS-only export; NOTLS never
    sends TLS_REQD. After StartTLS the stream is taken as the TLS session's."""
    if not data:
        return
    mode = MODES[data[0] % 3]
    step = 1 + data[0] // 3 % 64
    stream = client_stream(data[1:])
    hs = Handshake(catalog(tls_only=mode != "off"), mode)
    tls = False
    for i in range(0, len(stream), step):
        for event in hs.feed(stream[i:i + step]):
            if isinstance(event, StartTLS):
                assert mode != "off" and not tls
                tls = True
            elif isinstance(event, Ready):
                assert tls or mode != "require"
                assert tls or not event.session.export.tls_only
                return
            elif isinstance(event, Close):
                return
            else:
                assert isinstance(event, Send)
                if event.data[:8] != struct.pack(">Q", p.OPT_REPLY_MAGIC):
                    continue  # the EXPORT_NAME reply, followed by Ready
                for opt, rtype, payload in _option_replies(event.data):
                    if mode == "off" or tls:
                        assert rtype != p.REP_ERR_TLS_REQD
                    elif mode == "require":
                        assert rtype in (p.REP_ERR_TLS_REQD, p.REP_ERR_INVALID) or \
                            (rtype == p.REP_ACK and opt in (p.OPT_STARTTLS, p.OPT_ABORT))
                    elif rtype == p.REP_SERVER:
                        assert payload[4:] != b"secret"
                    elif rtype == p.REP_INFO and payload[:2] == b"\0\1":
                        assert payload[2:] != b"secret"


def _session(extended: bool = False) -> Session:
    export = Export(ExportConfig(image="-"), _device())
    chosen = [(c.id, c) for c in Catalog([export]).contexts(export)]
    return Session(export, transmission_flags(export, True, extended, True), True, chosen,
                   extended)


def _requests_stream(data: bytes, size: int) -> bytes:
    """Make well-formed headers likely: every `size`-byte slot starts with the magic."""
    magic = p.EXTENDED_REQUEST_MAGIC if size == 32 else p.REQUEST_MAGIC
    return b"".join(p.U32.pack(magic) + data[i + 4:i + size] for i in range(0, len(data), size))


def requests(data: bytes) -> None:
    """Any bytes into the request parser, split anywhere: the same requests come out as
    from one piece, or ProtocolError (bad magic) at the same point; the checks answer
    every request with an NBD error from the spec's list."""
    if not data:
        return
    step = 1 + data[0]
    extended = bool(data[0] & 2)
    stream = data[1:]
    if data[0] & 1:
        stream = _requests_stream(stream, 32 if extended else 28)

    def parse(pieces):
        parser = RequestParser(max_payload=64, extended=extended)
        out = []
        try:
            for piece in pieces:
                parser.push(piece)
                out += iter(parser.pop, None)
        except ProtocolError:
            out.append("bad magic")
        return out

    whole = parse([stream])
    split = parse([stream[i:i + step] for i in range(0, len(stream), step)])
    assert whole == split
    session = _session(extended)
    allowed = allowed_flags(session)
    for req in whole:
        if isinstance(req, Request):
            err, _ = check(session, allowed, DEVICE_SIZE, req)
            assert err in (0, p.EINVAL, p.ENOSPC, p.EPERM)


def _replies(raw: bytes, extended: bool) -> list[tuple[int, int, int]]:
    """(cookie, final, error) per reply message; asserts every header is well formed."""
    out, pos = [], 0
    while pos < len(raw):
        magic = p.U32.unpack_from(raw, pos)[0]
        if extended:
            assert magic == p.EXTENDED_REPLY_MAGIC
            _, flags, rtype, cookie, _, n = p.EXT_REPLY.unpack_from(raw, pos)
            pos += p.EXT_REPLY.size
        elif magic == p.SIMPLE_REPLY_MAGIC:
            _, error, cookie = p.SIMPLE_REPLY.unpack_from(raw, pos)
            out.append((cookie, 1, error))
            pos += p.SIMPLE_REPLY.size
            continue
        else:
            assert magic == p.STRUCTURED_REPLY_MAGIC
            _, flags, rtype, cookie, n = p.STRUCTURED_REPLY.unpack_from(raw, pos)
            pos += p.STRUCTURED_REPLY.size
        error = p.U32.unpack_from(raw, pos)[0] if rtype & (1 << 15) else 0
        assert rtype in (p.REPLY_TYPE_NONE, p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE,
                         p.REPLY_TYPE_ERROR,
                         p.REPLY_TYPE_BLOCK_STATUS_EXT if extended else p.REPLY_TYPE_BLOCK_STATUS)
        out.append((cookie, flags & p.REPLY_FLAG_DONE, error))
        pos += n
    assert pos == len(raw)
    return out


def transmission(data: bytes) -> None:
    """Any bytes into a transmission session (compact or extended headers, by the first
    byte), split anywhere: the same reply bytes come out as from one piece (or the same
    hard disconnect), every reply is well formed, errors come from the spec's list, and
    each request gets exactly one final reply."""
    if not data:
        return
    extended = bool(data[0] & 2)
    step = 1 + data[0] // 4
    stream = _requests_stream(data[1:], 32 if extended else 28) if data[0] & 1 else data[1:]

    def run(pieces):
        tx = Transmission(_session(extended), max_request=4096)
        out = []
        try:
            for piece in pieces:
                tx.receive_data(piece)
                out += [bytes(x) for step in iter(tx.next_output, None) for x in step]
        except ProtocolError:
            out.append(b"<disconnect>")
        return out

    whole = run([stream])
    split = run([stream[i:i + step] for i in range(0, len(stream), step)])
    assert b"".join(whole) == b"".join(split)
    raw = b"".join(whole).removesuffix(b"<disconnect>")
    finals = 0
    for cookie, final, error in _replies(raw, extended):
        finals += bool(final)
        assert error in (0, p.EINVAL, p.ENOSPC, p.EPERM, p.EOVERFLOW)
    parser = RequestParser(max_payload=4096, extended=extended)
    try:
        asked = [r for r in parser.feed(stream) if r.cmd != p.CMD_DISC]
    except ProtocolError:
        asked = None
    if asked is not None:
        assert finals == len(asked)
