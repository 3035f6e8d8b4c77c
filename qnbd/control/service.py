"""The control socket on the event loop: a unix socket (0600 unless --control-mode), one
JSON request a line, one reply a line, in order (protocol.py). A bad line costs its
sender one error line, never the server nor the other clients; a client that floods
requests without reading the replies is paused (backpressure, as NBD connections are).
"""

import asyncio
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


class ControlConnection(asyncio.Protocol):
    def __init__(self, service):
        self.service = service
        self.transport = None
        self.lines = protocol.LineBuffer()
        self.pending: list = []   # lines of the last read not yet answered
        self.paused = False

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
        self.transport.pause_reading()

    def resume_writing(self):
        self.paused = False
        self._answer()
        if not self.paused:
            self.transport.resume_reading()

    def data_received(self, data):
        self.pending += self.lines.feed(data)
        self._answer()

    def _answer(self):
        """Answer pending lines until the client stops taking replies: what waits is at
        most one read's worth of requests and REPLY_HIGH of replies."""
        while self.pending and not self.paused and not self.transport.is_closing():
            item = self.pending.pop(0)
            if isinstance(item, protocol.ControlError):
                self.transport.write(protocol.error(item.code, item.message))
            else:
                self.transport.write(self.service.answer(item))


class ControlService:
    def __init__(self, server, path: str, mode: int = DEFAULT_CONTROL_MODE, metrics=None):
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
