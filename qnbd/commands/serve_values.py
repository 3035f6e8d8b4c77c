"""Option values of `qnbd serve` checked as qemu-nbd checks them (qemu-nbd.c, main's
getopt loop), with qemu-nbd's messages: a bad value is one line and exit status 1, and
it is reported when its option is read, so the first bad option is the one named.

These are argparse `type=` functions and actions; the parser (cli.QemuStyleParser)
prints their message alone.
"""

import argparse

from ..export import CACHE_MODES, DETECT_ZEROES_MODES

# qemu's synonyms: bdrv_parse_discard_flags takes off/on, bdrv_parse_cache_mode off.
_DISCARD = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
_CACHE = dict({m: m for m in CACHE_MODES}, off="none")
AIO_MODES = ("threads", "native", "io_uring")


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def c_integer(text: str) -> int | None:
    """strtol with base 0, as qemu_strtoi/qemu_strtou64 call it: decimal, 0x hex or 0
    octal, an optional sign, no trailing characters. None when it is not a number."""
    body = text.strip(" \t\n\r\f\v")
    sign = -1 if body.startswith("-") else 1
    body = body.lstrip("+-") if body[:1] in "+-" else body
    try:
        if body[:2].lower() == "0x":
            return sign * int(body[2:], 16)
        if body.startswith("0") and len(body) > 1:
            return sign * int(body[1:], 8)
        return sign * int(body, 10) if body.isdigit() else None
    except ValueError:
        return None


def discard(text: str) -> str:
    return _DISCARD.get(text) or _fail(f"Invalid discard mode `{text}'")


def cache(text: str) -> str:
    return _CACHE.get(text) or _fail(f"Invalid cache mode `{text}'")


def aio(text: str) -> str:
    # How reads that miss the page cache are waited for (qnbd/nbd/uring.py): io_uring
    # in the ring, threads in the read pool (retries, worker threads); native (Linux
    # AIO, which qnbd does not use) as the default. native needs --cache=none, as in
    # qemu, and O_DIRECT reads go to worker threads whatever the mode.
    return text if text in AIO_MODES else _fail(f"Invalid aio mode '{text}'")


def detect_zeroes(text: str) -> str:
    if text not in DETECT_ZEROES_MODES:
        _fail(f"Failed to parse detect_zeroes mode: invalid parameter value: {text}")
    return text


def shared(text: str) -> int:
    n = c_integer(text)
    if n is None or n < 0 or n >= 1 << 31:
        _fail(f"Invalid shared device number '{text}'")
    return n


def handshake_limit(text: str) -> int:
    """qemu-nbd 10's --handshake-limit: whole seconds, an int (qemu_strtoi), 0 = none."""
    n = c_integer(text)
    if n is None or n < 0 or n >= 1 << 31:
        _fail(f"Invalid handshake limit '{text}'")
    return n


def offset(text: str) -> int:
    n = c_integer(text)
    if n is None or n < 0 or n >= 1 << 64:
        _fail(f"Invalid offset '{text}'")
    return n


def socket_path(text: str) -> str:
    return text if text.startswith("/") else _fail("socket path must be absolute")


def port(text: str) -> int | str:
    """A port number, or (as qemu-nbd, which hands -p to getaddrinfo) a service name
    such as `nbd`, resolved when the server listens. A number past 65535 is refused:
    qemu-nbd would silently listen on it modulo 65536."""
    n = c_integer(text)
    if n is None or n < 0:
        return text  # getaddrinfo's refusal, in qemu-nbd's words, when it listens
    if not 0 < n < 65536:
        _fail(f"invalid port '{text}'")
    return n


class Once(argparse.Action):
    """qemu-nbd refuses some options given twice (-n with --cache, --aio, --discard)."""

    def __init__(self, *args, message: str, **kw):
        self.message = message
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_seen_once", set())
        if self.dest in seen:
            raise argparse.ArgumentError(self, self.message)
        namespace._seen_once = seen | {self.dest}
        setattr(namespace, self.dest, self.const if self.const is not None else values)
