"""One client connection on the event loop (proto.md "Protocol phases": handshake, optional
TLS upgrade, transmission). It only moves bytes between the socket and the sans-I/O machines
(handshake.py, transmission.py), and applies the limits:

- handshake_timeout: the handshake, TLS included, must end this long after the greeting.
  A client that goes silent in the middle of the TLS upgrade gives its slot back too.
- the reply budget (max_queued_bytes, lowered when many clients share the server-wide
  max_queued_total): requests stop being executed, and the socket stops being read, once that
  much is queued; both resume when the client has taken its replies. Under TLS, encrypted
  bytes wait in two places (the TLS layer and the socket), so each gets half.
- fairness: one loop turn moves at most TURN_BYTES of data (read, written or zeroed) or
  answers TURN_REQUESTS requests for a connection, then yields to the others, so a client
  flooding pipelined requests costs the others milliseconds per turn, not its whole queue.
- input backlog: past INPUT_HIGH bytes of unanswered requests, reading pauses.
- idle_timeout (optional): a client that sends nothing and takes no replies is dropped.

Requests run inline on the loop (the engines are synchronous by design, see
docs/DESIGN.md), in request order. The data of a READ may not: the HostReads of its
reply are performed by the server's ReadPool (reads.py), inline on a page-cache hit, else
in a worker thread, and that reply is written when they complete (NBD lets replies leave
in any order; docs/DESIGN.md "I/O model"). So may the data of a large WRITE: the
server's WritePool (writes.py) writes it in a worker thread and commits its mapping on
the loop, and that reply is written then. Close waits for such replies.
"""

import asyncio
import functools
import logging
import socket
import ssl
import time

from ..block.plan import HostRead
from . import tls
from .handshake import Close, Handshake, Ready, Send, StartTLS
from .reads import THREAD_BYTES
from .requests import ProtocolError
from .transmission import Transmission

log = logging.getLogger("qnbd.serve")

TURN_BYTES = 4 << 20
TURN_REQUESTS = 256
INPUT_HIGH = 4 << 20


