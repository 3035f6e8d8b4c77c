"""Option haggling: the sans-I/O state machine fed byte strings, then the same rules on the
wire against `qnbd serve` with a raw socket (proto.md "Option types", "Option reply types")."""

import struct
import time

import nbd
import pytest
from hypothesis import given, settings, strategies as st

from fuzz import targets
from nbdserver import RawClient, make_raw, meta_payload
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from qnbd.nbd.handshake import Close, Handshake, Ready, Send
from qnbd.nbd.catalog import Catalog

ERR = 1 << 31


# --- sans-I/O ---

@pytest.fixture
def catalog(tmp_path):
    img = make_raw(tmp_path / "a.raw", 1 << 20)
    exports = [Export.open(ExportConfig(image=img, name="a", description="first", format="raw")),
               Export.open(ExportConfig(image=img, name="b", format="raw", read_only=True))]
    yield Catalog(exports)
    for e in exports:
        e.close()


def option(opt, data=b""):
    return struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data


def replies(events):
    """Decode Send events into (option, reply type, data) triples."""
    raw = b"".join(e.data for e in events if isinstance(e, Send))
    out = []
    while raw:
        magic, opt, rtype, n = struct.unpack_from(">QIII", raw)
        assert magic == p.OPT_REPLY_MAGIC
        out.append((opt, rtype, raw[20:20 + n]))
        raw = raw[20 + n:]
    return out


