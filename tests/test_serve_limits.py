"""Limits against hostile clients (issue 7): the reply queue of a client that does not read
is bounded, idle clients can be dropped, and slowloris clients plus a flood of idle
connections (the CVE-2024-7409 class) do not stop a well-behaved client from being
served. Everything runs on a unix socket on this host and stops by itself."""

import os
import socket
import struct
import threading
import time
import types

import nbd
import pytest

from nbdserver import RawClient, Server, make_raw, recv_exactly, rss, short_tmpdir, wait_for_socket
from qnbd.config import ServerConfig
from qnbd.export import Export, ExportConfig
from qnbd.nbd import protocol as p
from qnbd.nbd.catalog import transmission_flags
from qnbd.nbd.connection import Connection
from qnbd.nbd.handshake import Session
from qnbd.nbd.transmission import Transmission

MiB = 1 << 20


def config_server(tmp_path, image, limits: str) -> Server:
    sock = os.path.join(short_tmpdir(), "s")
    conf = tmp_path / "q.toml"
    conf.write_text(f'[limits]\n{limits}\n[[listen]]\nunix = "{sock}"\n'
                    f'[[export]]\nimage = "{image}"\nformat = "raw"\nshared = 0\n')
    server = Server(["--config", conf], sock)
    wait_for_socket(sock, server.proc)
    return server


def read_request(cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, cookie, offset, length)


# --- the reply queue bound, in process: asyncio's flow control simulated ---


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


def in_process_connection(budget: int):
    config = ServerConfig(exports=[], listeners=[], max_queued_bytes=budget)
    server = types.SimpleNamespace(loop=FakeLoop(), config=config)
    conn = Connection(server)
    conn.transport = transport = FlowTransport()
    transport.protocol = conn
    transport.set_write_buffer_limits(high=budget)
    export = Export(ExportConfig(image="-"), _Zeros())
    conn.tx = Transmission(Session(export, transmission_flags(export, False), False))
    return conn, transport, server.loop


def test_reply_queue_is_bounded_in_process():
    budget = 8 * MiB
    conn, transport, loop = in_process_connection(budget)
    # 100 reads of 1 MiB arrive in one piece: only about `budget` of replies are made.
    conn.data_received(b"".join(read_request(i, 0, MiB) for i in range(100)))
    for _ in range(10):
        loop.turn()
    assert budget <= transport.buffered <= budget + 4 * MiB + 16
    assert not transport.reading and not loop.soon
    answered = transport.buffered
    rounds = 0
    while conn.tx.backlog:
        transport.drain()   # the client takes its replies: the next batch is made
        loop.turn()
        answered += transport.buffered
        rounds += 1
    assert answered == 100 * (MiB + 16) and transport.reading and rounds >= 10


def test_one_turn_does_a_bounded_share_of_work():
    """Fairness: a flood of pipelined reads is answered a few MiB per loop turn, and a
    64 MiB read streams in pieces, so other connections get every turn in between."""
    conn, transport, loop = in_process_connection(256 * MiB)
    conn.data_received(b"".join(read_request(i, 0, MiB) for i in range(40))
                       + read_request(99, 0, 64 * MiB))
    turns = [transport.buffered]
    while loop.soon:
        loop.turn()
        turns.append(transport.buffered - sum(turns))
    assert max(turns) <= 4 * MiB + 1024 and len(turns) >= 26
    assert transport.buffered == 40 * (MiB + 16) + 64 * MiB + 16


# --- against a real server ---


def test_client_that_does_not_read_cannot_grow_the_server(tmp_path):
    image = make_raw(tmp_path / "a.raw", 32 * MiB, b"edge", 32 * MiB - 4)
    server = config_server(tmp_path, image, "max_queued_bytes = 8388608")
    try:
        c = RawClient(server.sock, timeout=20)
        c.go()
        before = rss(server.proc.pid)
        count = 12   # 384 MiB of replies asked for at once
        c.s.sendall(b"".join(read_request(i, 0, 32 * MiB) for i in range(count)))
        time.sleep(1.5)
        grown = rss(server.proc.pid) - before
        assert grown < 150 * MiB, f"server grew by {grown >> 20} MiB"
        for i in range(count):  # and every reply still comes, in order
            assert c.simple_reply() == (0, i)
            data = recv_exactly(c.s, 32 * MiB)
            assert data[-4:] == b"edge"
        c.close()
    finally:
        server.stop()


def test_idle_timeout(tmp_path, serve):
    image = make_raw(tmp_path / "a.raw", MiB, b"data", 0)
    server = serve(image, "-f", "raw", "-e", "0", "--idle-timeout", "0.5")
    busy = nbd.NBD()
    busy.connect_uri(server.uri)
    idle = nbd.NBD()
    idle.connect_uri(server.uri)
    for _ in range(8):     # a client that keeps working is not dropped
        time.sleep(0.15)
        assert busy.pread(4, 0) == b"data"
    with pytest.raises(nbd.Error):
        idle.pread(4, 0)
    busy.shutdown()


def _slowloris(path: str, stop: threading.Event, sockets: list):
    """Connects and sends a valid handshake one byte at a time, forever."""
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        sockets.append(s)
        s.settimeout(0.2)
        stream = struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 1000)
        for b in stream:
            if stop.wait(0.2):
                return
            s.sendall(bytes([b]))
    except OSError:
        pass   # cut off by the server: what it should do


def test_slowloris_and_flood_do_not_stop_service(tmp_path):
    image = make_raw(tmp_path / "a.raw", MiB, b"served", 0)
    server = config_server(tmp_path, image, "max_connections = 16\nhandshake_timeout = 1")
    stop = threading.Event()
    sockets: list = []
    threads = [threading.Thread(target=_slowloris, args=(server.sock, stop, sockets))
               for _ in range(16)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        for _ in range(40):   # a flood of connections that never say anything
            s = socket.socket(socket.AF_UNIX)
            s.connect(server.sock)
            sockets.append(s)
        start = time.monotonic()
        h = nbd.NBD()
        h.connect_uri(server.uri)
        assert h.pread(6, 0) == b"served"
        h.shutdown()
        # Every slot and the queue were taken: the limit that frees them is the handshake
        # time limit, about one second per 16 connections ahead of this one.
        assert time.monotonic() - start < 8
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in sockets:
            s.close()
        code, err = server.stop()
    assert code == 0, err
