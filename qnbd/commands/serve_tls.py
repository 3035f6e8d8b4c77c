"""The TLS options of `qnbd serve`, resolved as qemu-nbd resolves them (qemu-nbd.c, main;
nbd_get_tls_creds), with qemu-nbd's messages:

- --object defines credentials, authz lists and secrets (qnbd/objects.py);
- --tls-creds ID names a credentials object, for the server side (endpoint=server) or,
  with -L, the client side (endpoint=client). qnbd also takes a directory (a value with
  a "/", or an existing directory that is no object's id): X.509 files in qemu's layout;
- --tls-authz ID names an authz object; any other value is one of qnbd's names
  (nbd/authz.py), and @FILE reads names a line;
- --tls-hostname is for -L only: the name the server's certificate must carry.
"""

import os

from ..errors import QnbdError
from ..nbd.tls import TlsConfig
from ..objects import Objects, TlsCreds


def _objects(args) -> Objects:
    objects = Objects()
    for text in args.object or ():
        objects.add(text)
    return objects


def _without_creds(args) -> None:
    if args.tls_authz:
        raise QnbdError("--tls-authz is not permitted without --tls-creds")
    if args.tls_hostname:
        raise QnbdError("--tls-hostname is not permitted without --tls-creds")
    if args.tls or args.tls_verify_peer:
        raise QnbdError("--tls and --tls-verify-peer need --tls-creds")


def _creds(objects: Objects, value: str, endpoint: str) -> TlsCreds:
    if value not in objects.by_id and ("/" in value or os.path.isdir(value)):
        return TlsCreds("x509", value, endpoint)
    return objects.tls_creds(value, endpoint)


def cli_tls(args) -> TlsConfig | None:
    """The server's TLS settings, or None without --tls-creds."""
    objects = _objects(args)
    if args.tls_creds is None:
        _without_creds(args)
        return None
    if args.tls_hostname:
        raise QnbdError("TLS hostname is only supported with export list")
    creds = _creds(objects, args.tls_creds, "server")
    verify = creds.verify_peer if args.tls_verify_peer is None else args.tls_verify_peer == "on"
    names, authz_list = [], None
    for value in args.tls_authz or ():
        found = objects.authz(value)
        if found is not None:
            authz_list = found
        else:
            names += load_names(value)
    tls = TlsConfig(creds=creds.dir, mode=args.tls or "require", verify_peer=verify,
                    authz=tuple(names), psk=creds.kind == "psk", authz_list=authz_list,
                    key_password=creds.key_password)
    tls.validate()
    return tls


def list_creds(args) -> tuple[TlsCreds | None, str | None]:
    """-L's client credentials and the hostname to verify."""
    objects = _objects(args)
    if args.tls_creds is None:
        _without_creds(args)
        return None, None
    if args.tls_authz:
        raise QnbdError("TLS authorization is incompatible with export list")
    creds = _creds(objects, args.tls_creds, "client")
    if args.tls_verify_peer is not None:
        creds.verify_peer = args.tls_verify_peer == "on"
    return creds, args.tls_hostname


def load_names(value: str) -> list[str]:
    """One --tls-authz name, or @FILE with one name a line (# comments). Names are given
    one per option because distinguished names contain commas."""
    if not value.startswith("@"):
        return [value]
    try:
        with open(value[1:], encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise QnbdError(f"--tls-authz {value[1:]}: {e.strerror}") from None
    return [line for line in lines if line and not line.startswith("#")]
