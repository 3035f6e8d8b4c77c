"""The server's life: open the exports, take the pid file, listen, serve, and shut down
cleanly on SIGTERM/SIGINT/SIGHUP (or, without --persistent, when the last client leaves), as
qemu-nbd does. Connection slots (qemu-nbd -e) and the server-wide reply cap live here; one
client's bytes live in connection.py, the protocol in handshake.py and transmission.py.

Signals are handled from the very start, before any image is opened and before any socket
listens: a SIGTERM that arrives while an image is opened (or repaired) or while the
listeners start is kept and honoured as soon as that step ends, so images are always closed
cleanly (bitmaps leave `in_use`).
"""

import asyncio
import collections
import logging
import os
import signal

import uvloop

from ..errors import QnbdError
from ..export import Export
from ..memory import tune_malloc
from . import tls
from .buffers import Buffers
from .catalog import Catalog
from .connection import Connection
from .reads import ReadPool
from .uring import RingUnavailable
from .writes import WritePool
from .listeners import listen
from .pidfile import PidFile

log = logging.getLogger("qnbd.serve")

# Connections held unanswered (beyond max_connections) before new ones are refused.
MAX_WAITING = 128
# How long shutdown waits for clients to take their last replies before cutting them off.
SHUTDOWN_GRACE = 5.0
# A connection's reply budget never drops below this, however many share the server cap:
# it must hold at least one step of the transmission core.
MIN_BUDGET = 8 << 20


class Server:
    def __init__(self, config, loop):
        self.config = config
        self.loop = loop
        self.catalog: Catalog | None = None
        self.tls = config.tls
        self.tls_mode = config.tls.mode if config.tls else "off"
        self.ssl_context = None
        self.servers = []
        self.unix_paths = []
        self.active: set[Connection] = set()
        self.waiting: collections.deque[Connection] = collections.deque()
        self.served = 0
        self.stopping = False
        self.stopped = loop.create_future()
        self.buffers = Buffers()   # large READ replies' and WRITE payloads' (buffers.py)
        try:   # reads that miss the page cache (docs/DESIGN.md "I/O model")
            self.reads = ReadPool(loop, buffers=self.buffers, aio=config.aio)
        except RingUnavailable as e:   # --aio=io_uring: at start-up, as qemu-nbd
            raise QnbdError(f"Unable to use io_uring: {e}") from None
        self.writes = WritePool(loop)   # large writes (writes.py)

    def install_signals(self):
        # qemu-nbd stops cleanly on SIGHUP too (a closed terminal): images closed, the
        # socket removed, exit status 0.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self.stop, sig.name)

    async def start(self, exports):
        """Listen on every listener, unless a signal asked to stop meanwhile."""
        if self.catalog is None:
            self.catalog = Catalog(exports)
        if self.tls_mode != "off":
            self.ssl_context = tls.server_context(self.tls)
        factory = lambda: Connection(self)  # noqa: E731
        for listener in self.config.listeners:
            if self.stopping:
                return
            srv = await listen(self.loop, listener, factory)
            if listener.unix is not None:
                self.unix_paths.append(listener.unix)
            if self.stopping:   # a signal came while it started
                srv.close()
                return
            self.servers.append(srv)
            log.info("listening on %s", listener.describe())

    # --- connection accounting (qemu-nbd -e: extra clients wait, unanswered) ---

    def accepted(self, conn: Connection):
        if self.stopping:
            conn.transport.abort()
            return
        conn._set_reading(False)
        if len(self.active) < self.config.max_connections:
            self._activate(conn)
        elif len(self.waiting) < MAX_WAITING:
            self.waiting.append(conn)
        else:
            log.warning("%s: too many connections, refused", conn.peer)
            conn.transport.abort()

    def _activate(self, conn: Connection):
        self.active.add(conn)
        self.served += 1
        self._share_budget()
        conn.start()

    def _share_budget(self):
        """max_queued_total split between the connections being served."""
        cfg = self.config
        budget = max(MIN_BUDGET, min(cfg.max_queued_bytes,
                                     cfg.max_queued_total // max(1, len(self.active))))
        for conn in self.active:
            if conn.budget != budget:
                conn.set_budget(budget)

    def released(self, conn: Connection):
        if conn in self.active:
            self.active.discard(conn)
            while self.waiting and not self.stopping:
                nxt = self.waiting.popleft()
                if not nxt.transport.is_closing():
                    self._activate(nxt)
                    break
            self._share_budget()
        elif conn in self.waiting:
            self.waiting.remove(conn)
        if not self.active:
            self.buffers.trim()   # nobody to reuse them for
        if not self.stopping and not self.config.persistent and self.served \
                and not self.active and not self.waiting:
            # qemu-nbd without --persistent: exit once the last client has gone.
            self.stop("last client disconnected")

    def stop(self, why: str):
        """Stop accepting; close every connection once its replies are written."""
        if self.stopping:
            return
        log.info("shutting down (%s)", why)
        self.stopping = True
        if self.catalog is not None:
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
                    conn.abort()
                deadline = float("inf")
            await asyncio.sleep(0.01)

    def cleanup(self):
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def serve(config, on_ready=None, services=()) -> int:
    """Open the exports, listen, call `on_ready()` once clients can connect, and serve until
    SIGTERM/SIGINT/SIGHUP (or, without persistent, until the last client leaves). Images are
    flushed and closed on the way out.

    `services` are `async start(server) -> close()` callables run once the exports are open
    and before the NBD listeners start (the control socket, the metrics endpoint): the
    server knows nothing of them (docs/DESIGN.md "Layers": they sit above it)."""
    exports = []
    closers = []
    tune_malloc()  # reply buffers are reused instead of page-faulted in per request
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        server = Server(config, loop)
    except BaseException:
        asyncio.set_event_loop(None)
        loop.close()
        raise
    pid_file = None

    async def run():
        # One run of the loop from the first signal handler to the end: uvloop reads
        # signals only while it runs, so a SIGTERM during an image open (a repair) is
        # kept and honoured right after it instead of being lost.
        nonlocal pid_file
        server.install_signals()
        if config.pid_file:
            pid_file = PidFile(config.pid_file)
        for cfg in config.exports:
            exports.append(Export.open(cfg))
        server.catalog = Catalog(exports)
        for start in services:
            if server.stopping:
                break
            closers.append(await start(server))
        await server.start(exports)
        if on_ready and not server.stopping:
            on_ready()
        await server.run_until_stopped()

    try:
        loop.run_until_complete(run())
    finally:
        for close in closers:
            close()
        try:
            server.writes.shutdown()   # nor a write, and each one's mapping is installed
            server.reads.shutdown()   # no read may be out on a file being closed
            for export in exports:
                export.close()
        finally:
            server.cleanup()
            if pid_file is not None:
                pid_file.close()
            loop.close()
            asyncio.set_event_loop(None)
    return 0
