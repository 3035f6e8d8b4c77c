"""`qnbd serve`: a drop-in for qemu-nbd's server mode (same options, same meaning), or a
multi-export server from a TOML file (`--config`)."""

import argparse
import logging
import os

from .. import image_opts
from ..cli import version_text
from ..config import (DEFAULT_MAX_CONNECTIONS, DEFAULT_PORT, Listener, ServerConfig,
                      check_tls_only, load_config, parse_mode)
from ..errors import QnbdError
from ..export import DIRECT_CACHE_MODES, ExportConfig
from ..logconfig import FORMATS as LOG_FORMATS, LEVELS as LOG_LEVELS, configure as configure_log
from ..nbd.listeners import socket_activation
from ..nbd.server import serve
from ..nbd.tls import MODES as TLS_MODES
from ..block.chain import BACKING_POLICIES
from . import serve_values as v
from .serve_services import serve_services
from .serve_tls import cli_tls, list_creds

# qemu-nbd options that qnbd does not implement yet: accepted by the parser only to be
# refused by name, never silently ignored. (flag, long name, takes a value)
UNSUPPORTED = (
    ("-c", "--connect", True), ("-d", "--disconnect", False),
    (None, "--selinux-label", True),
)
# Options that describe the one export or listener of a command-line server.
_EXPORT_OPTIONS = ("format", "export_name", "description", "read_only", "shared", "discard",
                   "detect_zeroes", "cache", "snapshot", "backing_policy", "bitmap",
                   "allocation_depth", "offset", "aio", "load_snapshot")
_LISTEN_OPTIONS = ("socket", "bind", "port")
# What qemu-nbd -L refuses (qemu-nbd.c: "List mode is incompatible with per-device
# settings").
_DEVICE_OPTIONS = ("export_name", "description", "offset", "format", "bitmap",
                   "allocation_depth", "aio", "discard", "cache", "load_snapshot")


# qemu-nbd's long options (qemu-nbd.c, its getopt_long table): an abbreviation of one of
# them means it here too, whatever qnbd's own options share the prefix.
QEMU_NBD_LONG_OPTIONS = tuple(
    "--" + name for name in (
        "help version bind port socket offset read-only allocation-depth bitmap connect "
        "disconnect list snapshot load-snapshot nocache cache aio discard detect-zeroes "
        "shared format persistent verbose object export-name description tls-creds "
        "tls-hostname tls-authz image-opts trace fork pid-file selinux-label "
        "handshake-limit").split())