def go_payload(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def test_greeting_advertises_fixed_newstyle_and_no_zeroes():
    magic, opt, flags = struct.unpack(">QQH", Handshake.greeting)
    assert (magic, opt, flags) == (p.NBDMAGIC, p.IHAVEOPT, 3)


def test_unknown_client_flags_close(catalog):
    events = Handshake(catalog).feed(struct.pack(">I", 4))
    assert isinstance(events[-1], Close)


def test_byte_at_a_time_go_with_info(catalog):
    hs = Handshake(catalog)
    stream = struct.pack(">I", 3) + option(p.OPT_GO, go_payload("a", [p.INFO_NAME, p.INFO_DESCRIPTION]))
    events = []
    for i in range(len(stream)):
        events += hs.feed(stream[i:i + 1])
    assert isinstance(events[-1], Ready)
    got = replies(events)
    assert got[-1][1] == p.REP_ACK
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for _, t, d in got if t == p.REP_INFO}
    size, flags = struct.unpack(">QH", infos[p.INFO_EXPORT])
    assert size == 1 << 20 and flags & p.FLAG_HAS_FLAGS and not flags & p.FLAG_READ_ONLY
    assert infos[p.INFO_NAME] == b"a" and infos[p.INFO_DESCRIPTION] == b"first"
    assert struct.unpack(">III", infos[p.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)


def test_go_then_leftover_bytes_belong_to_transmission(catalog):
    hs = Handshake(catalog)
    events = hs.feed(struct.pack(">I", 1) + option(p.OPT_GO, go_payload("b")) + b"REQ")
    ready = events[-1]
    assert isinstance(ready, Ready) and ready.leftover == b"REQ"
    assert ready.session.flags & p.FLAG_READ_ONLY and ready.session.export.name == "b"


@pytest.mark.parametrize("payload", [
    b"\0\0\0", go_payload("a")[:-1], go_payload("a") + b"x",
    struct.pack(">I", 100) + b"a" + struct.pack(">H", 0),
    go_payload("a", [1])[:-4] + struct.pack(">HH", 2, 1),
])
def test_malformed_go_is_invalid_and_session_continues(catalog, payload):
    hs = Handshake(catalog)
    events = hs.feed(struct.pack(">I", 1) + option(p.OPT_GO, payload) + option(p.OPT_GO, go_payload("a")))
    got = replies(events)
    assert got[0][1] == p.REP_ERR_INVALID
    assert isinstance(events[-1], Ready)


def test_meta_context_rules(catalog):
    hs = Handshake(catalog)
    ev = hs.feed(struct.pack(">I", 1) + option(p.OPT_SET_META_CONTEXT, meta_payload("a", ["base:allocation"])))
    assert replies(ev)[0][1] == p.REP_ERR_INVALID  # structured replies first
    ev = hs.feed(option(p.OPT_LIST_META_CONTEXT, meta_payload("a", [])))
    assert replies(ev)[-1][1] == p.REP_ACK  # ... but listing is allowed without them
    ev = hs.feed(option(p.OPT_STRUCTURED_REPLY))
    assert replies(ev)[0][1] == p.REP_ACK
    ev = hs.feed(option(p.OPT_STRUCTURED_REPLY))
    assert replies(ev)[0][1] == p.REP_ERR_INVALID  # already negotiated
    ev = hs.feed(option(p.OPT_LIST_META_CONTEXT, meta_payload("a", [])))
    assert [(t, d[4:]) for _, t, d in replies(ev)] == [(p.REP_META_CONTEXT, b"base:allocation"), (p.REP_ACK, b"")]
    ev = hs.feed(option(p.OPT_LIST_META_CONTEXT, meta_payload("a", ["base:", "other:x"])))
    assert [t for _, t, _ in replies(ev)] == [p.REP_META_CONTEXT, p.REP_ACK]
    # SET ignores the wildcard and unknown names; selects the exact one.
    ev = hs.feed(option(p.OPT_SET_META_CONTEXT, meta_payload("a", ["base:", "x-foo:bar", "base:allocation"])))
    got = replies(ev)
    assert [t for _, t, _ in got] == [p.REP_META_CONTEXT, p.REP_ACK]
    ev = hs.feed(option(p.OPT_SET_META_CONTEXT, meta_payload("nope", ["base:allocation"])))
    assert replies(ev)[0][1] == p.REP_ERR_UNKNOWN
    # The failed SET cleared the selection: GO gets no contexts.
    ev = hs.feed(option(p.OPT_GO, go_payload("a")))
    assert ev[-1].session.contexts == []


def test_contexts_dropped_when_go_names_another_export(catalog):
    hs = Handshake(catalog)
    ev = hs.feed(struct.pack(">I", 1) + option(p.OPT_STRUCTURED_REPLY)
                 + option(p.OPT_SET_META_CONTEXT, meta_payload("a", ["base:allocation"]))
                 + option(p.OPT_GO, go_payload("b")))
    assert ev[-1].session.contexts == [] and ev[-1].session.structured


def test_export_name_unknown_disconnects_known_enters(catalog):
    ev = Handshake(catalog).feed(struct.pack(">I", 1) + option(p.OPT_EXPORT_NAME, b"zzz"))
    assert isinstance(ev[-1], Close)
    ev = Handshake(catalog).feed(struct.pack(">I", 1) + option(p.OPT_EXPORT_NAME, b""))
    assert isinstance(ev[-1], Ready) and ev[-1].session.export.name == "a"  # default export
    assert len(ev[0].data) == 10 + 124  # no NO_ZEROES: padding sent
    ev = Handshake(catalog).feed(struct.pack(">I", 3) + option(p.OPT_EXPORT_NAME, b"b"))
    assert len(ev[0].data) == 10


def test_oversize_option_skipped_unread(catalog):
    hs = Handshake(catalog)
    big = 1 << 20
    ev = hs.feed(struct.pack(">I", 1) + struct.pack(">QII", p.IHAVEOPT, 99, big))
    assert ev == []
    ev = hs.feed(bytes(big) + option(p.OPT_LIST))
    got = replies(ev)
    assert got[0][1] == p.REP_ERR_TOO_BIG
    assert [t for _, t, _ in got[1:]] == [p.REP_SERVER, p.REP_SERVER, p.REP_ACK]


def test_non_fixed_newstyle_allows_only_export_name(catalog):
    ev = Handshake(catalog).feed(struct.pack(">I", 0) + option(p.OPT_LIST))
    assert isinstance(ev[-1], Close)


# --- on the wire, against qnbd serve ---

@pytest.fixture
def server(tmp_path, serve):
    img = make_raw(tmp_path / "disk.raw", 1 << 20)
    return serve(img, "-f", "raw", "-x", "disk", "-D", "a test disk", "-e", "0",
                 "--handshake-timeout", "1")


def test_unknown_option_unsupported_with_payload_consumed(server):
    c = RawClient(server.sock)
    c.greeting()
    c.send_option(1234, b"x" * 1000)
    assert c.option_replies()[-1][0] == ERR | 1
    c.send_option(3)  # LIST still works: the payload did not desync the stream
    got = c.option_replies()
    assert got[0][0] == 2 and got[0][1] == struct.pack(">I", 4) + b"disk" + b"a test disk"
    assert got[-1][0] == 1


@pytest.mark.parametrize("opt", [3, 5, 8])
def test_options_without_data_refuse_data(server, opt):
    c = RawClient(server.sock)
    c.greeting()
    c.send_option(opt, b"junk")
    assert c.option_replies()[-1][0] == ERR | 3


def test_starttls_refused_by_policy(server):
    c = RawClient(server.sock)
    c.greeting()
    c.send_option(5)
    rtype, msg = c.option_replies()[-1]
    assert rtype == ERR | 2 and b"TLS" in msg


def test_abort_acked_then_closed(server):
    c = RawClient(server.sock)
    c.greeting()
    c.send_option(2)
    assert c.option_replies() == [(1, b"")]
    assert c.closed_by_server()


def test_info_and_go_unknown_export(server):
    c = RawClient(server.sock)
    c.greeting()
    for opt in (6, 7):
        c.send_option(opt, go_payload("nope"))
        assert c.option_replies()[-1][0] == ERR | 6
    c.send_option(1, b"nope")  # EXPORT_NAME cannot report errors: hard disconnect
    assert c.closed_by_server()


def test_unknown_client_flags_disconnect(server):
    c = RawClient(server.sock)
    c.greeting(client_flags=0x80)
    assert c.closed_by_server()


def test_export_name_without_no_zeroes_gets_padding(server):
    c = RawClient(server.sock)
    c.greeting(client_flags=1)
    c.send_option(1, b"disk")
    size, flags = struct.unpack(">QH", c.recv(10))
    assert size == 1 << 20 and c.recv(124) == bytes(124)


def test_stalled_handshake_is_cut_off(server):
    stalled = RawClient(server.sock)
    start = time.monotonic()
    stalled.recv(18)  # greeting, then nothing from us
    assert stalled.closed_by_server()
    assert time.monotonic() - start < 5
    # ... and the server still serves others.
    h = nbd.NBD()
    h.connect_uri(server.uri_for("disk"))
    assert h.get_size() == 1 << 20


def test_libnbd_opt_mode_list_info_and_contexts(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri_for("disk"))
    names = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    assert names == [("disk", "a test disk")]
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert ctxs == ["base:allocation"]
    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("disk")
    h.set_full_info(True)
    h.opt_info()
    assert h.get_size() == 1 << 20
    assert h.get_export_description() == "a test disk"
    assert h.get_canonical_export_name() == "disk"
    h.opt_go()
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
    assert h.can_meta_context("base:allocation")


def test_libnbd_without_structured_replies(server):
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(server.uri_for("disk"))
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    h.pwrite(b"abc", 100)
    assert h.pread(3, 100) == b"abc"


# --- fuzzing the sans-I/O core: arbitrary bytes never raise, only close ---


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8), flags=st.integers(0, 3))
def test_fuzz_handshake_never_raises(tmp_path_factory, chunks, flags):
    img = make_raw(tmp_path_factory.mktemp("fz") / "a.raw", 4096)
    catalog = Catalog([Export(ExportConfig(image=img, name="a"), _NullDevice())])
    hs = Handshake(catalog)
    stream = struct.pack(">I", flags)
    for chunk in chunks:
        # Give every chunk a chance of being a well-formed option header.
        stream += option(chunk[0] % 12, chunk[1:]) if chunk and chunk[0] & 0x80 else chunk
    for event in hs.feed(stream):
        assert isinstance(event, (Send, Close, Ready))


class _NullDevice:
    size = 4096
    read_only = False
    supports_fast_zero = False


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=400))
def test_fuzz_handshake_tls_modes(data):
    """The three TLS modes' rules hold for any client bytes (tests/fuzz/targets.py, also
    run by the atheris harness)."""
    targets.handshake(data)
