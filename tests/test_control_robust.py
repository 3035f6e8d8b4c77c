"""The control socket under abuse and load (issue 15): many clients at once, a line that
never ends, clients that leave mid-request or never read their replies, checkpoints
taken while several connections write, and a release while a reader reads the view. The
server must answer every well-formed request, keep its memory bounded, and go on serving
NBD clients throughout."""

import asyncio
import json
import socket
import threading
import time

from ctlutil import ControlClient, control_path
from qnbd.control.service import PER_TURN, ControlConnection
from images import MiB
from nbdserver import connect, rss
from peers import check_clean, qemu_img
from writers import Writer, model, read_all

SIZE = 16 * MiB
# The server's control-client cap (qnbd/control/service.py MAX_CLIENTS), as seen from the
# outside: past it a client is told `busy` and closed.
CAP = 16


def image(tmp_path) -> str:
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    return img


def test_many_clients_at_once_and_one_too_many(tmp_path, serve):
    path = control_path()
    serve(image(tmp_path), "-x", "disk", "--control", path)
    clients = [ControlClient(path) for _ in range(CAP)]
    extra = ControlClient(path)
    reply = extra.line()
    assert reply["ok"] is False and reply["error"]["code"] == "busy"
    extra.close()
    errors = []

    def hammer(c):
        try:
            for i in range(50):
                c.send(json.dumps({"command": "exports", "id": i}).encode() + b"\n")
                r = c.line()
                assert r["ok"] and r["id"] == i and r["result"][0]["name"] == "disk"
        except Exception as e:   # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for c in clients:
        c.close()
    # Their places are free again.
    deadline = time.monotonic() + 5
    while True:
        c = ControlClient(path)
        r = c.call("exports")
        c.close()
        if r["ok"] or time.monotonic() > deadline:
            break
    assert r["ok"], r


def test_an_endless_line_costs_one_error_and_bounded_memory(tmp_path, serve):
    path = control_path()
    server = serve(image(tmp_path), "-x", "disk", "--control", path)
    c = ControlClient(path)
    assert c.call("exports")["ok"]
    before = rss(server.proc.pid)
    chunk = b"x" * (1 << 20)
    for _ in range(256):   # 256 MiB without a newline
        c.send(chunk)
    c.send(b"\n")
    r = c.line()
    assert r["ok"] is False and r["error"]["code"] == "line-too-long"
    assert rss(server.proc.pid) - before < 32 * MiB
    # One error for the whole line, and the same connection goes on.
    assert c.call("exports")["ok"]
    c.close()


def test_clients_that_leave_mid_request_or_never_read(tmp_path, serve):
    path = control_path()
    server = serve(image(tmp_path), "-x", "disk", "-e", "0", "--control", path)
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b'{"command": "expo')           # half a request, then gone
        s.close()
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b'{"command": "metrics"}\n')   # a whole one, reply never read
        s.close()
    # A client that floods requests and reads nothing is paused, not buffered for.
    flood = socket.socket(socket.AF_UNIX)
    flood.connect(path)
    flood.setblocking(False)
    before = rss(server.proc.pid)
    sent = 0
    line = b'{"command": "exports"}\n' * 4096
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sent < 256 * MiB:
        try:
            sent += flood.send(line)
        except BlockingIOError:
            time.sleep(0.01)
            if time.monotonic() > deadline - 8:   # the server stopped reading: enough
                break
    assert sent < 256 * MiB, "the server kept reading a client that reads nothing"
    assert rss(server.proc.pid) - before < 32 * MiB
    # Everyone else is served meanwhile: control and NBD.
    c = ControlClient(path)
    assert c.call("exports")["ok"]
    h = connect(server.uri_for("disk"))
    h.pwrite(b"y" * 4096, 0)
    assert h.pread(4096, 0) == b"y" * 4096
    h.shutdown()
    flood.close()
    c.close()
    code, err = server.stop()
    assert code == 0, err


def test_checkpoint_during_writes_from_several_connections(tmp_path, serve):
    """Each writer has a region of its own, so each region of the view must be its
    writer's model after some k_i writes, k_i between the writes answered before the
    checkpoint was asked for and those sent before its reply came."""
    img = image(tmp_path)
    path = control_path()
    server = serve(img, "-x", "disk", "-e", "0", "--control", path)
    base = bytes(SIZE)
    n = 3
    region = SIZE // n // 65536 * 65536
    writers = [Writer(server.uri_for("disk"), i * region, (i + 1) * region, tag=i + 1)
               for i in range(n)]
    c = ControlClient(path)
    for w in writers:
        w.start()
    try:
        for w in writers:
            w.wait_for(100)
        lo = [w.done for w in writers]
        assert c.call("checkpoint", export="disk", name="cp1")["ok"]
        hi = [w.sent for w in writers]
        for w in writers:
            w.wait_for(w.done + 100)   # the view is read while they go on
        seen = read_all(server.uri_for("disk@cp1"))
        # A reader on the view: release is refused under it, then succeeds.
        reader = connect(server.uri_for("disk@cp1"))
        stop = threading.Event()

        def read_loop():
            while not stop.is_set():
                reader.pread(1 * MiB, 0)

        t = threading.Thread(target=read_loop)
        t.start()
        try:
            r = c.call("release", export="disk@cp1")
            assert r["ok"] is False and r["error"]["code"] == "busy", r
        finally:
            stop.set()
            t.join()
        reader.shutdown()
        deadline = time.monotonic() + 5
        while not (r := c.call("release", export="disk@cp1"))["ok"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)   # the server sees the reader leave a moment later
        assert r["ok"], r
    finally:
        for w in writers:
            w.halt.set()
        for w in writers:
            w.join()
    for i, w in enumerate(writers):
        part = seen[i * region:(i + 1) * region]
        matches = [k for k in range(lo[i], hi[i] + 1)
                   if model(base, w.writes[:k])[i * region:(i + 1) * region] == part]
        assert matches, f"writer {i}: the view matches none of its states {lo[i]}..{hi[i]}"
    final = bytes(SIZE)
    for w in writers:
        final = model(final, w.writes)
    assert read_all(server.uri_for("disk")) == final
    c.close()
    for w in writers:
        w.h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    check_clean(img)


class FakeTransport:
    def __init__(self):
        self.out = []
        self.reading = True

    def write(self, data):
        self.out.append(data)

    def is_closing(self):
        return False

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def set_write_buffer_limits(self, high):
        pass


def test_a_flood_in_one_read_is_answered_a_few_requests_a_loop_turn():
    """Ten thousand requests may come in one read; answering them all at once would stall
    every NBD client for that long. The rest waits for later turns, unread meanwhile."""
    class Service:
        clients = set()
        writes = None   # no NBD writes to wait for

        def answer(self, line):
            return b'{"ok":true}\n'

    async def main():
        conn = ControlConnection(Service())
        transport = FakeTransport()
        conn.connection_made(transport)
        n = 1000
        conn.data_received(b'{"command": "exports"}\n' * n)
        assert len(transport.out) == PER_TURN and not transport.reading
        turns = 0
        while len(transport.out) < n:
            await asyncio.sleep(0)
            turns += 1
            assert len(transport.out) <= PER_TURN * (turns + 1)
        assert transport.reading   # all answered: the next read may come
    asyncio.run(main())
