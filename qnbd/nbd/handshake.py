"""Option haggling, sans-I/O (proto.md "Handshake", "Option types", "Option reply types").

Covers the fixed newstyle handshake with NO_ZEROES and the options EXPORT_NAME, ABORT,
LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT, STARTTLS (in the
three TLS modes of proto.md "TLS support", see tls.py) and EXTENDED_HEADERS (extension-ext-header
proto.md "NBD_OPT_EXTENDED_HEADERS"). `Handshake.feed(bytes)` returns
events: `Send` (bytes for the client), then at most one of `Ready` (transmission starts,
with the `Session`), `StartTLS` (the caller must upgrade the connection to TLS before it
feeds more bytes) or `Close` (hard disconnect, with the reason for the log). No sockets,
no clocks here.
"""

from dataclasses import dataclass, field

from . import protocol as p
from .catalog import transmission_flags
from .contexts import MetaContext, list_contexts, select_contexts

# Largest option payload read into memory. GO and the meta-context options carry strings
# of at most 4096 bytes each, so this leaves room for many queries; anything longer is
# skipped unread and refused with ERR_TOO_BIG.
MAX_OPTION_LENGTH = 64 * 1024
# The fixed newstyle server only ever needs these client flags; others close the session.
KNOWN_CLIENT_FLAGS = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES


@dataclass
class Session:
    """What the handshake agreed on; the transmission phase works from this alone."""
    export: object
    flags: int                       # transmission flags sent to the client
    structured: bool                 # NBD_OPT_STRUCTURED_REPLY acknowledged
    contexts: list[tuple[int, MetaContext]] = field(default_factory=list)  # (id, context)
    extended: bool = False           # NBD_OPT_EXTENDED_HEADERS acknowledged


class Send:
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class Ready:
    __slots__ = ("session", "leftover")

    def __init__(self, session: Session, leftover: bytes):
        self.session = session
        self.leftover = leftover  # bytes already received that belong to transmission


class StartTLS:
    """NBD_REP_ACK to STARTTLS was sent: every later byte goes over TLS."""
    __slots__ = ()


class Close:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class OptionError(Exception):
    """An option refused with an error reply; the session goes on."""

    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, option, reply, len(payload)) + payload


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(p.REP_ERR_INVALID, f"{what} is not valid UTF-8") from None


