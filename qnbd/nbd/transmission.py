"""The transmission phase, sans-I/O (proto.md "Transmission", "Request types", "Command
flags", "Error values"; extension-ext-header proto.md for extended headers).

`Transmission` owns both directions of one session, as h11's Connection does: request bytes
go in (`receive_data`), reply pieces come out (`next_output`), one step of work at a time,
with the export's block calls made in between. Nothing here touches a socket or a clock, so
every rule is tested with byte strings; the asyncio side decides how many steps to run per
loop turn (fairness) and stops asking while the client does not take its replies
(backpressure).

A step answers one request, except a READ larger than STREAM_CHUNK, which is answered in
steps of STREAM_CHUNK bytes: memory stays bounded by the chunk, not by what the client asks
for. Its reply is, by the session's reply form:
- simple replies, or NBD_CMD_FLAG_DF: one header announcing every byte, then the data in
  pieces. An error after the header has gone out can only be a hard disconnect ("if *error*
  is zero and a later error is detected before *length* bytes are returned, the server must
  initiate a hard disconnect").
- structured or extended replies: OFFSET_DATA/OFFSET_HOLE chunks per piece, DONE on the last;
  an error ends the reply with an error chunk.
"""

import array
import logging
import sys
from time import perf_counter_ns

from ..errors import IOFailure
from . import protocol as p
from .handshake import Session
from .replies import codec
from .requests import DEFAULT_MAX_REQUEST, ProtocolError, Request, RequestParser
from .stats import ExportStats

log = logging.getLogger("qnbd.serve")

# READ data made per step: a larger READ is answered in pieces of this size.
STREAM_CHUNK = 4 << 20
# Block status filter payloads: 8 bytes and a context id each (proto.md
# NBD_CMD_BLOCK_STATUS); ours offer a handful of contexts, this leaves room for many.
MAX_FILTER = 8 + 4 * 1024


def allowed_flags(session: Session) -> dict[int, int]:
    """Command -> flags it may carry in this session (proto.md "Command flags").
    FUA is valid on every command once SEND_FUA is advertised; PAYLOAD_LEN only with
    extended headers, on WRITE and on BLOCK_STATUS once NBD_FLAG_BLOCK_STATUS_PAYLOAD was
    advertised."""
    flags = session.flags
    fua = p.CMD_FLAG_FUA if flags & p.FLAG_SEND_FUA else 0
    zero = p.CMD_FLAG_NO_HOLE | (p.CMD_FLAG_FAST_ZERO if flags & p.FLAG_SEND_FAST_ZERO else 0)
    payload = p.CMD_FLAG_PAYLOAD_LEN if session.extended else 0
    status_payload = payload if flags & p.FLAG_BLOCK_STATUS_PAYLOAD else 0
    return {
        p.CMD_READ: fua | (p.CMD_FLAG_DF if flags & p.FLAG_SEND_DF else 0),
        p.CMD_WRITE: fua | payload,
        p.CMD_FLUSH: fua,
        p.CMD_TRIM: fua,
        p.CMD_CACHE: fua,
        p.CMD_WRITE_ZEROES: fua | zero,
        p.CMD_BLOCK_STATUS: fua | p.CMD_FLAG_REQ_ONE | status_payload,
    }


_WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
_DATA = (p.CMD_READ, p.CMD_WRITE)


def check(session: Session, allowed: dict[int, int], size: int, req: Request,
          max_request: int = DEFAULT_MAX_REQUEST) -> tuple[int, str]:
    """(0, "") when the request may run, else (NBD error, message) per the spec:
    EINVAL for unknown commands or flags, oversize payloads and ranges past the end
    of reads, trims, caches and block status; EPERM for writes to a read-only export;
    ENOSPC for writes past the end. A block status filter payload is checked by its
    handler, which alone knows the effect length it carries."""
    cmd = req.cmd
    if cmd == p.CMD_DISC:
        # Never answered, whatever its flags: "There is no reply to an NBD_CMD_DISC"; it
        # ends the session once the requests before it are answered.
        return 0, ""
    valid = allowed.get(cmd)
    if valid is None:
        return p.EINVAL, f"unknown command {cmd}"
    if req.flags & ~valid:
        return p.EINVAL, f"invalid flags {req.flags:#x} for command {cmd}"
    if cmd in _WRITES and session.flags & p.FLAG_READ_ONLY:
        return p.EPERM, "export is read-only"
    if cmd in _DATA and req.length > max_request:
        return p.EINVAL, f"request length {req.length} exceeds maximum {max_request}"
    if cmd == p.CMD_BLOCK_STATUS:
        if not session.contexts:
            return p.EINVAL, "no metadata context was selected"
        if req.flags & p.CMD_FLAG_PAYLOAD_LEN:
            return 0, ""
        if req.length == 0:
            return p.EINVAL, "zero-length block status"
    if cmd == p.CMD_FLUSH:
        return 0, ""
    if req.offset + req.length > size:
        if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES):
            return p.ENOSPC, "write past the end of the export"
        return p.EINVAL, "request past the end of the export"
    return 0, ""


