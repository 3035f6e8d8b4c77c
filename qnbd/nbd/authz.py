"""Who may use the server after TLS: the identity of a client checked against qemu's authz
objects (qemu docs/system/authz.rst) or qnbd's list of names.

The identity is what qemu checks: for X.509 the client certificate's distinguished name as
GnuTLS prints it (gnutls_x509_crt_get_dn: the RDNs in certificate order, e.g.
"O=Example,CN=alice" for a certificate made with -subj /O=Example/CN=alice), for PSK the
username. qemu-nbd logs it when it refuses a client ("TLS x509 authz check for ... is
denied"), so that is the string to put in authz-simple's identity.

- authz-simple,identity=ID: that one identity.
- authz-list (JSON --object only) and authz-list-file,filename=F: rules in order, the first
  whose `match` fits decides (`format` exact or glob, `policy` allow or deny); none: the
  list's `policy`. The file is read again when it changes, as qemu does with refresh=on.
- qnbd's own --tls-authz NAME (and the config file's authz list): a distinguished name in
  either order (qemu's, or RFC 4514's most-specific-first), a bare common name, or some of
  the attributes (`CN=backup-host` matches `O=Example,CN=backup-host`): every attribute
  given must be in the certificate's subject.
"""

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field

from ..errors import QnbdError

# GnuTLS prints attribute types by these short names; others keep Python's long names.
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "localityName": "L", "stateOrProvinceName": "ST", "countryName": "C",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "EMAIL",
}


def subject_rdns(peercert: dict) -> list[list[tuple[str, str]]]:
    """The subject of `SSLSocket.getpeercert()` as RDNs of (short name, value), in the
    certificate's order."""
    return [[(_SHORT_NAMES.get(k, k), v) for k, v in rdn]
            for rdn in peercert.get("subject", ())]


def distinguished_name(peercert: dict, rfc4514: bool = False) -> str:
    """qemu's identity for a certificate (certificate order), or with `rfc4514` the
    most specific RDN first; special characters escaped as RFC 4514 section 2.4 says."""
    rdns = subject_rdns(peercert)
    if rfc4514:
        rdns.reverse()
    return ",".join("+".join(f"{k}={_escape(v)}" for k, v in rdn) for rdn in rdns)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


# An RFC 4514 attribute: TYPE=value, with backslash escapes; separators , and +.
_ATTRIBUTE = re.compile(r"\s*([A-Za-z][\w.-]*)\s*=((?:[^,+\\]|\\.)*)")


def _parse_dn(text: str) -> set[tuple[str, str]] | None:
    """The attributes of a distinguished name, or None when `text` is not one."""
    attrs, pos = set(), 0
    while pos < len(text):
        m = _ATTRIBUTE.match(text, pos)
        if not m:
            return None
        value = re.sub(r"\\(.)", r"\1", m.group(2).strip())
        attrs.add((m.group(1).upper(), value))
        pos = m.end()
        if pos < len(text):
            if text[pos] not in ",+":
                return None
            pos += 1
    return attrs or None


@dataclass
class NameList:
    """qnbd's --tls-authz NAME values (see the module docstring)."""
    names: tuple[str, ...]

    def allows_certificate(self, peercert: dict) -> bool:
        have = {(k.upper(), v) for rdn in subject_rdns(peercert) for k, v in rdn}
        for name in self.names:
            wanted = _parse_dn(name)
            if wanted is None:
                wanted = {("CN", name)}
            if wanted <= have:
                return True
        return False


@dataclass
class Rule:
    match: str
    policy: str = "allow"
    format: str = "exact"

    def fits(self, identity: str) -> bool:
        if self.format == "glob":
            return fnmatch.fnmatchcase(identity, self.match)
        return identity == self.match


def _rules(doc, where: str) -> tuple[list[Rule], str]:
    """authz-list's properties: `rules` and the default `policy` (qapi QAuthZListRule)."""
    if not isinstance(doc, dict):
        raise QnbdError(f"{where}: expected a JSON object with 'rules' and 'policy'")
    default = doc.get("policy", "deny")
    rules = []
    for item in doc.get("rules", []):
        if not isinstance(item, dict) or not isinstance(item.get("match"), str):
            raise QnbdError(f"{where}: each rule needs a 'match' string")
        rule = Rule(item["match"], item.get("policy", "allow"), item.get("format", "exact"))
        if rule.policy not in ("allow", "deny") or rule.format not in ("exact", "glob"):
            raise QnbdError(f"{where}: rule {item!r}: policy is allow|deny, format exact|glob")
        rules.append(rule)
    if default not in ("allow", "deny"):
        raise QnbdError(f"{where}: policy must be allow or deny, not {default!r}")
    return rules, default


@dataclass
class AuthzList:
    """authz-simple, authz-list and authz-list-file: allows(identity)."""
    rules: list[Rule] = field(default_factory=list)
    policy: str = "deny"
    filename: str | None = None       # authz-list-file: reloaded when it changes
    _stamp: tuple | None = None

    @classmethod
    def simple(cls, identity: str) -> "AuthzList":
        return cls([Rule(identity)])

    @classmethod
    def from_json(cls, doc, where: str) -> "AuthzList":
        return cls(*_rules(doc, where))

    @classmethod
    def from_file(cls, filename: str) -> "AuthzList":
        authz = cls(filename=filename)
        authz._reload()
        return authz

    def _reload(self) -> None:
        try:
            st = os.stat(self.filename)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            with open(self.filename, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as e:
            raise QnbdError(f"Unable to read '{self.filename}': {e.strerror}") from None
        except ValueError as e:
            raise QnbdError(f"{self.filename}: not valid JSON: {e}") from None
        self.rules, self.policy = _rules(doc, self.filename)
        self._stamp = stamp

    def allows(self, identity: str) -> bool:
        if self.filename is not None:
            try:
                self._reload()
            except QnbdError:
                return False  # a file that became unreadable allows nobody
        for rule in self.rules:
            if rule.fits(identity):
                return rule.policy == "allow"
        return self.policy == "allow"
