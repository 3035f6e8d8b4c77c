"""X.509 test credentials made with the openssl CLI, in qemu's tls-creds-x509 layout:
a server directory (ca-cert.pem, server-cert.pem, server-key.pem) and one client
directory per name (ca-cert.pem, client-cert.pem, client-key.pem), which is also what
libnbd's set_tls_certificates and qemu's endpoint=client read. EC P-256 keys keep it fast.

The extensions are those of a real CA (RFC 5280 4.2.1), because verifiers check them:
Python 3.13's default contexts set VERIFY_X509_STRICT, which rejects a CA certificate
without keyUsage (keyCertSign) and leaf certificates without an authority key identifier,
and GnuTLS (qemu, libnbd) wants basicConstraints CA:TRUE on the CA, as qemu's
docs/system/tls.rst shows with certtool ("ca", "cert_signing_key").
"""

import os
import shutil
import subprocess


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key(name, cwd):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", name, cwd=cwd)


def _sign(cwd, key, cert, subject, ext: str, ca_key="ca-key.pem", ca_cert="ca-cert.pem"):
    _openssl("req", "-new", "-key", key, "-subj", subject, "-out", "req.csr", cwd=cwd)
    ext = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
           "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n" + ext)
    with open(os.path.join(cwd, "ext.cnf"), "w") as f:
        f.write(ext)
    _openssl("x509", "-req", "-in", "req.csr", "-CA", ca_cert, "-CAkey", ca_key,
             "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", cert, cwd=cwd)


def _ca(key, cert, subject, cwd):
    _key(key, cwd)
    _openssl("req", "-x509", "-new", "-key", key, "-subj", subject, "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", "-out", cert, cwd=cwd)


def make_pki(root, clients: dict[str, str]) -> dict[str, str]:
    """Directories "server", each client name in `clients` (name -> subject), and
    "rogue" (a client signed by another CA); returns name -> directory."""
    work = os.path.join(root, "ca")
    os.makedirs(work)
    _ca("ca-key.pem", "ca-cert.pem", "/CN=qnbd test CA", work)
    _key("server-key.pem", work)
    _sign(work, "server-key.pem", "server-cert.pem", "/O=qnbd/CN=localhost",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    dirs = {"server": os.path.join(root, "server")}
    os.makedirs(dirs["server"])
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(os.path.join(work, f), dirs["server"])
    for name, subject in clients.items():
        _key(f"{name}-key.pem", work)
        _sign(work, f"{name}-key.pem", f"{name}-cert.pem", subject,
              "extendedKeyUsage=clientAuth\n")
        dirs[name] = _client_dir(root, name, work, f"{name}-cert.pem", f"{name}-key.pem")
    # A client certificate from a CA the server does not trust.
    _ca("rogue-ca-key.pem", "rogue-ca-cert.pem", "/CN=rogue CA", work)
    _key("rogue-key.pem", work)
    _sign(work, "rogue-key.pem", "rogue-cert.pem", "/CN=alice", "extendedKeyUsage=clientAuth\n",
          ca_key="rogue-ca-key.pem", ca_cert="rogue-ca-cert.pem")
    dirs["rogue"] = _client_dir(root, "rogue", work, "rogue-cert.pem", "rogue-key.pem")
    return dirs


def _client_dir(root, name, work, cert, key) -> str:
    d = os.path.join(root, name)
    os.makedirs(d)
    shutil.copy(os.path.join(work, "ca-cert.pem"), d)  # trusts the server's CA
    shutil.copy(os.path.join(work, cert), os.path.join(d, "client-cert.pem"))
    shutil.copy(os.path.join(work, key), os.path.join(d, "client-key.pem"))
    return d