class _Reader:
    """Bounds-checked parsing of one option payload: any overrun is ERR_INVALID."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise OptionError(p.REP_ERR_INVALID, "option data is shorter than its fields")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return p.U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return p.U32.unpack(self.take(4))[0]

    def string32(self, what: str) -> str:
        return _decode(self.take(self.u32()), what)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionError(p.REP_ERR_INVALID, "option data is longer than its fields")


_CLIENT_FLAGS, _OPTION_HEADER, _OPTION_DATA, _SKIP, _DONE = range(5)


class Handshake:
    """One client's option haggling.

    `catalog` (catalog.py) offers `find(name) -> Export | None` (the empty name meaning the
    default export), `contexts(export)`, `exports` (for NBD_OPT_LIST) and `shutting_down`.
    An Export offers `name`, `description`, `size`, what transmission_flags() asks,
    `admit() -> str | None` (a reason to refuse one more client) and `tls_only`.
    `tls` is the server's TLS mode: "off", "on" (SELECTIVETLS) or "require" (FORCEDTLS).
    """

    greeting = p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)

    def __init__(self, catalog, tls: str = "off"):
        self.catalog = catalog
        self.tls = tls
        self.tls_active = False      # STARTTLS acknowledged; the caller upgraded the stream
        self.buf = bytearray()
        self.state = _CLIENT_FLAGS
        self.fixed = False
        self.no_zeroes = False
        self.structured = False
        self.extended = False
        self.meta_export = None      # export named by the last SET_META_CONTEXT
        self.meta_selected: list[tuple[int, MetaContext]] = []
        self.option = 0
        self.length = 0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> list:
        """Consume client bytes; return the events they cause, in order."""
        self.buf += data
        events: list = []
        while self.state != _DONE:
            if self.state == _CLIENT_FLAGS:
                if len(self.buf) < 4:
                    break
                flags = p.CLIENT_FLAGS.unpack_from(self.buf)[0]
                del self.buf[:4]
                if flags & ~KNOWN_CLIENT_FLAGS:
                    # "the server MUST drop the TCP connection if the client sets an
                    # unknown flag" (proto.md "Client flags").
                    return self._close(events, f"unknown client flags {flags:#x}")
                self.fixed = bool(flags & p.FLAG_C_FIXED_NEWSTYLE)
                self.no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
                self.state = _OPTION_HEADER
            elif self.state == _OPTION_HEADER:
                if len(self.buf) < p.OPTION_HEADER.size:
                    break
                magic, self.option, self.length = p.OPTION_HEADER.unpack_from(self.buf)
                del self.buf[:p.OPTION_HEADER.size]
                if magic != p.IHAVEOPT:
                    return self._close(events, "bad option magic")
                if not self.fixed and self.option != p.OPT_EXPORT_NAME:
                    # Non-fixed newstyle knows no other option and no way to refuse one.
                    return self._close(events, f"option {self.option} without fixed newstyle")
                if self.length > MAX_OPTION_LENGTH:
                    if self.option == p.OPT_EXPORT_NAME:
                        return self._close(events, "export name too long")
                    self.state = _SKIP
                else:
                    self.state = _OPTION_DATA
            elif self.state == _SKIP:
                n = min(self.length, len(self.buf))
                del self.buf[:n]
                self.length -= n
                if self.length:
                    break
                if self._tls_required():
                    reply, why = p.REP_ERR_TLS_REQD, b"TLS is required"
                else:
                    reply, why = p.REP_ERR_TOO_BIG, b"option data too long"
                events.append(Send(option_reply(self.option, reply, why)))
                self.state = _OPTION_HEADER
            else:  # _OPTION_DATA
                if len(self.buf) < self.length:
                    break
                payload = bytes(self.buf[:self.length])
                del self.buf[:self.length]
                self.state = _OPTION_HEADER
                if self._handle(self.option, payload, events):
                    break
        return events

    def _close(self, events: list, reason: str) -> list:
        self.state = _DONE
        events.append(Close(reason))
        return events

    def _tls_required(self) -> bool:
        return self.tls == "require" and not self.tls_active

    def _handle(self, option: int, data: bytes, events: list) -> bool:
        """Answer one option; True when the handshake is over (or waits for TLS)."""
        if self._tls_required() and option not in (p.OPT_STARTTLS, p.OPT_ABORT):
            # FORCEDTLS: "If the server receives any other option, it MUST reply with
            # NBD_REP_ERR_TLS_REQD", and EXPORT_NAME, which cannot be refused, "MUST
            # terminate the session".
            if option == p.OPT_EXPORT_NAME:
                self._close(events, "NBD_OPT_EXPORT_NAME before TLS")
                return True
            events.append(Send(option_reply(option, p.REP_ERR_TLS_REQD, b"TLS is required")))
            return False
        if option == p.OPT_EXPORT_NAME:
            if self.extended:
                # "a client MUST NOT use NBD_OPT_EXPORT_NAME" after extended headers, and
                # its reply has no way to say no: as qemu-nbd, end the session.
                self._close(events, "NBD_OPT_EXPORT_NAME after extended headers")
                return True
            return self._export_name(data, events)
        if option == p.OPT_ABORT:
            # "The server MUST reply with NBD_REP_ACK" and ignore any data sent along.
            events.append(Send(option_reply(option, p.REP_ACK)))
            self._close(events, "client aborted the handshake")
            return True
        handler = self._handlers.get(option)
        try:
            if handler is None:
                raise OptionError(p.REP_ERR_UNSUP, f"option {option} is not supported")
            if self.catalog.shutting_down:
                raise OptionError(p.REP_ERR_SHUTDOWN, "server is shutting down")
            replies, session = handler(self, option, data)
        except OptionError as e:
            events.append(Send(option_reply(option, e.reply, str(e).encode())))
            return False
        events.append(Send(b"".join(replies)))
        if option == p.OPT_STARTTLS:
            return self._start_tls(events)
        if session is None:
            return False
        self.state = _DONE
        events.append(Ready(session, bytes(self.buf)))
        self.buf.clear()
        return True

    def _export_name(self, data: bytes, events: list) -> bool:
        """NBD_OPT_EXPORT_NAME cannot report errors: refusing it means disconnecting."""
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            self._close(events, "export name is not valid UTF-8")
            return True
        export = self.catalog.find(name)
        if export is None or self.catalog.shutting_down:
            self._close(events, f"unknown export {name!r}")
            return True
        if not self._visible(export):
            self._close(events, f"export {name!r} needs TLS")
            return True
        refusal = export.admit()
        if refusal:
            self._close(events, refusal)
            return True
        session = self._session(export)
        reply = p.EXPORT_NAME_REPLY.pack(export.size, session.flags)
        if not self.no_zeroes:
            reply += bytes(124)
        events.append(Send(reply))
        self.state = _DONE
        events.append(Ready(session, bytes(self.buf)))
        self.buf.clear()
        return True

    def _session(self, export) -> Session:
        # Contexts count only if the last SET_META_CONTEXT named the export entered
        # (proto.md NBD_CMD_BLOCK_STATUS); otherwise block status is refused.
        contexts = self.meta_selected if self.meta_export is export else []
        return Session(export, self._flags(export), self.structured, list(contexts),
                       self.extended)

    def _flags(self, export, info: bool = False) -> int:
        # An INFO reply offers BLOCK_STATUS payloads (with extended headers) even before
        # contexts are chosen, as qemu-nbd does (nbd_negotiate_handle_info): the client
        # may still choose them before GO, whose reply then says what holds.
        selected = info or (bool(self.meta_selected) and self.meta_export is export)
        return transmission_flags(export, self.structured, self.extended, selected)

    def _visible(self, export) -> bool:
        """SELECTIVETLS: a TLS-only export does not exist for a plaintext client."""
        return self.tls_active or not export.tls_only

    def _find(self, name: str):
        export = self.catalog.find(name)
        if export is None:
            raise OptionError(p.REP_ERR_UNKNOWN, f"export {name!r} not present")
        if not self._visible(export):
            # SELECTIVETLS: "the server errors attempts to enter transmission mode on
            # TLS-only exports" (INFO, GO and the meta-context options alike).
            raise OptionError(p.REP_ERR_TLS_REQD, f"export {name!r} needs TLS")
        return export

    def _opt_list(self, option, data):
        if data:
            raise OptionError(p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        replies = []
        # "The server MAY omit entries from this list if TLS has not been negotiated, the
        # server is operating in SELECTIVETLS mode, and the entry concerned is a TLS-only
        # export."
        for export in filter(self._visible, self.catalog.exports):
            name = export.name.encode()
            replies.append(option_reply(option, p.REP_SERVER,
                                        p.U32.pack(len(name)) + name + export.description.encode()))
        replies.append(option_reply(option, p.REP_ACK))
        return replies, None

    def _opt_starttls(self, option, data):
        if data:
            raise OptionError(p.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls == "off":
            # NOTLS mode (proto.md "NOTLS mode"): ERR_POLICY, as qemu-nbd without TLS creds.
            raise OptionError(p.REP_ERR_POLICY, "TLS not configured")
        if self.tls_active:
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been
            # negotiated, it MUST reply with NBD_REP_ERR_INVALID."
            raise OptionError(p.REP_ERR_INVALID, "TLS is already active")
        return [option_reply(option, p.REP_ACK)], None

    def _start_tls(self, events: list) -> bool:
        """After the ACK: nothing negotiated in plaintext survives into the TLS session
        (an attacker could have injected it; cf. CVE-2021-3716 in nbdkit), and bytes the
        client sent after STARTTLS, before the TLS handshake, can only be injected too."""
        if self.buf:
            self._close(events, "data after NBD_OPT_STARTTLS before the TLS handshake")
            return True
        self.structured = self.extended = False
        self.meta_export, self.meta_selected = None, []
        self.tls_active = True
        events.append(StartTLS())
        return True

    def _opt_structured_reply(self, option, data):
        if data:
            raise OptionError(p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended:
            # "NBD_REP_ERR_EXT_HEADER_REQD: The client has already successfully negotiated
            # extended headers, which takes precedence over this option."
            raise OptionError(p.REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
        if self.structured:
            raise OptionError(p.REP_ERR_INVALID, "structured replies already negotiated")
        self.structured = True
        return [option_reply(option, p.REP_ACK)], None

    def _opt_extended_headers(self, option, data):
        """Extended headers take precedence over structured replies and imply their reply
        semantics. A second request is refused as qemu-nbd does (ERR_INVALID); contexts
        chosen before stay chosen: their ids and meaning do not depend on the header form."""
        if data:
            raise OptionError(p.REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
        if self.extended:
            raise OptionError(p.REP_ERR_INVALID, "extended headers already negotiated")
        self.extended = self.structured = True
        return [option_reply(option, p.REP_ACK)], None

    def _opt_info_go(self, option, data):
        r = _Reader(data)
        name = r.string32("export name")
        requests = [r.u16() for _ in range(r.u16())]
        r.end()
        export = self._find(name)
        if option == p.OPT_GO:
            refusal = export.admit()
            if refusal:
                raise OptionError(p.REP_ERR_POLICY, refusal)
        flags = self._flags(export, info=option == p.OPT_INFO)
        replies = [option_reply(option, p.REP_INFO,
                                p.INFO_EXPORT_PAYLOAD.pack(p.INFO_EXPORT, export.size, flags))]
        if p.INFO_NAME in requests:
            replies.append(option_reply(option, p.REP_INFO,
                                        p.U16.pack(p.INFO_NAME) + export.name.encode()))
        if p.INFO_DESCRIPTION in requests and export.description:
            replies.append(option_reply(option, p.REP_INFO, p.U16.pack(p.INFO_DESCRIPTION)
                                        + export.description.encode()))
        # Always sent: the defaults need no agreement, and clients learn the 32 MiB cap.
        replies.append(option_reply(option, p.REP_INFO, p.INFO_BLOCK_SIZE_PAYLOAD.pack(
            p.INFO_BLOCK_SIZE, export.min_block, p.PREFERRED_BLOCK_SIZE, p.MAX_PAYLOAD)))
        replies.append(option_reply(option, p.REP_ACK))
        return replies, (self._session(export) if option == p.OPT_GO else None)

    def _opt_meta_context(self, option, data):
        if option == p.OPT_SET_META_CONTEXT:
            # "Issuing this command replaces all previously-set metadata contexts
            # (including when this command fails)", and it "MUST NOT be requested unless
            # structured replies have been negotiated first". Listing is harmless without
            # them, so it is allowed, as qemu-nbd does.
            self.meta_export, self.meta_selected = None, []
            if not self.structured:
                raise OptionError(p.REP_ERR_INVALID, "structured replies not negotiated")
        r = _Reader(data)
        name = r.string32("export name")
        queries = [r.string32("context query") for _ in range(r.u32())]
        r.end()
        export = self._find(name)
        if option == p.OPT_LIST_META_CONTEXT:
            # IDs in a LIST reply are reserved and SHOULD be zero.
            chosen = [(0, ctx) for ctx in list_contexts(self.catalog.contexts(export), queries)]
        else:
            chosen = [(ctx.id, ctx) for ctx in select_contexts(self.catalog.contexts(export),
                                                               queries)]
            self.meta_export, self.meta_selected = export, chosen
        replies = [option_reply(option, p.REP_META_CONTEXT, p.U32.pack(cid) + ctx.name.encode())
                   for cid, ctx in chosen]
        replies.append(option_reply(option, p.REP_ACK))
        return replies, None

    _handlers = {
        p.OPT_LIST: _opt_list,
        p.OPT_STARTTLS: _opt_starttls,
        p.OPT_INFO: _opt_info_go,
        p.OPT_GO: _opt_info_go,
        p.OPT_STRUCTURED_REPLY: _opt_structured_reply,
        p.OPT_LIST_META_CONTEXT: _opt_meta_context,
        p.OPT_SET_META_CONTEXT: _opt_meta_context,
        p.OPT_EXTENDED_HEADERS: _opt_extended_headers,
    }
