"""TLS (issue 7): `qnbd serve --tls-creds` against libnbd, nbdinfo nbds:// and qemu-img, and
the rules of proto.md "TLS support" on the wire: FORCEDTLS refuses everything but STARTTLS
and ABORT before TLS, SELECTIVETLS hides TLS-only exports, a second STARTTLS is INVALID,
nothing negotiated in plaintext survives the upgrade, client certificates are verified and
checked against --tls-authz."""

import os
import socket
import ssl
import struct
import subprocess
import time

import nbd
import pytest

from nbdserver import RawClient, Server, make_raw, run_serve, short_tmpdir, wait_for_socket
from tlsutil import make_pki

MiB = 1 << 20
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_SERVER = 1, 2
ERR_INVALID, ERR_TLS_REQD, ERR_UNKNOWN = (1 << 31) | 3, (1 << 31) | 5, (1 << 31) | 6
FLAG_SEND_DF = 1 << 7


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")),
                    {"alice": "/O=Example/CN=alice", "bob": "/CN=bob"})


@pytest.fixture
def image(tmp_path):
    return make_raw(tmp_path / "disk.raw", MiB, b"secret data", 0)


def tls_client(pki_dir=None, verify=True) -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    if pki_dir:
        h.set_tls_certificates(pki_dir)
    h.set_tls_verify_peer(verify)
    return h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_server(pki, image):
    """A TLS server on 127.0.0.1 (for nbds:// URIs and qemu, which check the SAN)."""
    port = free_port()
    d = short_tmpdir()
    server = Server(["-t", "-b", "127.0.0.1", "-p", port, "-f", "raw", "--tls-creds",
                     pki["server"], image], os.path.join(d, "unused"))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.proc.poll() is None, server.proc.stderr.read()
            time.sleep(0.05)
    yield port
    server.stop()


def starttls(client: RawClient, client_dir: str) -> None:
    """STARTTLS on a raw client, then TLS on its socket with the client's certificate."""
    client.send_option(OPT_STARTTLS)
    assert client.option_replies() == [(REP_ACK, b"")]
    ctx = ssl.create_default_context(cafile=os.path.join(client_dir, "ca-cert.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(os.path.join(client_dir, "client-cert.pem"),
                        os.path.join(client_dir, "client-key.pem"))
    client.s = ctx.wrap_socket(client.s)


def info_payload(name: str) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", 0)


# --- FORCEDTLS (the default with --tls-creds) ---


def test_libnbd_over_tls(serve, pki, image):
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"])
    h = tls_client(pki["alice"])
    h.connect_uri(server.uri)
    assert h.get_tls_negotiated()
    assert h.pread(11, 0) == b"secret data"
    h.pwrite(b"over tls", 100)
    assert h.pread(8, 100) == b"over tls"
    h.shutdown()


def test_plaintext_refused_before_any_data(serve, pki, image):
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"])
    c = RawClient(server.sock)
    c.greeting()
    for option, data in [(OPT_LIST, b""), (OPT_INFO, info_payload("")), (OPT_GO, info_payload("")),
                         (OPT_STRUCTURED_REPLY, b""), (99, b"xyz"), (OPT_SET_META_CONTEXT, b"")]:
        c.send_option(option, data)
        assert [r for r, _ in c.option_replies()] == [ERR_TLS_REQD], option
    # Too long to be read: skipped and still TLS_REQD, not TOO_BIG.
    c.send_option(OPT_LIST, b"x" * 70000)
    assert [r for r, _ in c.option_replies()] == [ERR_TLS_REQD]
    c.send_option(OPT_EXPORT_NAME, b"")  # cannot be refused: the session ends, no data
    assert c.closed_by_server()
    # libnbd without TLS gives up at the first refusal.
    with pytest.raises(nbd.Error, match="TLS"):
        nbd.NBD().connect_uri(server.uri)


def test_abort_before_tls(serve, pki, image):
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"])
    c = RawClient(server.sock)
    c.greeting()
    c.send_option(OPT_ABORT)
    assert c.option_replies() == [(REP_ACK, b"")]
    assert c.closed_by_server()


def test_second_starttls_invalid_and_plaintext_state_dropped(serve, pki, image, tmp_path):
    conf = tmp_path / "q.toml"
    conf.write_text(f'[tls]\ncreds = "{pki["server"]}"\nmode = "on"\n'
                    f'[[export]]\nimage = "{image}"\nformat = "raw"\n')
    d = short_tmpdir()
    server = Server(["--config", conf, "-k", os.path.join(d, "s")], os.path.join(d, "s"))
    try:
        wait_for_socket(server.sock, server.proc)
        c = RawClient(server.sock)
        c.greeting()
        c.send_option(OPT_STRUCTURED_REPLY)  # SELECTIVETLS: allowed in plaintext...
        assert c.option_replies() == [(REP_ACK, b"")]
        starttls(c, pki["alice"])
        c.send_option(OPT_STARTTLS)
        assert [r for r, _ in c.option_replies()] == [ERR_INVALID]
        c.send_option(OPT_GO, info_payload(""))
        replies = c.option_replies()
        assert replies[-1][0] == REP_ACK
        _, size, flags = struct.unpack(">HQH", replies[0][1])
        # ...but forgotten by the TLS session: no structured replies, so no SEND_DF.
        assert size == MiB and not flags & FLAG_SEND_DF
        c.request(0, 0, 11)
        assert c.simple_reply() == (0, 1) and c.recv(11) == b"secret data"
    finally:
        server.stop()


def test_plaintext_after_starttls_is_not_executed(serve, pki, image):
    """Bytes sent along with STARTTLS, before the TLS handshake, could be injected by a
    man in the middle: the session ends instead of acting on them."""
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"])
    c = RawClient(server.sock)
    c.greeting()
    c.s.sendall(struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0)
                + struct.pack(">QII", 0x49484156454F5054, OPT_STRUCTURED_REPLY, 0))
    assert c.option_replies() == [(REP_ACK, b"")]
    assert c.closed_by_server()


