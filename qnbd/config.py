"""Server configuration: the objects `qnbd serve` runs from, built either from command-line
options (qemu-nbd's) or from a TOML file (`qnbd serve --config FILE`, see config/qnbd.toml).

The file format:

    [server]            persistent, pid_file, control = PATH (the control socket, issue 15;
                        also accepted at the top of the file), control_mode = "0660"
                        (its permissions, default 0600), metrics = "ADDR:PORT"
    [limits]            max_connections, handshake_timeout, idle_timeout, max_queued_bytes,
                        max_queued_total, max_request
    [tls]               creds = DIR, mode = "off"|"on"|"require", verify_peer,
                        authz = [NAME, ...]   (see qnbd/nbd/authz.py)
    [[listen]]          unix = PATH | address = HOST, port = N   (any number of them)
    [[export]]          image, name, format, description, read_only, discard, backing, tls_only,
                        detect_zeroes, cache, snapshot, shared,
                        bitmaps = [NAME, ...], allocation_depth,
                        load_snapshot = ID|NAME|"snapshot.id=…,snapshot.name=…"
                        (read-only)   (one or more)

Unknown keys and wrong types are errors that name the key (e.g. "export[1].discard").
"""

import tomllib
from dataclasses import dataclass

from .errors import QnbdError
from .export import ExportConfig
from .nbd.tls import TlsConfig
from .nbd.requests import DEFAULT_MAX_REQUEST

DEFAULT_PORT = 10809
# Greeted connections at once when no smaller cap is asked for (bounds memory).
DEFAULT_MAX_CONNECTIONS = 1024
# Reply bytes queued per connection before its requests stop being executed: two of the
# largest reads, so a client that pipelines keeps the link busy.
DEFAULT_MAX_QUEUED_BYTES = 64 << 20
# Reply bytes queued for all connections together: with many clients, each gets a share.
DEFAULT_MAX_QUEUED_TOTAL = 1 << 30
# The control socket's permissions: its clients change bitmaps and expose point-in-time
# views of every export, so only the server's user unless told otherwise.
DEFAULT_CONTROL_MODE = 0o600


@dataclass
class Listener:
    """Where to accept clients: a unix socket path, a TCP host/port, or an inherited
    listening socket (systemd socket activation)."""
    unix: str | None = None
    address: str | None = None
    port: int | str = DEFAULT_PORT  # a str is a service name (qemu-nbd -p nbd)
    fd: int | None = None

    def describe(self) -> str:
        if self.fd is not None:
            return f"fd {self.fd}"
        if self.unix is not None:
            return self.unix
        host = self.address or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass
class ServerConfig:
    exports: list[ExportConfig]
    listeners: list[Listener]
    persistent: bool = False
    # Clients served at once; later ones wait, unanswered, until one leaves (qemu-nbd -e).
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = 10.0
    pid_file: str | None = None
    idle_timeout: float = 0.0        # 0: clients may stay idle forever, as with qemu-nbd
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_queued_total: int = DEFAULT_MAX_QUEUED_TOTAL
    max_request: int = DEFAULT_MAX_REQUEST
    tls: TlsConfig | None = None
    control: str | None = None       # the control socket's path (qnbd/control/)
    control_mode: int = DEFAULT_CONTROL_MODE
    metrics: str | None = None       # ADDR:PORT of the Prometheus endpoint
    # --aio (threads, native, io_uring; None: io_uring where the kernel allows, else
    # threads): how reads that miss the page cache are waited for (qnbd/nbd/uring.py).
    aio: str | None = None


class ConfigError(QnbdError):
    pass


def _check_table(table: dict, where: str, schema: dict[str, type | tuple]) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of: "
                              f"{', '.join(schema)})")
        want = schema[key]
        # bool is an int in Python; do not accept true for a number or 1 for a flag.
        if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(f"{where}.{key}: expected {names.replace('str', 'string')}, "
                              f"got {value!r}")
    return table


_EXPORT_KEYS = {"image": str, "name": str, "format": str, "description": str,
                "read_only": bool, "discard": str, "detect_zeroes": str, "cache": str,
                "backing": str, "tls_only": bool,
                "snapshot": bool, "shared": int, "bitmaps": list, "allocation_depth": bool,
                "load_snapshot": str}
_LISTEN_KEYS = {"unix": str, "address": str, "port": int}
_SERVER_KEYS = {"persistent": bool, "pid_file": str, "control": str, "control_mode": str,
                "metrics": str}
_LIMIT_KEYS = {"max_connections": int, "handshake_timeout": (int, float),
               "idle_timeout": (int, float), "max_queued_bytes": int,
               "max_queued_total": int, "max_request": int}
_TLS_KEYS = {"creds": str, "mode": str, "verify_peer": bool, "authz": list}


