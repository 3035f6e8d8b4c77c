"""The control socket on the event loop: a unix socket (0600 unless --control-mode), one
JSON request a line, one reply a line, in order (protocol.py). A bad line costs its
sender one error line, never the server nor the other clients; a client that floods
requests without reading the replies is paused (backpressure, as NBD connections are).
Commands run on the event loop, so a connection answers at most PER_TURN requests a loop
turn and reads nothing more while some wait: a flood of requests in one read cannot stall
the NBD clients for the whole of it.
"""

import asyncio
import collections
import logging
import os

from ..config import DEFAULT_CONTROL_MODE
from ..nbd.listeners import bind_unix
from . import protocol
from .handlers import Handlers

log = logging.getLogger("qnbd.control")

# Reply bytes waiting for a control client before its socket stops being read.
REPLY_HIGH = 1 << 20
# Control clients at once: each costs a line buffer (protocol.MAX_LINE) at most.
MAX_CLIENTS = 16
# Requests a connection answers in one turn of the event loop (a read of 256 KiB may
# hold ten thousand of them).
PER_TURN = 32


class ControlConnection(asyncio.Protocol):
    def __init__(self, service):
        self.service = service
        self.transport = None
        self.lines = protocol.LineBuffer()
        self.pending = collections.deque()   # lines of the last read not yet answered
        self.paused = False      # the client is not taking its replies
        self.scheduled = False   # the next PER_TURN wait for the loop's next turn
        self.waiting = False     # for the NBD writes out to complete
        self.reading = True

    def connection_made(self, transport):
        self.transport = transport
        if len(self.service.clients) >= MAX_CLIENTS:
            transport.write(protocol.error("busy", f"more than {MAX_CLIENTS} control "
                                           "clients"))
            transport.close()
            return
        self.service.clients.add(self)
        transport.set_write_buffer_limits(high=REPLY_HIGH)

    def connection_lost(self, exc):
        self.service.clients.discard(self)

    def pause_writing(self):
        self.paused = True
        self._set_reading()

    def resume_writing(self):
        self.paused = False
        self._answer()

    def data_received(self, data):
        self.pending += self.lines.feed(data)
        self._answer()

    def _answer(self):
        """Answer up to PER_TURN pending lines while the client takes its replies; the
        rest in later turns. What waits is at most one read's worth of requests and
        REPLY_HIGH of replies."""
        transport = self.transport
        writes = self.service.writes
        for _ in range(PER_TURN):
            if not self.pending or self.paused or transport.is_closing():
                break
            if writes is not None and not writes.idle(self._writes_done):
                # A command sees every write before it completed (a checkpoint splits
                # the bitmaps there): it waits for the writes out (qnbd/nbd/writes.py).
                self.waiting = True
                break
            item = self.pending.popleft()
            if isinstance(item, protocol.ControlError):
                transport.write(protocol.error(item.code, item.message))
            else:
                transport.write(self.service.answer(item))
        if self.pending and not self.paused and not self.scheduled and \
                not self.waiting and not transport.is_closing():
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        self._set_reading()

    def _next_turn(self):
        self.scheduled = False
        self._answer()

    def _writes_done(self):
        self.waiting = False
        if not self.transport.is_closing():
            self._answer()

    def _set_reading(self):
        """Read while nothing waits: no request unanswered, no reply untaken."""
        want = not self.pending and not self.paused
        if want != self.reading and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()


class ControlService:
    def __init__(self, server, path: str, mode: int = DEFAULT_CONTROL_MODE, metrics=None):
        self.writes = getattr(server, "writes", None)   # the NBD server's WritePool
        self.handlers = Handlers(server, metrics)
        self.path = path
        self.mode = mode
        self.clients: set[ControlConnection] = set()
        self.srv = None

    async def start(self, loop):
        sock = bind_unix(self.path, self.mode)
        self.srv = await loop.create_unix_server(lambda: ControlConnection(self), sock=sock)
        log.info("control socket on %s", self.path)

    def answer(self, line: bytes) -> bytes:
        try:
            request = protocol.parse(line)
        except protocol.ControlError as e:
            return protocol.error(e.code, e.message, getattr(e, "id", None))
        except Exception as e:   # a bug costs this request one line, never the server
            log.error("control: bad request not parsed", exc_info=e)
            return protocol.error(protocol.INTERNAL, "internal error")
        try:
            return protocol.ok(self.handlers.run(request), request.id)
        except protocol.ControlError as e:
            return protocol.error(e.code, e.message, request.id)

    def close(self):
        if self.srv is not None:
            self.srv.close()
        for conn in list(self.clients):
            conn.transport.abort()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def control_service(path: str, mode: int = DEFAULT_CONTROL_MODE, metrics=None):
    """A `services` entry for qnbd.nbd.server.serve: starts the control socket."""
    async def start(server):
        service = ControlService(server, path, mode,
                                 metrics=metrics and (lambda: metrics(server)))
        await service.start(server.loop)
        return service.close
    return start
