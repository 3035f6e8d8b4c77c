"""TLS for the NBD server (proto.md "TLS support", "Security considerations"): the server's
`ssl.SSLContext` from qemu's tls-creds-x509 or tls-creds-psk directory, and the check of a
client against --tls-authz after the handshake.

Modes (qemu-nbd --tls, proto.md "Server-side requirements"):
- off: NOTLS, STARTTLS is refused with ERR_POLICY.
- on: SELECTIVETLS, TLS at the client's choice; exports with `tls_only` need it.
- require: FORCEDTLS, nothing but STARTTLS and ABORT before TLS. qemu-nbd behaves this
  way whenever it has TLS credentials, so it is the default once a directory is given.

Credentials, as qemu's tls-creds objects (qemu docs/system/tls.rst):
- x509: the directory holds ca-cert.pem (the CA that signs client certificates),
  server-cert.pem (with any intermediates after it) and server-key.pem, optionally
  encrypted (the password from a `secret` object, qemu's passwordid). With verify_peer
  (qemu's verify-peer, default on) clients must present a certificate signed by that CA.
- psk: the directory holds keys.psk, lines of `username:hexkey` (GnuTLS psktool's format,
  which libnbd's tls-psk-file also reads). The server looks up the key of the username the
  client sends; a username that is not there, or that the authz list refuses, fails the
  TLS handshake. The server callback is SSLContext.set_psk_server_callback (Python 3.13);
  before 3.13 the standard library has none, and the sslpsk3 package provides the same
  call on a subclass of SSLContext (it works with asyncio's memory-BIO TLS, so the server
  needs nothing else).
Who may connect after TLS is decided by authz.py.
"""

import os
import ssl
from dataclasses import dataclass

from ..errors import QnbdError
from .authz import AuthzList, NameList, distinguished_name

MODES = ("off", "on", "require")
CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
PSK_FILE = "keys.psk"
# GnuTLS's NORMAL priority with PSK key exchanges added, as qemu's tls-creds-psk asks for
# (crypto/tlssession.c); TLS 1.3 PSK uses the SHA-256 suites through the same callback.
PSK_CIPHERS = "ECDHE-PSK:DHE-PSK:PSK"


@dataclass
class TlsConfig:
    creds: str                       # the tls-creds-x509 or tls-creds-psk directory
    mode: str = "require"
    verify_peer: bool = True
    authz: tuple[str, ...] = ()      # qnbd's names (authz.NameList); empty: anyone verified
    psk: bool = False                # `creds` holds keys.psk (qemu's tls-creds-psk)
    authz_list: AuthzList | None = None   # qemu's --tls-authz ID (an authz object)
    key_password: bytes | None = None     # tls-creds-x509 passwordid

    def validate(self) -> None:
        if self.mode not in MODES:
            raise QnbdError(f"Invalid TLS mode '{self.mode}' (expected {'|'.join(MODES)})")
        if self.authz and not self.verify_peer and not self.psk:
            raise QnbdError("--tls-authz needs client certificates to be verified "
                            "(verify-peer on)")


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The context every STARTTLS upgrade uses; errors in the files are one-line
    QnbdErrors at startup, not at the first client."""
    if cfg.psk:
        return _psk_server_context(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # "MUST support TLS version 1.2 ... MAY support older versions but SHOULD NOT do so by
    # default" (proto.md "TLS versions").
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    path = lambda name: os.path.join(cfg.creds, name)  # noqa: E731
    try:
        ctx.load_cert_chain(path(SERVER_CERT), path(SERVER_KEY), password=cfg.key_password)
        if cfg.verify_peer:
            ctx.load_verify_locations(cafile=path(CA_CERT))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise QnbdError(f"TLS credentials in '{cfg.creds}' cannot be loaded: {_why(e)}") from None
    return ctx


def _why(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def read_psk_file(path: str) -> dict[str, bytes]:
    """keys.psk: `username:hexkey` a line (GnuTLS psktool, qemu tls-creds-psk)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise QnbdError(f"Unable to access credentials {path}: {e.strerror}") from None
    keys = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, sep, key = line.partition(":")
        try:
            keys[name] = bytes.fromhex(key.strip())
        except ValueError:
            sep = ""
        if not sep or not keys.get(name):
            raise QnbdError(f"{path}:{n}: expected username:hexkey")
    return keys


def _psk_context_class():
    if hasattr(ssl.SSLContext, "set_psk_server_callback"):  # Python 3.13
        return ssl.SSLContext
    try:
        from sslpsk3.sslpsk3 import SSLPSKContext, SSLPSKObject
    except ImportError:
        raise QnbdError("TLS-PSK needs Python 3.13 or the sslpsk3 package "
                        "(pip install sslpsk3)") from None

    class OnceObject(SSLPSKObject):
        """sslpsk3 installs the callbacks (SSL_set_accept_state included) at every
        do_handshake call; a non-blocking handshake, as asyncio's, calls it once per
        flight, and OpenSSL refuses a second SSL_set_accept_state mid-handshake."""

        def do_handshake(self):
            if not getattr(self, "_psk_installed", False):
                self.context.setup_psk_callbacks(self)
                self._psk_installed = True
            return ssl.SSLObject.do_handshake(self)

    class Context(SSLPSKContext):
        sslobject_class = OnceObject

    return Context


def _psk_server_context(cfg: TlsConfig) -> ssl.SSLContext:
    keys = read_psk_file(os.path.join(cfg.creds, PSK_FILE))
    ctx = _psk_context_class()(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(PSK_CIPHERS)
    names = NameList(cfg.authz) if cfg.authz else None

    def key_for(identity: str | None) -> bytes:
        # An unknown or refused username gets no key: the handshake fails, as GnuTLS
        # fails it for a username missing from the file.
        username = identity or ""
        if cfg.authz_list is not None and not cfg.authz_list.allows(username):
            return b""
        if names is not None and username not in names.names:
            return b""
        return keys.get(username, b"")

    ctx.set_psk_server_callback(key_for)
    return ctx


def refusal(cfg: TlsConfig, peercert: dict | None) -> str | None:
    """Why a client that completed the TLS handshake may not go on, or None. (PSK clients
    were checked during the handshake, by the key lookup.)"""
    if cfg.psk or (not cfg.authz and cfg.authz_list is None):
        return None
    if not peercert:
        return "no client certificate"
    dn = distinguished_name(peercert)
    if cfg.authz_list is not None and cfg.authz_list.allows(dn):
        return None
    if cfg.authz and NameList(cfg.authz).allows_certificate(peercert):
        return None
    return f"TLS x509 authz check for {dn} is denied"
