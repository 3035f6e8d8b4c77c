"""The transmission phase, sans-I/O (proto.md "Transmission", "Request types").

`RequestParser.feed(bytes)` turns the client's byte stream into `Request`s, keeping the
stream in step even for requests it refuses: an oversize write's payload is skipped, not
buffered. `check()` applies the spec's error rules to a request before any block call, and
the `*_reply` functions encode simple replies and structured reply chunks. The caller (the
server) performs the block calls in between.
"""

from typing import NamedTuple

from . import protocol as p
from .handshake import Session

_REQ = p.REQUEST
_REQ_SIZE = p.REQUEST.size
_SIMPLE = p.SIMPLE_REPLY
_CHUNK = p.STRUCTURED_REPLY


class ProtocolError(Exception):
    """The stream cannot be understood any more (bad magic): hard disconnect."""


class Request(NamedTuple):
    cookie: int
    cmd: int
    flags: int
    offset: int
    length: int
    payload: bytes | None   # WRITE data; None for an oversize write whose data was skipped


class RequestParser:
    """Requests are taken one at a time (`pop`), so the server can stop taking them while
    its replies wait to be sent: unparsed bytes stay here, and reading is paused."""

    def __init__(self, max_payload: int = p.MAX_PAYLOAD):
        self.max_payload = max_payload
        self.buf = bytearray()
        self.pos = 0             # start of the first unparsed byte in buf
        self.skip = 0            # payload bytes of a refused write still to discard
        self.disconnected = False

    def push(self, data) -> None:
        self.buf += data

    def feed(self, data) -> list[Request]:
        """push(data), then every complete request."""
        self.push(data)
        return list(iter(self.pop, None))

    def pop(self) -> Request | None:
        """The next complete request, or None until more bytes arrive. Nothing is parsed
        after NBD_CMD_DISC: "A client MUST NOT send anything ... after" it."""
        buf = self.buf
        pos = self.pos
        end = len(buf)
        if self.skip:
            n = min(self.skip, end - pos)
            pos += n
            self.skip -= n
        if self.disconnected or end - pos < _REQ_SIZE:
            return self._wait(pos)
        magic, flags, cmd, cookie, offset, length = _REQ.unpack_from(buf, pos)
        if magic != p.REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        payload = None
        if cmd == p.CMD_WRITE:
            start = pos + _REQ_SIZE
            if length > self.max_payload:
                n = min(length, end - start)
                self.skip = length - n
                self.pos = start + n
                return Request(cookie, cmd, flags, offset, length, None)
            if end - start < length:
                return self._wait(pos)
            with memoryview(buf) as view:  # one copy, released before buf shrinks
                payload = bytes(view[start:start + length])
            pos = start + length
        else:
            pos += _REQ_SIZE
            if cmd == p.CMD_DISC:
                self.disconnected = True
        self.pos = pos
        return Request(cookie, cmd, flags, offset, length, payload)

    def _wait(self, pos: int) -> None:
        """No complete request: drop what was parsed, keep the rest for later."""
        if self.disconnected:
            self.buf.clear()
        elif pos:
            del self.buf[:pos]
        self.pos = 0


def allowed_flags(session: Session) -> dict[int, int]:
    """Command -> flags it may carry in this session (proto.md "Command flags").
    FUA is valid on every command once SEND_FUA is advertised."""
    fua = p.CMD_FLAG_FUA if session.flags & p.FLAG_SEND_FUA else 0
    zero = p.CMD_FLAG_NO_HOLE | (p.CMD_FLAG_FAST_ZERO if session.flags & p.FLAG_SEND_FAST_ZERO else 0)
    return {
        p.CMD_READ: fua | (p.CMD_FLAG_DF if session.flags & p.FLAG_SEND_DF else 0),
        p.CMD_WRITE: fua,
        p.CMD_DISC: fua,
        p.CMD_FLUSH: fua,
        p.CMD_TRIM: fua,
        p.CMD_CACHE: fua,
        p.CMD_WRITE_ZEROES: fua | zero,
        p.CMD_BLOCK_STATUS: fua | p.CMD_FLAG_REQ_ONE,
    }


_WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)


def check(session: Session, allowed: dict[int, int], size: int, req: Request) -> tuple[int, str]:
    """(0, "") when the request may run, else (NBD error, message) per the spec:
    EINVAL for unknown commands or flags, oversize payloads and ranges past the end
    of reads, trims, caches and block status; EPERM for writes to a read-only export;
    ENOSPC for writes past the end."""
    cmd = req.cmd
    valid = allowed.get(cmd)
    if valid is None:
        return p.EINVAL, f"unknown command {cmd}"
    if req.flags & ~valid:
        return p.EINVAL, f"invalid flags {req.flags:#x} for command {cmd}"
    if cmd in _WRITES and session.flags & p.FLAG_READ_ONLY:
        return p.EPERM, "export is read-only"
    if cmd in (p.CMD_READ, p.CMD_WRITE) and req.length > p.MAX_PAYLOAD:
        return p.EINVAL, f"request length {req.length} exceeds maximum {p.MAX_PAYLOAD}"
    if cmd == p.CMD_BLOCK_STATUS:
        if not session.contexts:
            return p.EINVAL, "no metadata context was selected"
        if req.length == 0:
            return p.EINVAL, "zero-length block status"
    if cmd in (p.CMD_FLUSH, p.CMD_DISC):
        return 0, ""
    if req.offset + req.length > size:
        if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES):
            return p.ENOSPC, "write past the end of the export"
        return p.EINVAL, "request past the end of the export"
    return 0, ""


# --- Replies ---

def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, ctype: int, length: int, done: bool) -> bytes:
    return _CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if done else 0,
                       ctype, cookie, length)


def none_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, p.REPLY_TYPE_NONE, 0, True)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    """NBD_REPLY_TYPE_ERROR, always final here."""
    msg = message.encode()[:p.MAX_STRING]
    return (chunk_header(cookie, p.REPLY_TYPE_ERROR, p.ERROR_CHUNK.size + len(msg), True)
            + p.ERROR_CHUNK.pack(error, len(msg)) + msg)


def data_chunk(cookie: int, offset: int, data, done: bool) -> list:
    return [chunk_header(cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + len(data), done),
            p.OFFSET.pack(offset), data]


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return (chunk_header(cookie, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE.size, done)
            + p.OFFSET_HOLE.pack(offset, length))


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]],
                       done: bool) -> list:
    body = b"".join([p.U32.pack(context_id)]
                    + [p.BLOCK_DESCRIPTOR.pack(n, flags) for n, flags in extents])
    return [chunk_header(cookie, p.REPLY_TYPE_BLOCK_STATUS, len(body), done), body]
