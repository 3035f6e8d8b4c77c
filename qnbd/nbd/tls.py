"""TLS for the NBD server (proto.md "TLS support", "Security considerations"): the server's
`ssl.SSLContext` from a qemu tls-creds-x509 directory, and the client-certificate
allow-list (qemu-nbd --tls-authz, which qemu spells as an authz-simple object).

Modes (qemu-nbd --tls, proto.md "Server-side requirements"):
- off: NOTLS, STARTTLS is refused with ERR_POLICY.
- on: SELECTIVETLS, TLS at the client's choice; exports with `tls_only` need it.
- require: FORCEDTLS, nothing but STARTTLS and ABORT before TLS. qemu-nbd behaves this
  way whenever it has TLS credentials, so it is the default once a directory is given.

The directory holds ca-cert.pem (the CA that signs client certificates), server-cert.pem
(with any intermediates after it) and server-key.pem, as qemu's tls-creds-x509. With
verify_peer (qemu's verify-peer, default on) clients must present a certificate signed by
that CA; the allow-list then names which of them may connect, by their full distinguished
name in RFC 4514 form as qemu/GnuTLS print it ("CN=laptop,O=Example,C=GB") or by their
common name alone.

TLS-PSK (qemu's tls-creds-psk) is not offered: Python's ssl module has no server-side PSK
callback before 3.13 (SSLContext.set_psk_server_callback), and this project runs on 3.11.
"""

import os
import ssl
from dataclasses import dataclass

from ..errors import QnbdError

MODES = ("off", "on", "require")
CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"

# RFC 4514 section 3 short names, as GnuTLS (and so qemu's authz identities) print them;
# other attributes keep the name Python's ssl gives them.
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "localityName": "L", "stateOrProvinceName": "ST", "countryName": "C",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "EMAIL",
}


@dataclass
class TlsConfig:
    creds: str                       # the tls-creds-x509 directory
    mode: str = "require"
    verify_peer: bool = True
    authz: tuple[str, ...] = ()      # allowed client DNs or CNs; empty: any verified client

    def validate(self) -> None:
        if self.mode not in MODES:
            raise QnbdError(f"Invalid TLS mode '{self.mode}' (expected {'|'.join(MODES)})")
        if self.authz and not self.verify_peer:
            raise QnbdError("--tls-authz needs client certificates to be verified "
                            "(verify-peer on)")


def load_authz(value: str) -> list[str]:
    """One --tls-authz value: a name, or @FILE with one name a line (# comments).
    Names are given one per option because distinguished names contain commas."""
    if not value.startswith("@"):
        return [value]
    try:
        with open(value[1:], encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise QnbdError(f"--tls-authz {value[1:]}: {e.strerror}") from None
    return [line for line in lines if line and not line.startswith("#")]


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The context every STARTTLS upgrade uses; errors in the files are one-line
    QnbdErrors at startup, not at the first client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # "MUST support TLS version 1.2 ... MAY support older versions but SHOULD NOT do so by
    # default" (proto.md "TLS versions").
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    path = lambda name: os.path.join(cfg.creds, name)  # noqa: E731
    try:
        ctx.load_cert_chain(path(SERVER_CERT), path(SERVER_KEY))
        if cfg.verify_peer:
            ctx.load_verify_locations(cafile=path(CA_CERT))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise QnbdError(f"TLS credentials in '{cfg.creds}' cannot be loaded: {why}") from None
    return ctx


def distinguished_name(peercert: dict) -> str:
    """The subject of `SSLSocket.getpeercert()` as an RFC 4514 string: most specific
    RDN first (the reverse of the certificate's order), with special characters escaped."""
    rdns = []
    for rdn in reversed(peercert.get("subject", ())):
        rdns.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(rdns)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def refusal(cfg: TlsConfig, peercert: dict | None) -> str | None:
    """Why a client that completed the TLS handshake may not go on, or None."""
    if not cfg.authz:
        return None
    if not peercert:
        return "no client certificate"
    dn = distinguished_name(peercert)
    cns = {v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"}
    if dn in cfg.authz or cns & set(cfg.authz):
        return None
    return f"client certificate '{dn}' is not in the TLS authorization list"
