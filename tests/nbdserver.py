"""Starting `qnbd serve` for tests the way a user does (the CLI, in a subprocess), and a
minimal raw NBD client for what libnbd will not send.

QNBD_SERVE_CMD overrides the command line that starts the server (default:
`python -m qnbd.cli serve`), e.g. to run the suite against an installed qnbd.
"""

import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import nbd
import pytest

SERVE = shlex.split(os.environ.get("QNBD_SERVE_CMD", "")) or [sys.executable, "-m", "qnbd.cli", "serve"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_tmpdir() -> str:
    """Unix socket paths must stay under ~100 bytes: pytest's tmp_path can be longer."""
    return tempfile.mkdtemp(prefix="qnbd-", dir="/tmp")


def make_raw(path, size: int, data: bytes = b"", offset: int = 0) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.seek(offset)
            f.write(data)
    return str(path)


def serve_cmd(*args) -> list[str]:
    return SERVE + [str(a) for a in args]


def run_serve(*args, timeout=20, **kw) -> subprocess.CompletedProcess:
    """Run `qnbd serve ARGS` to completion (for option errors, --fork)."""
    return subprocess.run(serve_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, **kw)


def wait_for_socket(path: str, proc: subprocess.Popen | None = None, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"server did not listen on {path}")


class Server:
    """A running `qnbd serve -k SOCKET ... IMAGE`."""

    def __init__(self, args, sock: str, env=None, pass_fds=()):
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self.proc = subprocess.Popen(serve_cmd(*args), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                                     pass_fds=pass_fds)

    def uri_for(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self, sig=signal.SIGTERM, timeout=10) -> tuple[int, str]:
        """Signal the server, wait; return (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"server did not stop on {sig!r}: {err}")
        return self.proc.returncode, err


@pytest.fixture
def serve():
    """serve(IMAGE, *options) -> a persistent Server listening on a fresh unix socket."""
    started = []
    dirs = []

    def start(image, *options):
        d = short_tmpdir()
        dirs.append(d)
        sock = os.path.join(d, "nbd.sock")
        args = ["-k", sock, "-t", *options, image]
        server = Server(args, sock)
        started.append(server)
        wait_for_socket(sock, server.proc)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# --- libnbd helpers ---------------------------------------------------------------------

def connect(uri: str, *contexts) -> nbd.NBD:
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def status(h: nbd.NBD, context: str, offset: int, length: int, flags: int = 0):
    """The descriptors one BLOCK_STATUS request returns for `context`, with offsets."""
    out = []

    def cb(name, off, entries, err):
        if name == context:
            pos = off
            for n, f in zip(entries[::2], entries[1::2]):
                out.append((pos, n, f))
                pos += n
        return 0
    h.block_status(length, offset, cb, flags)
    return out


# --- a raw client: bytes on the wire, for edge cases and for what libnbd will not send ---

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9


class RawClient:
    def __init__(self, path: str, timeout: float = 5):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)

    def close(self):
        self.s.close()

    def recv(self, n: int) -> bytes:
        return bytes(recv_exactly(self.s, n))

    def closed_by_server(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def greeting(self, client_flags: int = 3) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", client_flags))
        return hflags

    def send_option(self, option: int, data: bytes = b"", length: int | None = None):
        n = len(data) if length is None else length
        self.s.sendall(struct.pack(">QII", IHAVEOPT, option, n) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPLY_MAGIC
        return option, rtype, self.recv(length)

    def option_replies(self) -> list[tuple[int, bytes]]:
        """Replies up to and including the final one (ACK or an error)."""
        out = []
        while True:
            _, rtype, data = self.option_reply()
            out.append((rtype, data))
            if rtype == 1 or rtype & (1 << 31):
                return out

    def go(self, name: str = "", structured: bool = False, contexts=()) -> tuple[int, int]:
        """Handshake up to transmission; returns (size, transmission flags)."""
        self.greeting()
        if structured:
            self.send_option(8)
            assert self.option_replies()[-1][0] == 1
        if contexts:
            self.send_option(10, meta_payload(name, contexts))
            assert self.option_replies()[-1][0] == 1
        n = name.encode()
        self.send_option(7, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        size = flags = None
        for rtype, data in self.option_replies():
            if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
                _, size, flags = struct.unpack(">HQH", data)
            assert not rtype & (1 << 31), (rtype, data)
        return size, flags

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, payload: bytes = b""):
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)
                       + payload)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698, hex(magic)
        return error, cookie

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, ctype, cookie, length = struct.unpack(">IHHQI", self.recv(20))
        assert magic == 0x668E33EF, hex(magic)
        return flags, ctype, cookie, self.recv(length)

    def chunks(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        while True:
            c = self.chunk()
            out.append(c)
            if c[0] & 1:
                return out


def recv_exactly(s: socket.socket, n: int) -> bytearray:
    """n bytes from s into one buffer (replies of tens of MiB are not joined piece by piece)."""
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = s.recv_into(view[pos:])
        if not got:
            raise EOFError(f"closed after {pos} of {n} bytes")
        pos += got
    return buf


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def meta_payload(name: str, queries) -> bytes:
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


# --- servers of either kind: qemu-nbd (the oracle) or qnbd serve ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server process (qemu-nbd or qnbd serve) listening on a unix socket or TCP port."""

    def __init__(self, cmd, sock=None, port=None):
        self.sock, self.port = sock, port
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                if sock:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(sock)
                else:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{cmd[0]} did not start: {self.stop()}")
                time.sleep(0.02)

    def where(self) -> list[str]:
        return ["-k", self.sock] if self.sock else ["-b", "127.0.0.1", "-p", str(self.port)]

    def stop(self) -> str:
        """Stop the server; its stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or ""


@pytest.fixture
def servers():
    """start(PROGRAM_ARGS..., tcp=False) -> a Running qemu-nbd or qnbd; stopped after."""
    started, dirs = [], []

    def start(program: str, *args, tcp: bool = False) -> Running:
        d = short_tmpdir()
        dirs.append(d)
        sock, port = (None, free_port()) if tcp else (os.path.join(d, "s"), None)
        where = ["-b", "127.0.0.1", "-p", port] if tcp else ["-k", sock]
        cmd = ["qemu-nbd"] if program == "qemu-nbd" else serve_cmd()
        server = Running([*cmd, "-t", *where, *args], sock, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
