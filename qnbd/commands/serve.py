"""`qnbd serve`: a drop-in for qemu-nbd's server mode (same options, same meaning), or a
multi-export server from a TOML file (`--config`)."""

import argparse
import logging
import os

from ..config import (DEFAULT_MAX_CONNECTIONS, DEFAULT_PORT, Listener, ServerConfig,
                      check_tls_only, load_config)
from ..errors import QnbdError
from ..export import CACHE_MODES, DETECT_ZEROES_MODES, DISCARD_MODES, ExportConfig
from ..logconfig import FORMATS as LOG_FORMATS, LEVELS as LOG_LEVELS, configure as configure_log
from ..nbd.listeners import socket_activation
from ..nbd.server import serve
from ..nbd.tls import MODES as TLS_MODES, TlsConfig, load_authz
from ..block.chain import BACKING_POLICIES
from ..formats import DRIVERS

# qemu-nbd options that qnbd does not implement yet: accepted by the parser only to be
# refused by name, never silently ignored. (flag, long name, takes a value)
UNSUPPORTED = (
    ("-o", "--offset", True), ("-P", "--partition", True), ("-l", "--load-snapshot", True),
    (None, "--object", True),
    (None, "--image-opts", False), (None, "--tls-hostname", True),
    ("-c", "--connect", True), ("-d", "--disconnect", False),
    ("-L", "--list", False), (None, "--aio", True), ("-T", "--trace", True),
    (None, "--selinux-label", True),
)
# Options that describe the one export or listener of a command-line server.
_EXPORT_OPTIONS = ("format", "export_name", "description", "read_only", "shared", "discard",
                   "detect_zeroes", "cache", "snapshot", "backing_policy", "bitmap", "allocation_depth")
_LISTEN_OPTIONS = ("socket", "bind", "port")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="export an image over NBD (qemu-nbd compatible)",
        description="Export IMAGE over NBD. Options have qemu-nbd's meaning.")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image file to export")
    p.add_argument("--config", metavar="FILE", help="serve the exports of a TOML file")
    p.add_argument("-f", "--format", choices=DRIVERS, help="image format (probed if omitted)")
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on a unix socket")
    p.add_argument("-b", "--bind", metavar="ADDR", help="TCP address to listen on (default 0.0.0.0)")
    p.add_argument("-p", "--port", type=_port, metavar="PORT",
                   help=f"TCP port to listen on (default {DEFAULT_PORT})")
    p.add_argument("-x", "--export-name", metavar="NAME", help="export name (default empty)")
    p.add_argument("-D", "--description", metavar="TEXT", help="export description")
    p.add_argument("-r", "--read-only", action="store_true", default=None,
                   help="export read-only")
    p.add_argument("-B", "--bitmap", action="append", metavar="NAME",
                   help="export the dirty bitmap NAME as qemu:dirty-bitmap:NAME (repeatable)")
    p.add_argument("-A", "--allocation-depth", action="store_true", default=None,
                   help="export the qemu:allocation-depth metadata context")
    p.add_argument("-s", "--snapshot", action="store_true", default=None,
                   help="writes go to a temporary overlay; the image is not modified")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-e", "--shared", type=_count, metavar="N",
                   help="clients allowed at once (default 1, 0 = unlimited)")
    p.add_argument("--discard", choices=DISCARD_MODES, help="ignore (default) or unmap trims")
    p.add_argument("--detect-zeroes", choices=DETECT_ZEROES_MODES,
                   help="turn all-zero writes into zero writes (off, on, unmap)")
    p.add_argument("--cache", choices=CACHE_MODES, help="cache mode (default writeback)")
    p.add_argument("-n", "--nocache", dest="cache", action="store_const", const="none",
                   help="same as --cache=none")
    p.add_argument("--handshake-timeout", type=float, metavar="SECONDS",
                   help="drop clients that have not finished the handshake (default 10, 0 = never)")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help="drop clients that send nothing and take no replies for this long "
                   "(default 0 = never)")
    p.add_argument("--backing-policy", choices=BACKING_POLICIES,
                   help="backing files the image may name: any (default, as qemu-nbd), "
                   "same-dir (only in the image's directory) or none; use same-dir or none "
                   "for untrusted images")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="enable TLS with the X.509 files in DIR (ca-cert.pem, server-cert.pem, "
                   "server-key.pem, as qemu's tls-creds-x509); TLS is then required")
    p.add_argument("--tls", choices=TLS_MODES,
                   help="with --tls-creds: require (default) refuses everything before "
                   "STARTTLS, on lets clients choose, off disables TLS")
    p.add_argument("--tls-verify-peer", choices=("on", "off"),
                   help="require client certificates signed by ca-cert.pem (default on)")
    p.add_argument("--tls-authz", action="append", metavar="NAME|@FILE",
                   help="allow only clients whose certificate has this distinguished name "
                   "(CN=...,O=...) or common name; repeatable; @FILE: one name a line")
    p.add_argument("--fork", action="store_true",
                   help="run in the background; return once the server listens")
    p.add_argument("--pid-file", metavar="PATH", help="write the server's pid here")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="as qemu-nbd: with --fork, keep stderr open")
    p.add_argument("--log-level", choices=tuple(LOG_LEVELS),
                   help="qnbd's own log: warning (default) or error, off; info adds a line "
                   "per connection, debug more")
    p.add_argument("--log-file", metavar="PATH", help="write the log here instead of stderr")
    p.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json lines")
    for short, long, takes_value in UNSUPPORTED:
        names = [n for n in (short, long) if n]
        kw = {"metavar": "ARG"} if takes_value else {"action": "store_true"}
        p.add_argument(*names, dest=f"unsupported_{long[2:].replace('-', '_')}",
                       help=argparse.SUPPRESS, **kw)
    return p


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"invalid port '{text}'")
    return port


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"invalid value '{text}' (a number, 0 = unlimited)")
    return n


