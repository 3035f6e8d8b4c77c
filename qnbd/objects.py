"""qemu-nbd's --object: the user-creatable objects that TLS options refer to by id
(qemu docs/system/tls.rst, docs/system/authz.rst, docs/system/secrets.rst), parsed as
qemu parses them and reported in qemu's words.

An object is written in QemuOpts syntax, `TYPE,id=ID,key=value,...` (",," is a literal
comma in a value; a bare `key` means key=on), or as JSON, `{"qom-type": TYPE, "id": ID,
...}`, which authz-list needs for its rules. The types:

    secret            data=TEXT | file=PATH, format=raw|base64  (keyid/iv: not supported)
    tls-creds-x509    dir, endpoint=server|client (default client, as qemu), verify-peer,
                      passwordid=SECRET (the password of an encrypted server-key.pem)
    tls-creds-psk     dir (keys.psk), endpoint, username (client side; default "qemu")
    authz-simple      identity
    authz-list        policy=allow|deny, rules=[{match, policy, format}]  (JSON only)
    authz-list-file   filename, refresh (the file is always reread when it changes)

Server credentials are loaded when the object is created, so a missing file is reported
before the image is opened, as qemu-nbd does.
"""

import base64
import json
import os
from dataclasses import dataclass

from .errors import QnbdError
from .nbd.authz import AuthzList
from .nbd.tls import CA_CERT, PSK_FILE, SERVER_CERT, SERVER_KEY, read_psk_file

_PROPERTIES = {
    "secret": {"data", "file", "format", "keyid", "iv", "loaded"},
    "tls-creds-x509": {"dir", "endpoint", "verify-peer", "priority", "sanity-check",
                       "passwordid", "loaded"},
    "tls-creds-psk": {"dir", "endpoint", "username", "priority", "loaded"},
    "authz-simple": {"identity"},
    "authz-list": {"policy", "rules"},
    "authz-list-file": {"filename", "refresh"},
}
_REQUIRED = {"authz-simple": ("identity",), "authz-list-file": ("filename",)}
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")


@dataclass
class TlsCreds:
    kind: str              # "x509" or "psk"
    dir: str
    endpoint: str          # "server" or "client"
    verify_peer: bool = True
    username: str = "qemu"  # psk, client side (qemu's default username)
    key_password: bytes | None = None


def parse_opts(text: str) -> dict:
    """QemuOpts `TYPE,key=value,...` (or JSON) as a dict with the type under qom-type."""
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise QnbdError(f"--object: not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise QnbdError("--object: expected a JSON object")
        return doc
    opts, parts, cur, i = {}, [], "", 0
    while i < len(text):  # split at single commas; ",," is a comma in a value
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    for n, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep and n == 0:
            key, value = "qom-type", part
        elif not sep:
            value = "on"
        opts[key] = value
    return opts


def _bool(opts: dict, key: str, default: bool) -> bool:
    value = opts.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).lower() in _TRUE:
        return True
    if str(value).lower() in _FALSE:
        return False
    raise QnbdError(f"Parameter '{key}' expects 'on' or 'off'")


class Objects:
    """The objects of a command line, by id, created in command-line order (a
    tls-creds-x509 may name a secret given before it)."""

    def __init__(self):
        self.by_id: dict = {}

    def add(self, text: str) -> None:
        opts = parse_opts(text)
        kind = opts.pop("qom-type", None)
        if kind not in _PROPERTIES:
            raise QnbdError(f"Parameter 'qom-type' does not accept value '{kind}'"
                            if kind else "Parameter 'qom-type' is missing")
        ident = opts.pop("id", None)
        if not ident:
            raise QnbdError("Parameter 'id' is missing")
        for key in opts:
            if key not in _PROPERTIES[kind]:
                raise QnbdError(f"Parameter '{key}' is unexpected")
        for key in _REQUIRED.get(kind, ()):
            if key not in opts:
                raise QnbdError(f"Parameter '{key}' is missing")
        if ident in self.by_id:
            raise QnbdError(f"attempt to add duplicate property '{ident}' to object "
                            "(type 'container')")
        make = {"secret": _secret, "tls-creds-x509": self._x509, "tls-creds-psk": _psk,
                "authz-simple": lambda o: AuthzList.simple(o["identity"]),
                "authz-list": lambda o: AuthzList.from_json(o, f"authz-list '{ident}'"),
                "authz-list-file": lambda o: AuthzList.from_file(o["filename"])}[kind]
        self.by_id[ident] = make(opts)

    def tls_creds(self, ident: str, endpoint: str) -> TlsCreds:
        """qemu-nbd's nbd_get_tls_creds: the object, checked to be credentials for
        this side of the connection."""
        obj = self.by_id.get(ident)
        if obj is None:
            raise QnbdError(f"Failed to get TLS creds: No TLS credentials with id '{ident}'")
        if not isinstance(obj, TlsCreds):
            raise QnbdError(f"Failed to get TLS creds: Object with id '{ident}' is not "
                            "TLS credentials")
        if obj.endpoint != endpoint:
            raise QnbdError(f"Failed to get TLS creds: Expected TLS credentials for a "
                            f"{endpoint} endpoint")
        return obj

    def authz(self, ident: str) -> AuthzList | None:
        obj = self.by_id.get(ident)
        return obj if isinstance(obj, AuthzList) else None

    def _x509(self, opts: dict) -> TlsCreds:
        creds = TlsCreds("x509", opts.get("dir", ""), _endpoint(opts),
                         verify_peer=_bool(opts, "verify-peer", True))
        if "passwordid" in opts:
            secret = self.by_id.get(opts["passwordid"])
            if not isinstance(secret, bytes):
                raise QnbdError(f"No secret with id '{opts['passwordid']}'")
            creds.key_password = secret
        if creds.endpoint == "server":
            files = (CA_CERT, SERVER_CERT, SERVER_KEY) if creds.verify_peer \
                else (SERVER_CERT, SERVER_KEY)
            for name in files:
                _check_readable(os.path.join(creds.dir, name))
        return creds


def _endpoint(opts: dict) -> str:
    endpoint = opts.get("endpoint", "client")
    if endpoint not in ("server", "client"):
        raise QnbdError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    return endpoint


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise QnbdError(f"Unable to access credentials {path}: {e.strerror}") from None


def _psk(opts: dict) -> TlsCreds:
    creds = TlsCreds("psk", opts.get("dir", ""), _endpoint(opts),
                     username=opts.get("username", "qemu"))
    read_psk_file(os.path.join(creds.dir, PSK_FILE))  # loaded now, errors now
    return creds


def _secret(opts: dict) -> bytes:
    if "keyid" in opts or "iv" in opts:
        raise QnbdError("encrypted secrets (keyid, iv) are not supported")
    if ("data" in opts) == ("file" in opts):
        raise QnbdError("Either 'file' or 'data' must be provided" if "data" not in opts
                        else "'file' and 'data' are mutually exclusive")
    if "data" in opts:
        value = str(opts["data"]).encode()
    else:
        try:
            with open(opts["file"], "rb") as f:
                value = f.read()
        except OSError as e:
            raise QnbdError(f"Unable to read {opts['file']}: {e.strerror}") from None
    fmt = opts.get("format", "raw")
    if fmt == "base64":
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise QnbdError("secret data is not valid base64") from None
    if fmt != "raw":
        raise QnbdError(f"Parameter 'format' does not accept value '{fmt}'")
    return value
