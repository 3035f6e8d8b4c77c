"""The NBD server's I/O: listeners, one asyncio Protocol per connection, limits, timeouts
and graceful shutdown. The only NBD module that touches sockets, clocks or signals; the
protocol itself lives in handshake.py and transmission.py.

Requests are executed inline, in order, inside `data_received`: the engines are synchronous
by design (see docs/DESIGN.md), so the complete requests of one read are handled and their
replies go out in one `writelines`. Replies therefore leave in request order, which the
protocol allows (it also allows any other order).

Limits against hostile or broken clients (the CVE-2024-7409 class: resources held by
clients that never finish):
- handshake_timeout: the handshake, TLS included, must end this long after the greeting.
- max_connections: clients greeted at once; MAX_WAITING more wait unanswered, beyond
  that connections are dropped at once.
- max_queued_bytes: replies waiting to be sent, per connection. Requests stop being
  executed (and the socket stops being read) once that much is queued, and resume when
  the client has taken its replies, so a client that pipelines large reads and does not
  read cannot make the server buffer more than about this (plus one reply and one
  partly received request, at most 32 MiB each).
- idle_timeout (optional): a client in transmission that sends nothing and takes no
  replies for this long is disconnected.

TLS (tls.py): after the STARTTLS ACK has been written, the transport is upgraded with
`loop.start_tls`; bytes that arrive meanwhile wait until the client is authorized.
"""

import asyncio
import collections
import errno
import logging
import os
import signal
import socket
import ssl
import stat

import uvloop

from ..errors import IOFailure, QnbdError
from ..export import Export
from ..memory import tune_malloc
from . import protocol as p
from . import tls
from . import transmission as t
from .handshake import Close, Handshake, Ready, Send, StartTLS

log = logging.getLogger("qnbd.serve")

# Connections held unanswered (beyond max_connections) before new ones are refused.
MAX_WAITING = 128
# How long shutdown waits for clients to take their last replies before cutting them off.
SHUTDOWN_GRACE = 5.0


class Catalog:
    """The exports a handshake can choose from."""

    def __init__(self, exports):
        self.exports = exports
        self.by_name = {e.name: e for e in exports}
        self.shutting_down = False

    def find(self, name: str):
        """The empty name is the default export: the one named "" or else the first
        (proto.md NBD_OPT_EXPORT_NAME: "reserved for a default export")."""
        export = self.by_name.get(name)
        if export is None and name == "":
            export = self.exports[0]
        return export