class Transmission:
    """One session's transmission phase: request bytes and an export in, reply pieces out."""

    def __init__(self, session: Session, max_request: int = DEFAULT_MAX_REQUEST,
                 peer: str = "?", stats: ExportStats | None = None, take=bytearray):
        self.session = session
        self.stats = stats if stats is not None else ExportStats()
        self.export = session.export
        self.max_request = max_request
        self.peer = peer
        self.parser = RequestParser(max_request, session.extended, take)
        self.replies = codec(session.structured, session.extended)
        self.allowed = allowed_flags(session)
        # A READ being answered in steps: (request, next offset, whole), where whole means
        # one header announced all the data (simple replies, DF).
        self.stream: tuple[Request, int, bool] | None = None
        self.stream_start = 0   # when the streamed READ began (its latency ends at the end)
        # Bytes of data moved so far (read, written or zeroed): what a request costs,
        # whatever the size of its reply; the asyncio side bounds it per loop turn.
        self.work = 0
        # Read plans (docs/DESIGN.md "I/O model", qnbd/block/plan.py): when the side that
        # does I/O sets this, a READ answered in one step may carry HostRead pieces for
        # it to perform (each one in place of its bytes); `planned` is then that READ,
        # for read_failed(). Left off, every piece is bytes, as the tests read them.
        self.plans = False
        self.plan_min = 0   # shorter READs are answered with bytes even so
        self.planned: Request | None = None
        # When the planned READ that next_output just returned began: its latency is
        # recorded by read_done once the I/O side has its bytes (a cold read's disk
        # wait is part of it); 0 when that READ is already recorded.
        self.planned_start = 0
        # Asked before a write, zero or discard runs: False holds the request (and all
        # after it) until the I/O side calls again; it keeps planned reads valid.
        self.may_mutate = None
        self.held: Request | None = None
        # Write plans (qnbd/block/plan.py, qnbd/nbd/writes.py): asked before any request
        # runs, `may_run(req)` False holds it (and all after it) until the I/O side calls
        # again, so that nothing overtakes a write still out. `plan_writes(length)` says
        # whether a WRITE of that many bytes is to be answered with a plan:
        # `write_plan` is then that plan, for the I/O side to perform and commit (`planned`
        # is its request, whose reply it makes; the reply pieces returned are none).
        self.may_run = None
        self.plan_writes = None
        self.write_plan = None

    def receive_data(self, data) -> None:
        self.parser.push(data)

    def payload_buffer(self) -> memoryview | None:
        return self.parser.payload_buffer()

    def payload_received(self, n: int) -> None:
        self.parser.payload_received(n)

    @property
    def backlog(self) -> int:
        """Request bytes received and not yet answered."""
        return self.parser.backlog

    @property
    def mid_reply(self) -> bool:
        """A reply's header has gone out and its data is still coming in later steps
        (a streamed READ with simple replies or DF): nothing else may be sent now."""
        return self.stream is not None and self.stream[2]

    @property
    def finished(self) -> bool:
        """NBD_CMD_DISC was received and every request before it answered."""
        return self.parser.disconnected and self.stream is None and self.held is None

    def next_output(self) -> list | None:
        """Reply pieces for the next step of work, or None until more bytes arrive.
        Raises ProtocolError when the session must end in a hard disconnect."""
        if self.stream is not None:
            req = self.stream[0]
            try:
                out = self._read_step()
            except Exception as e:
                out = self._failed(req, e)
            if self.stream is None:   # its last piece: the READ is answered
                self.stats.record(req.cmd, req.length, perf_counter_ns() - self.stream_start)
            return out
        req = self.held
        if req is None:
            req = self.parser.pop()
            if req is None:
                return None
        err, msg = check(self.session, self.allowed, self.export.size, req, self.max_request)
        # A request refused by its checks touches no data: it waits for no I/O out.
        if not err and ((self.may_run is not None and not self.may_run(req)) or (
                req.cmd in _WRITES and self.may_mutate is not None
                and not self.may_mutate())):
            self.held = req
            return None
        self.held = None
        start = perf_counter_ns()
        if err:
            out = self._error(req, err, msg)
        else:
            try:
                out = _DISPATCH[req.cmd](self, req)
            except Exception as e:
                out = self._failed(req, e)
        if self.stream is not None:   # a READ streamed in steps: recorded with its last piece
            self.stream_start = start
        elif self.planned is req:   # its bytes are still to be read: see read_done
            self.planned_start = start
        else:
            self.stats.record(req.cmd, req.length, perf_counter_ns() - start)
        return out

    def read_done(self, req: Request, start: int) -> None:
        """The I/O side has put in place (or failed to read) the bytes of the planned
        READ `req` that began at `start`: its latency ends now."""
        self.stats.record(req.cmd, req.length, perf_counter_ns() - start)

    def read_failed(self, req: Request, e: Exception) -> list:
        """The reply to a planned READ whose HostReads failed (none of it was sent)."""
        return self._error(req, *_why(self.peer, req, e))

    def _failed(self, req: Request, e: Exception) -> list:
        """Engine failures cost the request an NBD error, never the session."""
        err, msg = _why(self.peer, req, e)
        stream, self.stream = self.stream, None
        if stream is not None and stream[2]:
            raise ProtocolError(f"read at {stream[1]} failed after its reply began: {msg}")
        return self._error(req, err, msg)

    def _error(self, req: Request, err: int, message: str) -> list:
        self.stats.error(err)
        if err == p.EIO:
            log.warning("%s: command %d at %d+%d: %s", self.peer, req.cmd, req.offset,
                        req.length, message)
        return self.replies.error(req, err, message)

    # --- commands: the request passed its checks ---

    def _read(self, req: Request) -> list:
        r = self.replies
        offset, length = req.offset, req.length
        if length == 0:
            return r.none(req) if r.structured else r.ok(req)
        whole = not r.structured or bool(req.flags & p.CMD_FLAG_DF)
        if length <= STREAM_CHUNK:
            self.work += length
            if self.plans and length >= self.plan_min:
                self.planned = req
                parts = self.export.read_plan(offset, length)
                if whole:
                    return [r.data_header(req, offset, length, True)] + [
                        bytes(n) if data is None else data for n, data in parts]
                return self._pieces(req, offset, parts, True)
            if whole:
                return [r.data_header(req, offset, length, True), self.export.read(offset, length)]
            return self._parts(req, offset, length, True)
        if whole:
            self.work += STREAM_CHUNK
            first = self.export.read(offset, STREAM_CHUNK)
            self.stream = (req, offset + STREAM_CHUNK, True)
            return [r.data_header(req, offset, length, True), first]
        self.stream = (req, offset, False)
        return self._read_step()

    def _read_step(self) -> list:
        req, offset, whole = self.stream
        end = req.offset + req.length
        n = min(STREAM_CHUNK, end - offset)
        final = offset + n == end
        self.work += n
        out = [self.export.read(offset, n)] if whole else self._parts(req, offset, n, final)
        self.stream = None if final else (req, offset + n, whole)
        return out

    def _parts(self, req: Request, offset: int, length: int, final: bool) -> list:
        """OFFSET_DATA and OFFSET_HOLE chunks: ranges known to read as zeros cost no payload."""
        return self._pieces(req, offset, self.export.read_parts(offset, length), final)

    def _pieces(self, req: Request, offset: int, parts: list, final: bool) -> list:
        r = self.replies
        out = []
        last = len(parts) - 1
        for i, (n, data) in enumerate(parts):
            done = final and i == last
            if data is None:
                out += r.hole(req, offset, n, done)
            else:
                out += [r.data_header(req, offset, n, done), data]
            offset += n
        return out

    def _write(self, req: Request) -> list:
        self.work += req.length
        if not req.length:
            return self.replies.ok(req)
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        if self.plan_writes is not None and self.plan_writes(req.length):
            plan = self.export.write_plan(req.offset, req.payload, fua)
            if plan is not None:
                self.planned = req
                self.write_plan = plan
                return []
        self.export.write(req.offset, req.payload, fua)
        return self.replies.ok(req)

    def write_reply(self, req: Request, error: Exception | None) -> list:
        """The reply to a planned WRITE, once its plan was performed and committed (or
        failed: then nothing of it is mapped)."""
        if error is not None:
            return self._error(req, *_why(self.peer, req, error))
        return self.replies.ok(req)

    def _disc(self, req: Request) -> list:
        log.info("%s: client disconnected", self.peer)
        return []

    def _flush(self, req: Request) -> list:
        self.export.flush()
        return self.replies.ok(req)

    def _trim(self, req: Request) -> list:
        if req.length:
            self.export.trim(req.offset, req.length, bool(req.flags & p.CMD_FLAG_FUA))
        return self.replies.ok(req)

    def _cache(self, req: Request) -> list:
        # Advisory (proto.md NBD_CMD_CACHE): the engines read through the page cache,
        # which gains nothing from being told in advance.
        return self.replies.ok(req)

    def _write_zeroes(self, req: Request) -> list:
        self.work += req.length
        if req.length:
            f = req.flags
            self.export.write_zeroes(req.offset, req.length, no_hole=bool(f & p.CMD_FLAG_NO_HOLE),
                                     fast=bool(f & p.CMD_FLAG_FAST_ZERO),
                                     fua=bool(f & p.CMD_FLAG_FUA))
        return self.replies.ok(req)

    def _block_status(self, req: Request) -> list:
        contexts = self.session.contexts
        length = req.length
        if req.flags & p.CMD_FLAG_PAYLOAD_LEN:
            length, contexts, why = self._filter(req)
            if why:
                return self._error(req, p.EINVAL, why)
            if req.offset + length > self.export.size:
                return self._error(req, p.EINVAL, "request past the end of the export")
        one = bool(req.flags & p.CMD_FLAG_REQ_ONE)
        out = []
        last = len(contexts) - 1
        for i, (cid, ctx) in enumerate(contexts):
            extents = ctx.extents(req.offset, length, one)
            out += self.replies.block_status(req, cid, extents, i == last)
        return out

    def _filter(self, req: Request):
        """The block status payload form (extension-ext-header proto.md
        NBD_CMD_BLOCK_STATUS): a 64-bit effect length, then the context ids to answer for.
        "duplicate or unknown metacontext ids ... MUST" fail with EINVAL, as must a
        payload of the wrong shape (the parser has already consumed it)."""
        data = req.payload
        if data is None or len(data) < 8 or (len(data) - 8) % 4 or len(data) > MAX_FILTER:
            return 0, [], "malformed block status payload"
        length = p.U64.unpack_from(data)[0]
        ids = array.array("I", data[8:])
        if sys.byteorder == "little":
            ids.byteswap()
        chosen = dict(self.session.contexts)
        if not ids or len(set(ids)) != len(ids) or not chosen.keys() >= set(ids):
            return 0, [], "duplicate or unknown metadata context ids"
        if length == 0:
            return 0, [], "zero-length block status"
        return length, [(cid, chosen[cid]) for cid in ids], ""


def _why(peer: str, req: Request, e: Exception) -> tuple[int, str]:
    """The NBD error and message for a failed request."""
    if isinstance(e, IOFailure):
        return p.nbd_error(e.errno), str(e)
    if isinstance(e, OSError):
        return p.nbd_error(e.errno), e.strerror or str(e)
    # a bug must cost this request, not the server or the client
    log.error("%s: request %d failed", peer, req.cmd, exc_info=e)
    return p.EIO, "internal error"


_DISPATCH = {
    p.CMD_READ: Transmission._read,
    p.CMD_WRITE: Transmission._write,
    p.CMD_DISC: Transmission._disc,
    p.CMD_FLUSH: Transmission._flush,
    p.CMD_TRIM: Transmission._trim,
    p.CMD_CACHE: Transmission._cache,
    p.CMD_WRITE_ZEROES: Transmission._write_zeroes,
    p.CMD_BLOCK_STATUS: Transmission._block_status,
}