def load_config(path: str) -> ServerConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return parse_config(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_config(doc: dict) -> ServerConfig:
    _check_table(doc, "file", {"server": dict, "limits": dict, "listen": list, "export": list,
                               "tls": dict, "control": str, "control_mode": str,
                               "metrics": str})
    server = _check_table(doc.get("server", {}), "server", _SERVER_KEYS)
    limits = _check_table(doc.get("limits", {}), "limits", _LIMIT_KEYS)

    listeners = []
    for i, table in enumerate(doc.get("listen", [])):
        where = f"listen[{i}]"
        _check_table(table, where, _LISTEN_KEYS)
        if ("unix" in table) == ("address" in table or "port" in table):
            raise ConfigError(f"{where}: give either unix = PATH or address/port")
        port = table.get("port", DEFAULT_PORT)
        if not 0 < port < 65536:
            raise ConfigError(f"{where}.port: {port} is not a TCP port")
        listeners.append(Listener(unix=table.get("unix"), address=table.get("address"),
                                  port=port))
    if not listeners:
        listeners.append(Listener())

    exports = []
    names = set()
    for i, table in enumerate(doc.get("export", [])):
        where = f"export[{i}]"
        _check_table(table, where, _EXPORT_KEYS)
        if "image" not in table:
            raise ConfigError(f"{where}.image: missing (the image file to serve)")
        if not all(isinstance(b, str) for b in table.get("bitmaps", [])):
            raise ConfigError(f"{where}.bitmaps: expected a list of bitmap names (strings), "
                              f"got {table['bitmaps']!r}")
        cfg = ExportConfig(**table)
        if cfg.name in names:
            raise ConfigError(f"{where}.name: duplicate export name {cfg.name!r}")
        names.add(cfg.name)
        try:
            cfg.validate()
        except QnbdError as e:
            raise ConfigError(f"{where}: {e}") from None
        exports.append(cfg)
    if not exports:
        raise ConfigError("no [[export]] table: nothing to serve")
    tls = _parse_tls(doc.get("tls"))

    max_conn = limits.get("max_connections", DEFAULT_MAX_CONNECTIONS)
    if max_conn < 1:
        raise ConfigError("limits.max_connections: must be at least 1")
    timeout = float(limits.get("handshake_timeout", 10.0))
    if timeout < 0:
        raise ConfigError("limits.handshake_timeout: must not be negative (0 = none)")
    idle = float(limits.get("idle_timeout", 0))
    if idle < 0:
        raise ConfigError("limits.idle_timeout: must not be negative (0 = none)")
    sizes = {}
    for key, default, least in (("max_queued_bytes", DEFAULT_MAX_QUEUED_BYTES, 1),
                                ("max_queued_total", DEFAULT_MAX_QUEUED_TOTAL, 1),
                                ("max_request", DEFAULT_MAX_REQUEST, 32 << 20)):
        sizes[key] = limits.get(key, default)
        if sizes[key] < least:
            raise ConfigError(f"limits.{key}: must be at least {least}")
    control = server.get("control", doc.get("control"))
    mode = server.get("control_mode", doc.get("control_mode"))
    if mode is not None and control is None:
        raise ConfigError("control_mode: there is no control socket (control = PATH)")
    return ServerConfig(exports=exports, listeners=listeners,
                        persistent=server.get("persistent", True),
                        max_connections=max_conn, handshake_timeout=timeout,
                        pid_file=server.get("pid_file"), idle_timeout=idle,
                        tls=tls, control=control,
                        control_mode=DEFAULT_CONTROL_MODE if mode is None else
                        parse_mode(mode, "control_mode"),
                        metrics=server.get("metrics", doc.get("metrics")), **sizes)


def parse_mode(text: str, where: str) -> int:
    """A unix socket's permissions in octal, as chmod takes them ("0660"). Only the
    permission bits (no setuid, sticky: meaningless on a socket), and the owner keeps
    read and write: without them not even the server's user could connect (connect(2)
    needs write permission on a unix socket)."""
    if not text or len(text) > 4 or any(c not in "01234567" for c in text):
        raise ConfigError(f"{where}: expected an octal mode such as 0660, got {text!r}")
    mode = int(text, 8)
    if mode > 0o777:
        raise ConfigError(f"{where}: {text} has bits other than permissions (at most 0777)")
    if mode & 0o600 != 0o600:
        raise ConfigError(f"{where}: {text} does not let the owner read and write")
    return mode


def check_tls_only(config: ServerConfig) -> None:
    """A TLS-only export must be reachable: TLS has to be on."""
    if config.tls is None or config.tls.mode == "off":
        for e in config.exports:
            if e.tls_only:
                raise ConfigError(f"export {e.name!r} is tls_only but TLS is off "
                                  "(add a [tls] table or --tls-creds)")


def _parse_tls(table) -> TlsConfig | None:
    if table is None:
        return None
    _check_table(table, "tls", _TLS_KEYS)
    if "creds" not in table:
        raise ConfigError("tls.creds: missing (the directory of ca-cert.pem, server-cert.pem "
                          "and server-key.pem)")
    authz = table.get("authz", [])
    if not all(isinstance(a, str) for a in authz):
        raise ConfigError(f"tls.authz: expected a list of names (strings), got {authz!r}")
    tls = TlsConfig(creds=table["creds"], mode=table.get("mode", "require"),
                    verify_peer=table.get("verify_peer", True), authz=tuple(authz))
    try:
        tls.validate()
    except QnbdError as e:
        raise ConfigError(f"tls: {e}") from None
    return tls