class Connection(asyncio.Protocol):
    def __init__(self, server: "Server"):
        self.server = server
        self.transport = None
        self.peer = "?"
        self.handshake: Handshake | None = None
        self.session = None
        self.parser: t.RequestParser | None = None
        self.allowed: dict[int, int] = {}   # command -> valid flags, fixed per session
        self.timer = None
        self.closing = False
        self.lost = False
        self.upgrading: list | None = None   # bytes received while TLS starts
        self.blocked = False                 # replies queued beyond max_queued_bytes
        self.active_at = 0.0                 # last time the client sent or took data
        self.idle_timer = None

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
        self.transport.set_write_buffer_limits(high=self.server.config.max_queued_bytes)
        self.transport.write(Handshake.greeting)
        timeout = self.server.config.handshake_timeout
        if timeout:
            self.timer = self.server.loop.call_later(timeout, self._handshake_expired)
        self.transport.resume_reading()

    def data_received(self, data):
        if self.upgrading is not None:
            self.upgrading.append(data)
        elif self.parser is not None:
            self.active_at = self.server.loop.time()
            self.parser.push(data)
            self._process()
        elif self.handshake is not None:
            self._negotiate(data)

    def pause_writing(self):
        self.blocked = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.blocked = False
        self.active_at = self.server.loop.time()
        if self.parser is not None and not self.closing:
            self._process()
        if not self.blocked and not self.closing and self.upgrading is None:
            self.transport.resume_reading()

    def connection_lost(self, exc):
        # Also called by _start_tls when the upgrade fails: whether the transport then
        # reports the loss to this protocol is up to the event loop.
        if self.lost:
            return
        self.lost = True
        for timer in (self.timer, self.idle_timer):
            if timer:
                timer.cancel()
        if self.session is not None:
            self.session.export.clients -= 1
        self.server.released(self)

    # --- phases ---

    def _handshake_expired(self):
        log.info("%s: handshake not finished in %ss, disconnecting", self.peer,
                 self.server.config.handshake_timeout)
        self.transport.abort()

    def _negotiate(self, data):
        for event in self.handshake.feed(data):
            if isinstance(event, Send):
                self.transport.write(event.data)
            elif isinstance(event, Close):
                log.info("%s: %s", self.peer, event.reason)
                self.close()
            elif isinstance(event, StartTLS):
                self.upgrading = []
                self.transport.pause_reading()
                self.server.loop.create_task(self._start_tls())
            elif isinstance(event, Ready):
                if self.timer:
                    self.timer.cancel()
                    self.timer = None
                self.handshake = None
                self.session = event.session
                export = self.session.export
                export.clients += 1
                log.info("%s: serving export %r", self.peer, export.name)
                self.parser = t.RequestParser()
                self.allowed = t.allowed_flags(self.session)
                idle = self.server.config.idle_timeout
                if idle:
                    self.active_at = self.server.loop.time()
                    self.idle_timer = self.server.loop.call_later(idle, self._idle_check)
                if event.leftover:
                    self.parser.push(event.leftover)
                    self._process()

    async def _start_tls(self):
        """proto.md FORCEDTLS: "After an NBD_REP_ACK reply has been sent, the server MUST
        be prepared for a TLS handshake ... If the handshake is unsuccessful ... the
        server MUST terminate the session". The ACK is already in the transport's buffer,
        ahead of the first TLS record."""
        server = self.server
        raw = self.transport
        try:
            self.transport = await server.loop.start_tls(raw, self, server.ssl_context,
                                                         server_side=True)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            log.info("%s: TLS handshake failed: %s", self.peer, e or type(e).__name__)
            raw.abort()
            self.connection_lost(e)
            return
        if self.closing or self.lost:
            self.transport.abort()
            return
        why = tls.refusal(server.tls, self.transport.get_extra_info("peercert"))
        if why:
            log.warning("%s: %s, disconnecting", self.peer, why)
            self.close()
            return
        log.info("%s: TLS started (%s)", self.peer, self.transport.get_extra_info("cipher"))
        early, self.upgrading = self.upgrading, None
        self.transport.resume_reading()
        for data in early:
            self.data_received(data)

    def _idle_check(self):
        idle = self.server.config.idle_timeout
        quiet = self.server.loop.time() - self.active_at
        if quiet >= idle:
            log.info("%s: idle for %ss, disconnecting", self.peer, idle)
            self.transport.abort()
        else:
            self.idle_timer = self.server.loop.call_later(idle - quiet, self._idle_check)

    def _process(self):
        """Execute queued requests until none is complete or max_queued_bytes of replies
        wait to be sent; pause_writing (at the same bound) stops both this and reading."""
        parser = self.parser
        transport = self.transport
        handle = self._handle
        budget = self.server.config.max_queued_bytes
        out = []
        queued = transport.get_write_buffer_size()
        try:
            while not self.blocked and not self.closing:
                req = parser.pop()
                if req is None:
                    break
                pieces = handle(req)
                out += pieces
                for piece in pieces:
                    queued += len(piece)
                if queued >= budget:
                    transport.writelines(out)   # may call pause_writing
                    out = []
                    queued = transport.get_write_buffer_size()
        except t.ProtocolError as e:
            log.info("%s: %s, disconnecting", self.peer, e)
            transport.abort()
            return
        if out:
            transport.writelines(out)
        if parser.disconnected and not self.closing:
            # NBD_CMD_DISC: every earlier request has been answered above; close once
            # their replies are written.
            self.close()

    def close(self):
        self.closing = True
        self.transport.close()

    # --- transmission: one request in, reply pieces out ---

    def _handle(self, req: t.Request) -> list:
        session = self.session
        export = session.export
        err, msg = t.check(session, self.allowed, export.size, req)
        if err:
            return self._error(req, err, msg)
        try:
            return _DISPATCH[req.cmd](self, export, req)
        except IOFailure as e:
            return self._error(req, p.nbd_error(e.errno), str(e))
        except OSError as e:
            return self._error(req, p.nbd_error(e.errno), e.strerror or str(e))
        except Exception:  # a bug must cost this request, not the server or the client
            log.exception("%s: request %d failed", self.peer, req.cmd)
            return self._error(req, p.EIO, "internal error")

    def _error(self, req, err: int, message: str) -> list:
        if err == p.EIO:
            log.warning("%s: command %d at %d+%d: %s", self.peer, req.cmd, req.offset,
                        req.length, message)
        if self.session.structured and req.cmd in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            return [t.error_chunk(req.cookie, err, message)]
        return [t.simple_reply(req.cookie, err)]

    def _read(self, export, req):
        cookie, offset, length = req.cookie, req.offset, req.length
        if not self.session.structured:
            if length == 0:
                return [t.simple_reply(cookie)]
            return [t.simple_reply(cookie), export.read(offset, length)]
        if length == 0:
            return [t.none_chunk(cookie)]
        if req.flags & p.CMD_FLAG_DF:
            return t.data_chunk(cookie, offset, export.read(offset, length), True)
        # Ranges the image knows read as zeros go out as OFFSET_HOLE chunks: no payload.
        out = []
        parts = export.read_parts(offset, length)
        final = len(parts) - 1
        for i, (n, data) in enumerate(parts):
            if data is None:
                out.append(t.hole_chunk(cookie, offset, n, i == final))
            else:
                out += t.data_chunk(cookie, offset, data, i == final)
            offset += n
        return out

    def _write(self, export, req):
        if req.length:
            export.write(req.offset, req.payload, bool(req.flags & p.CMD_FLAG_FUA))
        return [t.simple_reply(req.cookie)]

    def _disc(self, export, req):
        log.info("%s: client disconnected", self.peer)
        return []

    def _flush(self, export, req):
        export.flush()
        return [t.simple_reply(req.cookie)]

    def _trim(self, export, req):
        if req.length:
            export.trim(req.offset, req.length, bool(req.flags & p.CMD_FLAG_FUA))
        return [t.simple_reply(req.cookie)]

    def _cache(self, export, req):
        # Advisory (proto.md NBD_CMD_CACHE): the engines read through the page cache,
        # which gains nothing from being told in advance.
        return [t.simple_reply(req.cookie)]

    def _write_zeroes(self, export, req):
        if req.length:
            f = req.flags
            export.write_zeroes(req.offset, req.length, no_hole=bool(f & p.CMD_FLAG_NO_HOLE),
                                fast=bool(f & p.CMD_FLAG_FAST_ZERO),
                                fua=bool(f & p.CMD_FLAG_FUA))
        return [t.simple_reply(req.cookie)]

    def _block_status(self, export, req):
        one = bool(req.flags & p.CMD_FLAG_REQ_ONE)
        contexts = self.session.contexts
        out = []
        for i, (cid, ctx) in enumerate(contexts):
            extents = ctx.extents(req.offset, req.length, one)
            out += t.block_status_chunk(req.cookie, cid, extents, i == len(contexts) - 1)
        return out


