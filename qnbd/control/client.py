"""The client side of the control socket, for `qnbd ctl` and scripts: one request, one
reply line (protocol.py)."""

import json
import socket

from ..errors import QnbdError

# The longest reply read (metrics of many exports); a server past it is refused.
MAX_REPLY = 64 << 20


class ControlFailure(QnbdError):
    """The server refused a request: its code and one-line message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def request(path: str, command: str, args: dict | None = None, timeout: float = 30):
    """The result of `command`, or ControlFailure / QnbdError."""
    doc = {"command": command, "args": args or {}}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(doc).encode() + b"\n")
            line = _read_line(s)
    except OSError as e:
        raise QnbdError(f"{path}: {e.strerror or e}") from None
    try:
        reply = json.loads(line)
        if reply["ok"]:
            return reply["result"]
        err = reply["error"]
        raise ControlFailure(str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        raise QnbdError(f"{path}: not a qnbd control socket (bad reply)") from None


def _read_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 16)
        if not chunk:
            raise QnbdError("the server closed the control connection without a reply")
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise QnbdError(f"control reply longer than {MAX_REPLY} bytes")
    return bytes(buf)
