"""The control socket's wire format, sans-I/O (qnbd/control/protocol.py): every request
checked before it runs, every refusal one line with a code, lines bounded."""

import json

import pytest

from qnbd.control import protocol as cp


@pytest.mark.parametrize("line, code", [
    (b"", cp.BAD_JSON),
    (b"{", cp.BAD_JSON),
    (b"\xff", cp.BAD_JSON),
    (b"[" * 60000, cp.BAD_JSON),            # deeper than the decoder recurses
    (b"3", cp.BAD_REQUEST),
    (b'{"command": 3}', cp.BAD_REQUEST),
    (b'{"command": "exports", "extra": 1}', cp.BAD_REQUEST),
    (b'{"command": "exports", "id": [1]}', cp.BAD_REQUEST),
    (b'{"command": "exports", "args": []}', cp.BAD_REQUEST),
    (b'{"command": "nope"}', cp.UNKNOWN_COMMAND),
    (b'{"command": "bitmap-add", "args": {"export": "d"}}', cp.BAD_REQUEST),
    (b'{"command": "bitmap-add", "args": {"export": "d", "name": 1}}', cp.BAD_REQUEST),
    (b'{"command": "bitmap-add", "args": {"export": "d", "name": "b", "granularity": 1.5}}',
     cp.BAD_REQUEST),
    (b'{"command": "bitmap-add", "args": {"export": "d", "name": "b", "disabled": 1}}',
     cp.BAD_REQUEST),
    (b'{"command": "bitmap-merge", "args": {"export": "d", "name": "b", "sources": []}}',
     cp.BAD_REQUEST),
    (b'{"command": "bitmap-merge", "args": {"export": "d", "name": "b", "sources": [1]}}',
     cp.BAD_REQUEST),
    (b'{"command": "checkpoint", "args": {"export": "d", "name": "c", "bitmap": null}}',
     cp.BAD_REQUEST),
])
def test_bad_requests_are_refused_with_their_code(line, code):
    with pytest.raises(cp.ControlError) as e:
        cp.parse(line)
    assert e.value.code == code
    reply = cp.error(e.value.code, e.value.message, getattr(e.value, "id", None))
    assert reply.count(b"\n") == 1 and json.loads(reply)["error"]["code"] == code


def test_good_requests_and_ids():
    r = cp.parse(b'{"command": "bitmap-add", "args": {"export": "", "name": "b", '
                 b'"granularity": 65536, "disabled": true}, "id": "x"}\n')
    assert (r.command, r.args["granularity"], r.id) == ("bitmap-add", 65536, "x")
    assert json.loads(cp.ok([1], "x")) == {"ok": True, "result": [1], "id": "x"}
    with pytest.raises(cp.ControlError) as e:
        cp.parse(b'{"command": "nope", "id": 9}')
    assert e.value.id == 9
    # Names with control characters cannot break the reply's line.
    assert cp.ok({"name": "a\nb\u2028"}).count(b"\n") == 1


def test_lines_are_bounded_and_split_reads_are_joined():
    buf = cp.LineBuffer(limit=16)
    assert buf.feed(b'{"comm') == []
    assert buf.feed(b'and"}\n\n  \n{"a"') == [b'{"command"}']
    out = buf.feed(b"x" * 40)            # past the limit, no newline yet
    assert [e.code for e in out] == [cp.LINE_TOO_LONG]
    assert buf.feed(b"y" * 40) == []     # the rest of the long line: skipped, once
    assert buf.feed(b"z\n[]\n") == [b"[]"]
    assert len(buf.buf) == 0
    out = buf.feed(b"q" * 17 + b"\n")    # too long though complete
    assert [e.code for e in out] == [cp.LINE_TOO_LONG]
