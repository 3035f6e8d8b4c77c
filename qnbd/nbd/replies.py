"""Reply encoding, sans-I/O: one codec per session, chosen by what the handshake agreed
(proto.md "Simple reply message", "Structured reply chunk message", and extension-ext-header
proto.md "Extended reply chunk message", "Structured reply types").

- SimpleReplies: neither structured replies nor extended headers. Errors and successes are
  16-byte simple replies; a READ's data follows its reply header.
- StructuredReplies: NBD_OPT_STRUCTURED_REPLY. READ and BLOCK_STATUS answer in chunks (and
  errors to them as error chunks: "MUST NOT use a simple reply for NBD_CMD_READ"); other
  commands keep simple replies, which the spec allows when there is no payload.
- ExtendedReplies: NBD_OPT_EXTENDED_HEADERS. "All server replies MUST use an extended reply"
  (32 bytes, echoing the request's offset), block status as NBD_REPLY_TYPE_BLOCK_STATUS_EXT
  with 64-bit lengths and flags.

Every method returns a list of pieces for `transport.writelines`; data payloads are passed
through as they are, never copied.
"""

from . import protocol as p

_SIMPLE = p.SIMPLE_REPLY.pack
_CHUNK = p.STRUCTURED_REPLY.pack
_EXT = p.EXT_REPLY.pack
_OFFSET = p.OFFSET.pack
_DESC = p.BLOCK_DESCRIPTOR.pack
_DESC_EXT = p.BLOCK_DESCRIPTOR_EXT.pack
_DONE = p.REPLY_FLAG_DONE


def _error_payload(error: int, message: str) -> bytes:
    msg = message.encode()[:p.MAX_STRING]
    return p.ERROR_CHUNK.pack(error, len(msg)) + msg


class SimpleReplies:
    structured = False

    def ok(self, req) -> list:
        return [_SIMPLE(p.SIMPLE_REPLY_MAGIC, 0, req.cookie)]

    def error(self, req, error: int, message: str) -> list:
        return [_SIMPLE(p.SIMPLE_REPLY_MAGIC, error, req.cookie)]

    def data_header(self, req, offset: int, length: int, done: bool) -> bytes:
        """The header that `length` bytes of READ data follow (one per READ here)."""
        return _SIMPLE(p.SIMPLE_REPLY_MAGIC, 0, req.cookie)


class StructuredReplies(SimpleReplies):
    structured = True

    def _chunk(self, req, ctype: int, length: int, done: bool) -> bytes:
        return _CHUNK(p.STRUCTURED_REPLY_MAGIC, _DONE if done else 0, ctype, req.cookie, length)

    def error(self, req, error: int, message: str) -> list:
        if req.cmd not in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            return super().error(req, error, message)
        payload = _error_payload(error, message)
        return [self._chunk(req, p.REPLY_TYPE_ERROR, len(payload), True) + payload]

    def none(self, req) -> list:
        return [self._chunk(req, p.REPLY_TYPE_NONE, 0, True)]

    def data_header(self, req, offset: int, length: int, done: bool) -> bytes:
        """NBD_REPLY_TYPE_OFFSET_DATA: header and offset; `length` data bytes follow."""
        return self._chunk(req, p.REPLY_TYPE_OFFSET_DATA, 8 + length, done) + _OFFSET(offset)

    def hole(self, req, offset: int, length: int, done: bool) -> list:
        return [self._chunk(req, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE.size, done)
                + p.OFFSET_HOLE.pack(offset, length)]

    def block_status(self, req, context_id: int, extents, done: bool) -> list:
        body = b"".join([p.U32.pack(context_id)] + [_DESC(n, flags) for n, flags in extents])
        return [self._chunk(req, p.REPLY_TYPE_BLOCK_STATUS, len(body), done), body]


class ExtendedReplies(StructuredReplies):
    def _chunk(self, req, ctype: int, length: int, done: bool) -> bytes:
        return _EXT(p.EXTENDED_REPLY_MAGIC, _DONE if done else 0, ctype, req.cookie,
                    req.offset, length)

    def ok(self, req) -> list:
        return self.none(req)

    def error(self, req, error: int, message: str) -> list:
        payload = _error_payload(error, message)
        return [self._chunk(req, p.REPLY_TYPE_ERROR, len(payload), True) + payload]

    def block_status(self, req, context_id: int, extents, done: bool) -> list:
        body = b"".join([p.BLOCK_STATUS_EXT_HEAD.pack(context_id, len(extents))]
                        + [_DESC_EXT(n, flags) for n, flags in extents])
        return [self._chunk(req, p.REPLY_TYPE_BLOCK_STATUS_EXT, len(body), done), body]


def codec(structured: bool, extended: bool) -> SimpleReplies:
    if extended:
        return ExtendedReplies()
    return StructuredReplies() if structured else SimpleReplies()