# --- certificates and authorization ---


@pytest.mark.parametrize("who", ["rogue", None])
def test_unverified_clients_refused(serve, pki, image, who):
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"])
    h = tls_client(pki[who] if who else None, verify=False)
    with pytest.raises(nbd.Error):
        h.connect_uri(server.uri)
    # The failed handshake freed its slot (-e 1): the next client is served.
    h = tls_client(pki["alice"])
    h.connect_uri(server.uri)
    assert h.pread(6, 0) == b"secret"
    h.shutdown()


def test_verify_peer_off_accepts_clients_without_certificates(serve, pki, image, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    for f in ("server-cert.pem", "server-key.pem"):  # no ca-cert.pem needed
        (creds / f).write_bytes(open(os.path.join(pki["server"], f), "rb").read())
    server = serve(image, "-f", "raw", "--tls-creds", creds, "--tls-verify-peer=off")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_verify_peer(False)
    h.connect_uri(server.uri)
    assert h.get_tls_negotiated() and h.pread(6, 0) == b"secret"
    h.shutdown()


@pytest.mark.parametrize("authz, allowed", [
    (["CN=alice,O=Example"], {"alice"}),   # a distinguished name, RFC 4514 order
    (["O=Example,CN=alice"], {"alice"}),   # or qemu's (the certificate's order)
    (["bob"], {"bob"}),                    # or the common name
    (["CN=alice"], {"alice"}),             # or some attributes (the README's example)
    (["O=Example"], {"alice"}),
    (["CN=alice,O=Other"], set()),         # every attribute given must be there
    (["CN=bob", "alice"], {"alice", "bob"}),
])
def test_tls_authz(serve, pki, image, authz, allowed):
    args = [a for name in authz for a in ("--tls-authz", name)]
    server = serve(image, "-f", "raw", "-e", "0", "--tls-creds", pki["server"], *args)
    for who in ("alice", "bob"):
        h = tls_client(pki[who])
        if who in allowed:
            h.connect_uri(server.uri)
            assert h.pread(6, 0) == b"secret"
            h.shutdown()
        else:
            with pytest.raises(nbd.Error):
                h.connect_uri(server.uri)


def test_tls_authz_file(serve, pki, image, tmp_path):
    allow = tmp_path / "allow"
    allow.write_text("# clients allowed\nCN=bob\n\nCN=alice,O=Example\n")
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"], "--tls-authz", f"@{allow}")
    h = tls_client(pki["alice"])
    h.connect_uri(server.uri)
    h.shutdown()


# --- other clients: nbdinfo nbds://, qemu-img ---


def test_nbdinfo_nbds_uri(tcp_server, pki):
    out = subprocess.run(["nbdinfo", "--size",
                          f"nbds://127.0.0.1:{tcp_server}/?tls-certificates={pki['alice']}"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(MiB)


def test_qemu_img_over_tls(tcp_server, pki, tmp_path):
    out = tmp_path / "copy.raw"
    r = subprocess.run(["qemu-img", "convert", "-O", "raw", "--object",
                        f"tls-creds-x509,id=tls0,dir={pki['alice']},endpoint=client",
                        "--image-opts",
                        f"driver=nbd,host=127.0.0.1,port={tcp_server},tls-creds=tls0",
                        str(out)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:11] == b"secret data" and out.stat().st_size == MiB


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_1_1_refused(serve, pki, image):
    """proto.md "TLS versions": 1.2 at least."""
    server = serve(image, "-f", "raw", "--tls-creds", pki["server"], "--tls-verify-peer=off")
    c = RawClient(server.sock)
    c.greeting()
    c.send_option(OPT_STARTTLS)
    assert c.option_replies() == [(REP_ACK, b"")]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(c.s)


# --- SELECTIVETLS: tls_only exports ---


@pytest.fixture
def selective(pki, tmp_path):
    public = make_raw(tmp_path / "public.raw", MiB, b"public", 0)
    secret = make_raw(tmp_path / "secret.raw", MiB, b"secret", 0)
    d = short_tmpdir()
    sock = os.path.join(d, "s")
    conf = tmp_path / "q.toml"
    conf.write_text(f"""
[tls]
creds = "{pki['server']}"
mode = "on"
authz = ["alice"]
[[listen]]
unix = "{sock}"
[[export]]
name = "secret"
image = "{secret}"
format = "raw"
tls_only = true
shared = 0
[[export]]
name = "public"
image = "{public}"
format = "raw"
shared = 0
""")
    server = Server(["--config", conf], sock)
    wait_for_socket(sock, server.proc)
    yield server
    server.stop()


def test_selective_tls_hides_tls_only_exports(selective, pki):
    c = RawClient(selective.sock)
    c.greeting()
    c.send_option(OPT_LIST)
    names = [data[4:].decode() for r, data in c.option_replies() if r == REP_SERVER]
    assert names == ["public"]
    # "secret" and the default export (which is "secret") need TLS.
    for name in ("secret", ""):
        c.send_option(OPT_INFO, info_payload(name))
        assert [r for r, _ in c.option_replies()] == [ERR_TLS_REQD]
    c.send_option(OPT_INFO, info_payload("nothing"))
    assert [r for r, _ in c.option_replies()] == [ERR_UNKNOWN]
    c.send_option(OPT_EXPORT_NAME, b"secret")
    assert c.closed_by_server()
    # Plaintext clients use the public export; TLS clients see both.
    h = nbd.NBD()
    h.connect_uri(selective.uri_for("public"))
    assert h.pread(6, 0) == b"public" and not h.get_tls_negotiated()
    h.shutdown()
    h = tls_client(pki["alice"])
    h.connect_uri(selective.uri_for("secret"))
    assert h.pread(6, 0) == b"secret"
    h.shutdown()
    h = tls_client(pki["alice"])
    h.set_opt_mode(True)
    h.connect_uri(selective.uri_for(""))
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert sorted(names[1:]) == ["public", "secret"]
    h.opt_abort()


def test_selective_tls_authz(selective, pki):
    """The allow-list applies to every TLS client: bob may not upgrade."""
    h = tls_client(pki["bob"])
    with pytest.raises(nbd.Error):
        h.connect_uri(selective.uri_for("public"))


# --- configuration errors: one line ---


@pytest.mark.parametrize("args, message", [
    (["--tls", "on"], "--tls and --tls-verify-peer need --tls-creds"),
    (["--tls-authz", "alice"], "--tls-authz is not permitted without --tls-creds"),
    (["--tls-creds", "CREDS", "--tls-verify-peer=off", "--tls-authz", "alice"],
     "--tls-authz needs client certificates to be verified (verify-peer on)"),
])
def test_tls_option_errors(pki, image, args, message):
    args = [pki["server"] if a == "CREDS" else a for a in args]
    r = run_serve(*args, "-f", "raw", image)
    assert r.returncode == 1 and r.stderr.strip() == f"qnbd serve: {message}", r.stderr


def test_tls_only_needs_tls(tmp_path, image):
    conf = tmp_path / "q.toml"
    conf.write_text(f'[[export]]\nname = "x"\nimage = "{image}"\ntls_only = true\n')
    r = run_serve("--config", conf)
    assert r.returncode == 1
    assert "export 'x' is tls_only but TLS is off" in r.stderr
