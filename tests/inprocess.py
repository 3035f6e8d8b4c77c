"""A server connection in process, for tests of what the asyncio side does with the
sans-I/O core's output: asyncio's flow control and event loop turns simulated."""

import struct
import time
import types

from qnbd.config import ServerConfig
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from qnbd.nbd.catalog import transmission_flags
from qnbd.nbd.connection import Connection
from qnbd.nbd.handshake import Session
from qnbd.nbd.transmission import Transmission

MiB = 1 << 20


def read_request(cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, cookie, offset, length)


class FlowTransport:
    """Buffers writes like a socket nobody reads; pause_writing above `high`."""

    def __init__(self):
        self.buffered = 0
        self.high = None
        self.reading = True
        self.protocol = None

    def set_write_buffer_limits(self, high):
        self.high = high

    def close(self):
        pass

    def get_write_buffer_size(self):
        return self.buffered

    def writelines(self, pieces):
        was = self.buffered > self.high
        self.buffered += sum(len(x) for x in pieces)
        if self.buffered > self.high and not was:
            self.protocol.pause_writing()

    def drain(self):
        self.buffered = 0
        self.protocol.resume_writing()

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


class _Zeros:
    size = 64 * MiB
    read_only = True
    supports_fast_zero = False

    def read(self, offset, length):
        return bytes(length)


class FakeLoop:
    """Runs call_soon callbacks when asked: one `turn()` is one event loop iteration."""

    def __init__(self):
        self.soon = []

    def time(self):
        return time.monotonic()

    def call_soon(self, fn):
        self.soon.append(fn)

    def turn(self):
        soon, self.soon = self.soon, []
        for fn in soon:
            fn()


def in_process_connection(budget: int, device=None):
    """A Connection in transmission phase on `device` (default: 64 MiB of zeros), with a
    transport that nobody reads and a loop that turns only when told."""
    config = ServerConfig(exports=[], listeners=[], max_queued_bytes=budget)
    server = types.SimpleNamespace(loop=FakeLoop(), config=config)
    conn = Connection(server)
    conn.transport = transport = FlowTransport()
    transport.protocol = conn
    transport.set_write_buffer_limits(high=budget)
    export = Export(ExportConfig(image="-"), device or _Zeros())
    conn.tx = Transmission(Session(export, transmission_flags(export, False), False))
    return conn, transport, server.loop


class RecordingTransport:
    """Keeps every reply byte; never pushes back."""

    def __init__(self):
        self.data = bytearray()
        self.closed = False

    def set_write_buffer_limits(self, high):
        pass

    def get_extra_info(self, name, default=None):
        return default   # no socket

    def get_write_buffer_size(self):
        return 0

    def writelines(self, pieces):
        for piece in pieces:
            self.data += piece

    def write(self, data):
        self.data += data

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True


def pooled_connections(loop, export: Export, count: int = 1, structured: bool = False,
                       idle_timeout: float = 0.0):
    """`count` Connections in transmission phase on `export`, wired to a ReadPool and a
    WritePool on the real event loop `loop`, as the server wires them; returns the
    connections (each `.transport.data` holds its replies) and the server namespace."""
    from qnbd.nbd.reads import ReadPool
    from qnbd.nbd.writes import WritePool

    config = ServerConfig(exports=[], listeners=[], idle_timeout=idle_timeout)
    server = types.SimpleNamespace(loop=loop, config=config, reads=ReadPool(loop),
                                   writes=WritePool(loop),
                                   catalog=types.SimpleNamespace(stats={}))
    server.released = server.accepted = lambda conn: None
    conns = []
    for _ in range(count):
        conn = Connection(server)
        conn.transport = RecordingTransport()
        session = Session(export, transmission_flags(export, structured), structured)
        conn._transmission(types.SimpleNamespace(session=session, leftover=b""))
        conns.append(conn)
    return conns, server


def close_pooled(server, export: Export) -> None:
    """What the server does at exit, for `pooled_connections`: the writes still out
    committed, the reads out waited for, then the export closed."""
    server.writes.shutdown()
    server.reads.shutdown()
    export.close()