# Bytes received at most per socket read, other than into a WRITE's payload.
RECEIVE_BYTES = 256 << 10


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server):
        self.server = server
        self.transport = None
        self.peer = "?"
        self.handshake: Handshake | None = None
        self.tx: Transmission | None = None
        self.timer = None
        self.closing = False
        self.lost = False
        self.upgrade: asyncio.Task | None = None
        self.raw = None                      # the socket's transport under TLS
        self.early: list | None = None       # bytes received while TLS starts
        self.budget = server.config.max_queued_bytes
        self.blocked = False                 # the transport asked us to stop writing
        self.reading = True
        self.scheduled = False               # a _process call is queued for the next turn
        self.active_at = 0.0                 # last time the client sent or took data
        self.idle_timer = None
        self.pending = 0                     # replies whose reads are in the pool
        self.reads = None                    # the server's ReadPool, once transmitting
        self.writes = None                   # and its WritePool (writes.py)
        self.parked: list = []               # such replies done while another streams
        self.flush_scheduled = False         # _flush_parked is queued
        # Received bytes land in a WRITE's payload buffer when one is being received (a
        # copy less per written byte), else in `scratch`; `in_place` says which.
        self.scratch = memoryview(bytearray(RECEIVE_BYTES))
        self.in_place = False
        # What the control socket's `clients` reports: wall-clock start, bytes each way.
        self.since = time.time()
        self.bytes_in = 0
        self.bytes_out = 0

    # --- asyncio callbacks ---

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix client"
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.accepted(self)

    def start(self):
        """Greet the client: the handshake and its time limit begin now."""
        self.handshake = Handshake(self.server.catalog, self.server.tls_mode)
        self.set_budget(self.budget)
        self.transport.write(Handshake.greeting)
        timeout = self.server.config.handshake_timeout
        if timeout:
            self.timer = self.server.loop.call_later(timeout, self._handshake_expired)
        self._set_reading(True)

    def set_budget(self, budget: int):
        """Reply bytes that may wait for this client (the server shares its cap)."""
        self.budget = budget
        if self.transport is not None and not self.lost:
            if self.raw is None:
                self.transport.set_write_buffer_limits(high=budget)
                return
            # Under TLS, encrypted bytes wait in the TLS layer and in the socket's buffer:
            # half the budget each.
            self.raw.set_write_buffer_limits(high=budget // 2)
            if self.transport is not self.raw:
                self.transport.set_write_buffer_limits(high=budget // 2)

    def get_buffer(self, sizehint):
        tx = self.tx
        if tx is not None and self.early is None:
            view = tx.payload_buffer()
            if view is not None:
                self.in_place = True
                return view
        self.in_place = False
        return self.scratch

    def buffer_updated(self, nbytes):
        if not self.in_place:
            # A copy: the handshake and the TLS start keep what they are given.
            self.data_received(bytes(self.scratch[:nbytes]))
            return
        self.bytes_in += nbytes
        self.active_at = self.server.loop.time()
        self.tx.payload_received(nbytes)
        if not self.scheduled:
            self._process()

    def data_received(self, data):
        self.bytes_in += len(data)
        if self.early is not None:
            self.early.append(data)
        elif self.tx is not None:
            self.active_at = self.server.loop.time()
            self.tx.receive_data(data)
            if not self.scheduled:   # else the queued turn will get to it
                self._process()
        elif self.handshake is not None:
            self._negotiate(data)

    def pause_writing(self):
        self.blocked = True
        self._set_reading(False)

    def resume_writing(self):
        self.blocked = False
        self.active_at = self.server.loop.time()
        if self.tx is not None and not self.closing:
            self._process()
        elif self.early is None:
            self._set_reading(True)

    def connection_lost(self, exc):
        # Also called by this class when a TLS upgrade ends without the event loop telling
        # this protocol (the raw socket belongs to the TLS layer meanwhile).
        if self.lost:
            return
        self.lost = True
        for timer in (self.timer, self.idle_timer):
            if timer:
                timer.cancel()
        if self.upgrade is not None and not self.upgrade.done():
            self.upgrade.cancel()
        if self.tx is not None:
            self.tx.export.clients -= 1
        self.server.released(self)

    # --- phases ---

    def _handshake_expired(self):
        log.info("%s: handshake not finished in %ss, disconnecting", self.peer,
                 self.server.config.handshake_timeout)
        self.abort()

    def _negotiate(self, data):
        for event in self.handshake.feed(data):
            if isinstance(event, Send):
                self.transport.write(event.data)
            elif isinstance(event, Close):
                log.info("%s: %s", self.peer, event.reason)
                self.close()
            elif isinstance(event, StartTLS):
                self.early = []
                self._set_reading(False)
                self.upgrade = self.server.loop.create_task(self._start_tls())
            elif isinstance(event, Ready):
                self._transmission(event)

    def _transmission(self, event: Ready):
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.handshake = None
        session = event.session
        session.export.clients += 1
        log.info("%s: serving export %r", self.peer, session.export.name)
        buffers = getattr(self.server, "buffers", None)
        self.tx = Transmission(session, self.server.config.max_request, self.peer,
                               self.server.catalog.stats.get(session.export.name),
                               bytearray if buffers is None else buffers.take)
        writes = self.writes = getattr(self.server, "writes", None)
        if writes is not None:
            export = session.export
            self.tx.may_run = lambda req: writes.may_run(export, req, self._resume)
            self.tx.plan_writes = lambda length: writes.may_plan(export, length)
        reads = self.reads = getattr(self.server, "reads", None)
        if reads is not None:
            self.tx.plans = True
            export = session.export
            self.tx.may_mutate = lambda: reads.may_mutate(export, self._resume)
        idle = self.server.config.idle_timeout
        if idle:
            self.active_at = self.server.loop.time()
            self.idle_timer = self.server.loop.call_later(idle, self._idle_check)
        if event.leftover:
            self.tx.receive_data(event.leftover)
            self._process()

    async def _start_tls(self):
        """proto.md FORCEDTLS: "After an NBD_REP_ACK reply has been sent, the server MUST
        be prepared for a TLS handshake ... If the handshake is unsuccessful ... the
        server MUST terminate the session". The ACK is already in the transport's buffer,
        ahead of the first TLS record."""
        server = self.server
        raw = self.raw = self.transport
        self.set_budget(self.budget)
        try:
            self.transport = await server.loop.start_tls(raw, self, server.ssl_context,
                                                         server_side=True)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            log.info("%s: TLS handshake failed: %s", self.peer, str(e) or type(e).__name__)
            raw.abort()
            self.connection_lost(e)
            return
        if self.closing or self.lost:
            self.transport.abort()
            return
        self.set_budget(self.budget)
        why = tls.refusal(server.tls, self.transport.get_extra_info("peercert"))
        if why:
            log.warning("%s: %s, disconnecting", self.peer, why)
            self.close()
            return
        log.info("%s: TLS started (%s)", self.peer, self.transport.get_extra_info("cipher"))
        early, self.early = self.early, None
        self.reading = False
        self._set_reading(True)
        for data in early:
            self.data_received(data)

    def _idle_check(self):
        idle = self.server.config.idle_timeout
        quiet = self.server.loop.time() - self.active_at
        if self.pending or (self.tx is not None and self.tx.held is not None):
            # The client waits for us (replies with I/O out, a request held behind
            # another connection's): it is not idle.
            self.active_at, quiet = self.server.loop.time(), 0
        if quiet >= idle:
            log.info("%s: idle for %ss, disconnecting", self.peer, idle)
            self.abort()
        else:
            self.idle_timer = self.server.loop.call_later(idle - quiet, self._idle_check)

    # --- transmission: the sans-I/O core's output onto the socket ---

    def _process(self):
        """Run steps of the transmission core until it needs more bytes, the reply budget
        is used up (pause_writing stops this, and reading), or this turn's share is done."""
        self.scheduled = False
        if self.lost:
            return   # a turn queued before the transport went: nothing to answer
        if self.reads is not None:
            self.reads.poll()   # replies whose data has arrived meanwhile go out first
        if self.blocked or self.closing:
            return
        tx = self.tx
        transport = self.transport
        next_output = tx.next_output
        budget = self.budget - transport.get_write_buffer_size()
        turn_end = tx.work + TURN_BYTES
        out = []
        made = 0
        planned = False
        try:
            for _ in range(TURN_REQUESTS):
                pieces = next_output()
                if pieces is None:
                    break
                if tx.write_plan is not None:
                    self._write_out(tx)
                for piece in pieces:
                    made += len(piece)
                    if piece.__class__ is HostRead:
                        planned = True
                started, tx.planned_start = tx.planned_start, 0
                if not planned:
                    out += pieces
                    if started:   # a planned READ with nothing to read (holes, zeros)
                        tx.read_done(tx.planned, started)
                else:
                    planned = False
                    done = functools.partial(self._deliver, tx.planned, started, pieces)
                    try:
                        filled = self.reads.fill(pieces, tx.export, done)
                    except OSError as e:   # read here, on the loop: the request's error
                        pieces, filled = tx.read_failed(tx.planned, e), True
                    if filled:
                        out += pieces
                        tx.read_done(tx.planned, started)
                        if tx.export in self.reads.inline:
                            # No RWF_NOWAIT here: small reads as before the pool.
                            tx.plan_min = THREAD_BYTES
                    else:
                        self.pending += 1
                if made >= budget or tx.work >= turn_end:
                    break
            else:
                pieces = ()
        except ProtocolError as e:
            log.info("%s: %s, disconnecting", self.peer, e)
            self.abort()
            return
        if self.parked and not tx.mid_reply:
            out += self.parked
            self.parked = []
        self.bytes_out += made   # replies whose reads went to the pool count now too
        if out:
            transport.writelines(out)   # may call pause_writing
        if pieces is not None and not self.blocked:
            # More work may be waiting: let the other connections have this turn first.
            self.scheduled = True
            self.server.loop.call_soon(self._process)
        elif tx.finished and not self.closing and not self.pending:
            # NBD_CMD_DISC: every earlier request has been answered above; close once
            # their replies are written.
            self.close()
        self._set_reading(not self.blocked and tx.backlog < INPUT_HIGH)

    def _write_out(self, tx: Transmission) -> None:
        """The WRITE next_output just planned goes to the WritePool; its reply is
        delivered as a pooled read's is, once the plan is committed."""
        plan, tx.write_plan = tx.write_plan, None
        req = tx.planned
        started, tx.planned_start = tx.planned_start, 0
        self.pending += 1
        self.writes.submit(tx.export, req, plan, functools.partial(self._wrote, req, started))

    def _wrote(self, req, started: int, error) -> None:
        self._deliver(req, started, self.tx.write_reply(req, error), None)

    def _deliver(self, req, started: int, pieces: list, error) -> None:
        """A reply whose reads were in the pool: its bytes are in place (or failed)."""
        self.pending -= 1
        self.tx.read_done(req, started)
        if self.lost:
            return
        if error is not None:
            pieces = self.tx.read_failed(req, error)
        if self.tx.mid_reply or not (self.closing or self.tx.finished):
            # A streamed reply's data is still to come: this one goes after it
            # (_process sends it once that stream is done). Else the replies completed
            # in this batch go out together, in one write (a syscall each cost ~18% of
            # the loop on cold 4 KiB reads).
            self.parked += pieces
            if not self.tx.mid_reply and not self.flush_scheduled:
                self.flush_scheduled = True
                self.server.loop.call_soon(self._flush_parked)
            return
        pieces, self.parked = self.parked + pieces, []
        self.transport.writelines(pieces)   # may call pause_writing
        if self.closing:
            if not self.pending:
                self.transport.close()
        elif self.tx.finished and not self.pending:
            self.close()

    def _flush_parked(self) -> None:
        self.flush_scheduled = False
        if self.parked and not self.tx.mid_reply and not self.lost:
            parked, self.parked = self.parked, []
            self.transport.writelines(parked)   # may call pause_writing

    def _resume(self):
        """The reads a held write waited for have completed."""
        if not self.scheduled and not self.lost:
            self.scheduled = True
            self.server.loop.call_soon(self._process)

    def _set_reading(self, on: bool):
        if on != self.reading and not self.lost:
            self.reading = on
            if on:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def close(self):
        self.closing = True
        if self.early is not None:
            self.abort()   # nothing of ours is queued before the TLS session exists
        elif not self.pending:   # else the last of those replies closes it (_deliver)
            self.transport.close()

    def abort(self):
        self.transport.abort()
        if self.early is not None:
            # Mid-upgrade the event loop reports the loss to the TLS layer, not to this
            # protocol (issue 16: the slot was never given back).
            self.connection_lost(ConnectionAbortedError("during the TLS handshake"))
