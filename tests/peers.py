"""qemu-nbd and `qnbd serve` side by side: the same command line run by both, and servers
of either kind started for a test, so tests compare what a script sees from each."""

import os
import shutil
import socket
import subprocess
import time

import pytest

from nbdserver import serve_cmd, short_tmpdir


def run(*cmd, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, **kw)


def both(*args) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The same command line run by qemu-nbd and by qnbd serve."""
    return run("qemu-nbd", *args), run(*serve_cmd(*args))


def as_qnbd(qemu_text: str) -> str:
    """qemu-nbd's output with its program name as qnbd's."""
    return qemu_text.replace("qemu-nbd", "qnbd serve")


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
                    self.stop()
                    raise AssertionError(f"{cmd[0]} did not start: {self.proc.stderr.read()}")
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


def copy_image(src, dst) -> str:
    shutil.copyfile(src, dst)
    return str(dst)
