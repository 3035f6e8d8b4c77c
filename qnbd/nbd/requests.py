"""Request framing, sans-I/O (proto.md "Request message", both forms).

Compact requests (28 bytes, 32-bit length; only NBD_CMD_WRITE carries a payload) are used
unless NBD_OPT_EXTENDED_HEADERS was negotiated; then every request is 32 bytes with a 64-bit
length, and a payload follows when NBD_CMD_FLAG_PAYLOAD_LEN is set (extension-ext-header
proto.md "Request message"). A WRITE always carries one: the spec asks clients to flag it,
but qemu's client (10.0) does not, and reading its data as the next request would end the
session.

The parser keeps the stream in step whatever the requests mean: a payload larger than
`max_payload` is skipped as it arrives, never buffered ("a server SHOULD gracefully consume
*length* bytes of payload ... and proceed with the next client command"), and a payload
larger than what is already buffered is received straight into a buffer of its own, so a
large WRITE costs its size once, not twice.
"""

from typing import NamedTuple

from . import protocol as p

# READ and WRITE lengths accepted by default. Clients that connect with NBD_OPT_EXPORT_NAME
# never learn a limit, and some send more than the 32 MiB advertised (nbd's own integrity
# test sends up to 47.5 MiB); beyond this they get EINVAL and the session goes on.
DEFAULT_MAX_REQUEST = 64 << 20
# Payloads above 2^32 - 1 cannot be meant (NBD_INFO_BLOCK_SIZE caps sizes at 32 bits): the
# spec says the server SHOULD hard disconnect rather than skip them.
MAX_SKIP = (1 << 32) - 1


class ProtocolError(Exception):
    """The stream cannot be understood any more: hard disconnect."""


class Request(NamedTuple):
    cookie: int
    cmd: int
    flags: int
    offset: int
    length: int
    # The payload (bytes-like) for requests that carry one; None when there is none, or
    # when it was larger than the parser's limit and skipped (the checks tell which).
    payload: bytes | bytearray | None


class RequestParser:
    """Requests are taken one at a time (`pop`), so the server can stop taking them while
    its replies wait to be sent: unparsed bytes stay here (`backlog` counts them)."""

    def __init__(self, max_payload: int = DEFAULT_MAX_REQUEST, extended: bool = False,
                 take=bytearray):
        self.max_payload = max_payload
        # take(length): the buffer a payload is received into (buffers.py reuses them).
        self.take = take
        self.extended = extended
        self.header = p.EXT_REQUEST if extended else p.REQUEST
        self.magic = p.EXTENDED_REQUEST_MAGIC if extended else p.REQUEST_MAGIC
        self.buf = bytearray()
        self.pos = 0             # start of the first unparsed byte in buf
        self.want = 0            # payload bytes still to come (into `target`, or skipped)
        self.target: bytearray | None = None
        self.filled = 0
        self.waiting: Request | None = None   # its payload is being received into target
        self.disconnected = False

    @property
    def backlog(self) -> int:
        return len(self.buf) - self.pos

    def push(self, data) -> None:
        if self.want:
            # Invariant: while a payload is outstanding, buf holds nothing unparsed.
            n = min(self.want, len(data))
            if self.target is not None:
                with memoryview(data) as view:
                    self.target[self.filled:self.filled + n] = view[:n]
                self.filled += n
            self.want -= n
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self.buf += data

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the payload being received goes, for the I/O side to receive
        it in place (no copy through `push`); None when no payload is being kept."""
        if not self.want or self.target is None:
            return None
        return memoryview(self.target)[self.filled:self.filled + self.want]

    def payload_received(self, n: int) -> None:
        """`n` bytes were received into payload_buffer()."""
        self.filled += n
        self.want -= n

    def feed(self, data) -> list[Request]:
        """push(data), then every complete request."""
        self.push(data)
        return list(iter(self.pop, None))

    def pop(self) -> Request | None:
        """The next complete request, or None until more bytes arrive. Nothing is parsed
        after NBD_CMD_DISC: "A client MUST NOT send anything ... after" it."""
        if self.want:
            return None
        if self.waiting is not None:
            req = self.waiting._replace(payload=self.target)
            self.waiting = self.target = None
            return req
        buf = self.buf
        pos = self.pos
        end = len(buf)
        header = self.header
        if self.disconnected or end - pos < header.size:
            return self._wait(pos)
        magic, flags, cmd, cookie, offset, length = header.unpack_from(buf, pos)
        if magic != self.magic:
            raise ProtocolError(f"bad request magic {magic:#x}")
        pos += header.size
        if cmd == p.CMD_DISC:
            self.disconnected = True
        if cmd != p.CMD_WRITE and not (self.extended and flags & p.CMD_FLAG_PAYLOAD_LEN):
            self.pos = pos
            return Request(cookie, cmd, flags, offset, length, None)
        if length > self.max_payload:
            if length > MAX_SKIP:
                raise ProtocolError(f"payload of {length} bytes")
            n = min(length, end - pos)
            self.want = length - n
            self._consumed(pos + n)
            return Request(cookie, cmd, flags, offset, length, None)
        if end - pos >= length:
            with memoryview(buf) as view:  # one copy, released before buf shrinks
                payload = bytes(view[pos:pos + length])
            self.pos = pos + length
            return Request(cookie, cmd, flags, offset, length, payload)
        # The rest of the payload is still on its way: receive it in place.
        self.target = self.take(length)   # filled whole before the request is popped
        self.filled = end - pos
        with memoryview(buf) as view:
            self.target[:self.filled] = view[pos:end]
        self.want = length - self.filled
        self.waiting = Request(cookie, cmd, flags, offset, length, None)
        self._consumed(end)
        return self.pop()

    def _consumed(self, pos: int) -> None:
        self.pos = pos
        if pos == len(self.buf):
            self.buf.clear()
            self.pos = 0

    def _wait(self, pos: int) -> None:
        """No complete request: drop what was parsed, keep the rest for later."""
        if self.disconnected:
            self.buf.clear()
        elif pos:
            del self.buf[:pos]
        self.pos = 0