def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="export an image over NBD (qemu-nbd compatible)",
        description="Export IMAGE over NBD, or list a server's exports (-L). Options have "
                    "qemu-nbd's meaning.")
    p.preferred_long_options = QEMU_NBD_LONG_OPTIONS
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image file to export")
    p.add_argument("-V", "--version", action="version", version=version_text("qnbd"))
    p.add_argument("--config", metavar="FILE", help="serve the exports of a TOML file")
    p.add_argument("-f", "--format", help="image format (probed if omitted)")
    p.add_argument("--image-opts", action="store_true",
                   help="IMAGE is block options: driver=qcow2,file.filename=PATH,... "
                   "(json:{...} file names work with or without it)")
    p.add_argument("-k", "--socket", type=v.socket_path, metavar="PATH",
                   help="listen on a unix socket (absolute path)")
    p.add_argument("-b", "--bind", metavar="ADDR", help="TCP address to listen on (default 0.0.0.0)")
    p.add_argument("-p", "--port", type=v.port, metavar="PORT",
                   help=f"TCP port to listen on (default {DEFAULT_PORT})")
    p.add_argument("-L", "--list", action="store_true",
                   help="list the exports of the server at -k or -b/-p, as qemu-nbd -L")
    p.add_argument("-x", "--export-name", metavar="NAME", help="export name (default empty)")
    p.add_argument("-D", "--description", metavar="TEXT", help="export description")
    p.add_argument("-o", "--offset", type=v.offset, metavar="OFFSET",
                   help="export the image from this byte on")
    p.add_argument("-r", "--read-only", action="store_true", default=None,
                   help="export read-only")
    p.add_argument("-B", "--bitmap", action="append", metavar="NAME",
                   help="export the dirty bitmap NAME (found down the backing chain) as "
                   "qemu:dirty-bitmap:NAME (repeatable)")
    p.add_argument("-A", "--allocation-depth", action="store_true", default=None,
                   help="export the qemu:allocation-depth metadata context")
    p.add_argument("-s", "--snapshot", action="store_true", default=None,
                   help="writes go to a temporary overlay; the image is not modified")
    p.add_argument("-l", "--load-snapshot", metavar="SNAPSHOT",
                   help="export an internal snapshot, read-only: its id or name, or "
                   "snapshot.id=ID,snapshot.name=NAME")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-e", "--shared", type=v.shared, metavar="N",
                   help="clients allowed at once (default 1, 0 = unlimited)")
    p.add_argument("--discard", type=v.discard, action=v.Once, metavar="MODE",
                   message="--discard can only be specified once",
                   help="ignore (default) or unmap trims")
    p.add_argument("--detect-zeroes", type=v.detect_zeroes, metavar="MODE",
                   help="turn all-zero writes into zero writes (off, on, unmap)")
    p.add_argument("--cache", type=v.cache, action=v.Once, metavar="MODE",
                   message="-n and --cache can only be specified once",
                   help="none, writeback (default), writethrough, directsync or unsafe")
    p.add_argument("-n", "--nocache", dest="cache", action=v.Once, nargs=0, const="none",
                   message="-n and --cache can only be specified once",
                   help="same as --cache=none")
    p.add_argument("--aio", type=v.aio, action=v.Once, metavar="MODE",
                   message="--aio can only be specified once",
                   help="accepted (threads, native, io_uring); qnbd does its own I/O")
    p.add_argument("--handshake-timeout", type=float, metavar="SECONDS",
                   help="drop clients that have not finished the handshake (default 10, 0 = never)")
    p.add_argument("--handshake-limit", type=v.handshake_limit, dest="handshake_timeout",
                   metavar="N", help="qemu-nbd 10's name for --handshake-timeout (whole seconds)")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help="drop clients that send nothing and take no replies for this long "
                   "(default 0 = never)")
    p.add_argument("--backing-policy", choices=BACKING_POLICIES,
                   help="backing files the image may name: any (default, as qemu-nbd), "
                   "same-dir (only in the image's directory) or none; use same-dir or none "
                   "for untrusted images")
    p.add_argument("--object", action="append", metavar="TYPE,id=ID,...",
                   help="tls-creds-x509, tls-creds-psk, authz-simple, authz-list, "
                   "authz-list-file or secret, as qemu's --object")
    p.add_argument("--tls-creds", metavar="ID|DIR",
                   help="enable TLS with the credentials object ID, or the X.509 files in "
                   "DIR (ca-cert.pem, server-cert.pem, server-key.pem); TLS is then required")
    p.add_argument("--tls", choices=TLS_MODES,
                   help="with --tls-creds: require (default) refuses everything before "
                   "STARTTLS, on lets clients choose, off disables TLS")
    p.add_argument("--tls-verify-peer", choices=("on", "off"),
                   help="require client certificates signed by ca-cert.pem (default on)")
    p.add_argument("--tls-authz", action="append", metavar="ID|NAME|@FILE",
                   help="allow only these clients: an authz object ID, or a certificate "
                   "name (CN=...,O=..., any order, or some of its attributes) or common "
                   "name; repeatable; @FILE: one name a line")
    p.add_argument("--tls-hostname", metavar="NAME",
                   help="with -L: the name the server's certificate must carry")
    p.add_argument("--control", metavar="PATH",
                   help="a control socket (unix, mode 0600 unless --control-mode) for "
                   "`qnbd ctl PATH ...`: "
                   "exports, clients, live bitmap changes, metrics")
    p.add_argument("--control-mode", metavar="MODE",
                   help="the control socket's permissions, in octal (default 0600)")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics")
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
    p.add_argument("-T", "--trace", metavar="[enable=]PATTERN[,file=FILE]",
                   help="accepted for qemu-nbd command lines: turns on the connection log "
                   "(to FILE when given); qnbd has no qemu trace events")
    for short, long, takes_value in UNSUPPORTED:
        names = [n for n in (short, long) if n]
        kw = {"metavar": "ARG"} if takes_value else {"action": "store_true"}
        p.add_argument(*names, dest=f"unsupported_{long[2:].replace('-', '_')}",
                       help=argparse.SUPPRESS, **kw)
    return p


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
        export = _cli_export(args)
        config = ServerConfig(exports=[export], listeners=[_cli_listener(args)],
                              persistent=args.persistent,
                              max_connections=export.shared or DEFAULT_MAX_CONNECTIONS,
                              pid_file=args.pid_file, aio=args.aio)
    if args.handshake_timeout is not None:   # else the file's limits.handshake_timeout
        if args.handshake_timeout < 0:
            raise QnbdError("--handshake-timeout must not be negative")
        config.handshake_timeout = args.handshake_timeout
    if args.idle_timeout is not None:
        if args.idle_timeout < 0:
            raise QnbdError("--idle-timeout must not be negative")
        config.idle_timeout = args.idle_timeout
    if args.control is not None:
        config.control = args.control
    if args.control_mode is not None:
        if config.control is None:
            raise QnbdError("--control-mode needs --control PATH")
        config.control_mode = parse_mode(args.control_mode, "--control-mode")
    if args.metrics is not None:
        config.metrics = args.metrics
    tls = cli_tls(args)
    if tls is not None:   # else the file's [tls] table, if any
        config.tls = tls
    check_tls_only(config)
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and \
            any(getattr(args, name) is not None for name in _LISTEN_OPTIONS):
        raise QnbdError("-k, -b and -p cannot be used with socket activation")
    activated = socket_activation()
    if activated:
        config.listeners = [Listener(fd=fd) for fd in activated]
    return config