def build_config(args) -> ServerConfig:
    for short, long, _ in UNSUPPORTED:
        value = getattr(args, f"unsupported_{long[2:].replace('-', '_')}")
        if value not in (None, False):
            raise QnbdError(f"option {long} is not supported yet")
    given = [name for name in _EXPORT_OPTIONS if getattr(args, name) is not None]
    if args.config:
        if args.image or given:
            what = "IMAGE" if args.image else "--" + given[0].replace("_", "-")
            raise QnbdError(f"{what} cannot be combined with --config (describe exports "
                            "in the file)")
        config = load_config(args.config)
        if args.pid_file:
            config.pid_file = args.pid_file
        if args.persistent:
            config.persistent = True
        if any(getattr(args, name) is not None for name in _LISTEN_OPTIONS):
            config.listeners = [_cli_listener(args)]
    else:
        if not args.image:
            raise QnbdError("expected an image to serve (or --config FILE)")
        shared = 1 if args.shared is None else args.shared
        export = ExportConfig(
            image=args.image, name=args.export_name or "", format=args.format,
            description=args.description or "", read_only=bool(args.read_only),
            discard=args.discard or "ignore", detect_zeroes=args.detect_zeroes or "off",
            cache=args.cache or "writeback", snapshot=bool(args.snapshot), shared=shared,
            backing=args.backing_policy or "any",
            # qemu-nbd prepends each -B to its list, so its contexts list the bitmaps
            # last given first; the same order here makes the two answer alike.
            bitmaps=(args.bitmap or [])[::-1], allocation_depth=bool(args.allocation_depth))
        export.validate()
        config = ServerConfig(exports=[export], listeners=[_cli_listener(args)],
                              persistent=args.persistent,
                              max_connections=shared or DEFAULT_MAX_CONNECTIONS,
                              pid_file=args.pid_file)
    if args.handshake_timeout is not None:   # else the file's limits.handshake_timeout
        if args.handshake_timeout < 0:
            raise QnbdError("--handshake-timeout must not be negative")
        config.handshake_timeout = args.handshake_timeout
    if args.idle_timeout is not None:
        if args.idle_timeout < 0:
            raise QnbdError("--idle-timeout must not be negative")
        config.idle_timeout = args.idle_timeout
    if args.tls_creds is not None:
        config.tls = _cli_tls(args)
    elif args.tls or args.tls_verify_peer or args.tls_authz:
        raise QnbdError("--tls, --tls-verify-peer and --tls-authz need --tls-creds")
    check_tls_only(config)
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and \
            any(getattr(args, name) is not None for name in _LISTEN_OPTIONS):
        raise QnbdError("-k, -b and -p cannot be used with socket activation")
    activated = socket_activation()
    if activated:
        config.listeners = [Listener(fd=fd) for fd in activated]
    return config


def _cli_tls(args) -> TlsConfig:
    """qemu-nbd --tls-creds: with credentials, TLS is required unless --tls says otherwise."""
    tls = TlsConfig(creds=args.tls_creds, mode=args.tls or "require",
                    verify_peer=args.tls_verify_peer != "off",
                    authz=tuple(name for value in args.tls_authz or ()
                                for name in load_authz(value)))
    tls.validate()
    return tls


def _cli_listener(args) -> Listener:
    if args.socket is not None:
        if args.bind is not None or args.port is not None:
            raise QnbdError("-k cannot be combined with -b or -p")
        return Listener(unix=args.socket)
    return Listener(address=args.bind or "0.0.0.0", port=args.port or DEFAULT_PORT)


def run(args) -> int:
    configure_log("qnbd serve", args.log_level or "warning", args.log_file,
                  args.log_format or "text")
    config = build_config(args)
    if not args.fork:
        return serve(config)
    return _fork(config, args.verbose)


def _fork(config, verbose: bool) -> int:
    """qemu-nbd --fork: the parent waits until the child listens (exit 0) or fails (exit 1
    with the child's reason). A pipe carries "ok" or the error message."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        message = b"".join(chunks).decode(errors="replace")
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        raise QnbdError(message or "the server exited before it was ready")
    os.close(r)
    os.setsid()
    ready_sent = False

    def ready():
        nonlocal ready_sent
        os.write(w, b"ok")
        os.close(w)
        ready_sent = True
        if not verbose:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)

    code = 1
    try:
        code = serve(config, on_ready=ready)
    except QnbdError as e:
        if ready_sent:
            logging.getLogger("qnbd.serve").error("%s", e)
        else:
            os.write(w, str(e).encode())
    except BaseException:
        logging.getLogger("qnbd.serve").exception("the server failed")
    finally:
        # The child never returns into the caller's stack: that belongs to the parent.
        os._exit(code)