_DISPATCH = {
    p.CMD_READ: Connection._read,
    p.CMD_WRITE: Connection._write,
    p.CMD_DISC: Connection._disc,
    p.CMD_FLUSH: Connection._flush,
    p.CMD_TRIM: Connection._trim,
    p.CMD_CACHE: Connection._cache,
    p.CMD_WRITE_ZEROES: Connection._write_zeroes,
    p.CMD_BLOCK_STATUS: Connection._block_status,
}


def _bind_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not _stale_socket(path):
                raise
            os.unlink(path)  # left behind by a server that died: nobody listens on it
            sock.bind(path)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise QnbdError(f"Failed to bind socket to {path}: {e.strerror or e}") from None
    return sock


def _stale_socket(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


class Server:
    def __init__(self, config, exports, loop):
        self.config = config
        self.catalog = Catalog(exports)
        self.loop = loop
        self.tls = config.tls
        self.tls_mode = config.tls.mode if config.tls else "off"
        self.ssl_context = tls.server_context(config.tls) if self.tls_mode != "off" else None
        self.servers = []
        self.unix_paths = []
        self.active: set[Connection] = set()
        self.waiting: collections.deque[Connection] = collections.deque()
        self.served = 0
        self.stopping = False
        self.stopped = loop.create_future()

    async def start(self):
        factory = lambda: Connection(self)  # noqa: E731
        for listener in self.config.listeners:
            if listener.fd is not None:
                sock = socket.socket(fileno=listener.fd)
                if sock.family == socket.AF_UNIX:
                    srv = await self.loop.create_unix_server(factory, sock=sock)
                else:
                    srv = await self.loop.create_server(factory, sock=sock)
            elif listener.unix is not None:
                sock = _bind_unix(listener.unix)
                self.unix_paths.append(listener.unix)
                srv = await self.loop.create_unix_server(factory, sock=sock)
            else:
                try:
                    srv = await self.loop.create_server(factory, listener.address,
                                                        listener.port, reuse_address=True)
                except OSError as e:
                    raise QnbdError(f"Failed to bind socket to {listener.describe()}: "
                                    f"{e.strerror or e}") from None
            self.servers.append(srv)
            log.info("listening on %s", listener.describe())
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop, sig.name)

    # --- connection accounting (qemu-nbd -e: extra clients wait, unanswered) ---

    def accepted(self, conn: Connection):
        if self.stopping:
            conn.transport.abort()
            return
        conn.transport.pause_reading()
        if len(self.active) < self.config.max_connections:
            self.active.add(conn)
            self.served += 1
            conn.start()
        elif len(self.waiting) < MAX_WAITING:
            self.waiting.append(conn)
        else:
            log.warning("%s: too many connections, refused", conn.peer)
            conn.transport.abort()

    def released(self, conn: Connection):
        if conn in self.active:
            self.active.discard(conn)
            while self.waiting and not self.stopping:
                nxt = self.waiting.popleft()
                if not nxt.transport.is_closing():
                    self.active.add(nxt)
                    self.served += 1
                    nxt.start()
                    break
        elif conn in self.waiting:
            self.waiting.remove(conn)
        if not self.stopping and not self.config.persistent and self.served \
                and not self.active and not self.waiting:
            # qemu-nbd without --persistent: exit once the last client has gone.
            self.stop("last client disconnected")

    def stop(self, why: str):
        """Stop accepting; close every connection once its replies are written. Requests
        run inline, so none is in flight between callbacks."""
        if self.stopping:
            return
        log.info("shutting down (%s)", why)
        self.stopping = True
        self.catalog.shutting_down = True
        for srv in self.servers:
            srv.close()
        for conn in list(self.waiting) + list(self.active):
            conn.close()
        self.stopped.set_result(None)

    async def run_until_stopped(self):
        await self.stopped
        deadline = self.loop.time() + SHUTDOWN_GRACE
        while self.active or self.waiting:
            if self.loop.time() > deadline:
                # Clients that do not take their last replies are cut off.
                for conn in list(self.active) + list(self.waiting):
                    conn.transport.abort()
                deadline = float("inf")
            await asyncio.sleep(0.01)

    def cleanup(self):
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def serve(config, on_ready=None) -> int:
    """Open the exports, listen, call `on_ready()` once clients can connect, and serve until
    SIGTERM/SIGINT (or, without persistent, until the last client leaves). Images are
    flushed and closed on the way out."""
    exports = []
    tune_malloc()  # reply buffers are reused instead of page-faulted in per request
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = None
    try:
        for cfg in config.exports:
            exports.append(Export.open(cfg))
        server = Server(config, exports, loop)
        loop.run_until_complete(server.start())
        if config.pid_file:
            _write_pid_file(config.pid_file)
        if on_ready:
            on_ready()
        loop.run_until_complete(server.run_until_stopped())
    finally:
        try:
            for export in exports:
                export.close()
        finally:
            if server is not None:
                server.cleanup()
            if config.pid_file and server is not None:
                _remove(config.pid_file)
            loop.close()
            asyncio.set_event_loop(None)
    return 0


def _write_pid_file(path: str) -> None:
    try:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise QnbdError(f"Cannot write pid file {path}: {e.strerror}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
