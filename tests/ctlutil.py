"""Talking to `qnbd serve --control PATH` from tests: raw lines (what a script or an
attacker sends) and `qnbd ctl` as a user runs it."""

import json
import os
import socket
import subprocess
import sys

from nbdserver import REPO, short_tmpdir


def control_path() -> str:
    return os.path.join(short_tmpdir(), "ctl")


class ControlClient:
    """One control connection: send lines, read reply lines."""

    def __init__(self, path: str, timeout: float = 10):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""

    def close(self):
        self.s.close()

    def send(self, raw: bytes) -> None:
        self.s.sendall(raw)

    def line(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            assert chunk, "control socket closed"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, command: str, **args) -> dict:
        self.send(json.dumps({"command": command, "args": args}).encode() + b"\n")
        return self.line()


def ctl(path: str, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "qnbd.cli", "ctl", path, *map(str, args)],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def ctl_json(path: str, *args):
    return json.loads(subprocess.run(
        [sys.executable, "-m", "qnbd.cli", "ctl", "--json", path, *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=True).stdout)