def _cli_export(args) -> ExportConfig:
    """The export of a qemu-nbd command line: IMAGE (a file name, a json: name, or
    block options with --image-opts) and the options around it."""
    image, fmt, read_only = args.image, args.format, bool(args.read_only)
    offset, size, discard, cache = args.offset or 0, None, args.discard, args.cache
    options = {}
    if args.image_opts or image_opts.is_json(image):
        if args.image_opts and fmt:
            raise QnbdError("--image-opts and -f are mutually exclusive")
        spec = image_opts.parse(image, args.image_opts)
        image, fmt, read_only = spec.image, spec.format, read_only or bool(spec.read_only)
        if spec.size is not None:
            size = spec.size - offset
        offset += spec.offset
        discard = discard or spec.discard
        cache = cache or ("unsafe" if spec.unsafe else None)
        options = spec.options
    export = ExportConfig(
        image=image, name=args.export_name or "", format=fmt,
        description=args.description or "", read_only=read_only,
        discard=discard or "ignore", detect_zeroes=args.detect_zeroes or "off",
        cache=cache or "writeback", snapshot=bool(args.snapshot),
        shared=1 if args.shared is None else args.shared,
        backing=args.backing_policy or "any", offset=offset, size=size, options=options,
        # qemu-nbd prepends each -B to its list, so its contexts list the bitmaps
        # last given first; the same order here makes the two answer alike.
        bitmaps=(args.bitmap or [])[::-1], allocation_depth=bool(args.allocation_depth),
        load_snapshot=args.load_snapshot)
    export.validate()
    if args.aio == "native" and export.cache not in DIRECT_CACHE_MODES:
        # qemu's file driver refuses Linux AIO on the page cache (file-posix.c).
        raise QnbdError("aio=native was specified, but it requires cache.direct=on, which "
                        "was not specified.")
    return export


def _list_mode(args) -> int:
    """qemu-nbd -L, with its refusals (qemu-nbd.c, main). Without -k or -b it asks
    0.0.0.0:10809, qemu-nbd's default bind address, which reaches this host."""
    if args.image:
        raise QnbdError("List mode is incompatible with a file name")
    if any(getattr(args, name) is not None for name in _DEVICE_OPTIONS):
        raise QnbdError("List mode is incompatible with per-device settings")
    if args.fork:
        raise QnbdError("List mode is incompatible with forking")
    from .serve_list import list_exports
    creds, hostname = list_creds(args)
    print(list_exports(_cli_listener(args), creds, hostname), end="")
    return 0


def _cli_listener(args) -> Listener:
    if args.socket is not None:
        # qemu-nbd listens on the socket alone and ignores -b and -p (qemu-nbd.c,
        # nbd_build_socket_address).
        return Listener(unix=args.socket)
    return Listener(address=args.bind or "0.0.0.0", port=args.port or DEFAULT_PORT)


def run(args) -> int:
    trace_file = _trace_file(args.trace)
    # -T maps qemu's tracing onto qnbd's connection log (info level).
    configure_log("qnbd serve", "info" if args.trace else args.log_level or "warning",
                  trace_file or args.log_file, args.log_format or "text")
    if args.list:
        return _list_mode(args)
    config = build_config(args)
    services = serve_services(config)
    if not args.fork:
        return serve(config, services=services)
    return _fork(config, args.verbose, services)


def _trace_file(trace: str | None) -> str | None:
    """-T [enable=]PATTERN[,events=FILE][,file=FILE] (qemu's --trace): qnbd has none of
    qemu's trace events, so any -T turns on its connection log, written to file= if given."""
    for part in (trace or "").split(","):
        key, sep, value = part.partition("=")
        if sep and key == "file":
            return value
    return None


def _fork(config, verbose: bool, services) -> int:
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
        code = serve(config, on_ready=ready, services=services)
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
