"""`qnbd serve` as a drop-in for qemu-nbd (issue 13): the same command lines run against
the installed qemu-nbd and against qnbd, comparing what a script sees — exit codes,
stderr, `qemu-nbd -L` listings, nbdinfo's answers and the bytes served. The installed
qemu-nbd is the oracle: nothing here is a string frozen from one qemu version."""

import importlib.util
import json
import os
import re
import shutil
import ssl
import subprocess

import nbd
import pytest

import qnbd
from nbdserver import make_raw, serve_cmd, short_tmpdir
from peers import as_qnbd, both, run
from tlsutil import make_pki

MiB = 1 << 20


def copy_image(src, dst) -> str:
    shutil.copyfile(src, dst)
    return str(dst)


# --- option errors: qemu-nbd's exit code and words ---

@pytest.mark.parametrize("args", [
    ["--discard=foo"], ["-e", "-3"], ["-e", "x"], ["--cache=fast"], ["--aio=foo"],
    ["--detect-zeroes=maybe"], ["-o", "x"], ["--bogus"], ["-Q"], ["-k", "rel.sock"],
    ["-n", "--cache=none"], ["--discard=unmap", "--discard=ignore"],
    ["--aio=threads", "--aio=native"], ["--image-opts", "-f", "raw"],
    ["--tls-creds=nope"], ["--tls-authz=x"], ["--tls-hostname=h"],
    ["--object", "foo,id=x"], ["--object", "secret,id=s0"],
    ["--object", "authz-simple,id=a0"], ["--object", "secret,id=s0,data=x,foo=1"],
    ["--object", "tls-creds-x509,dir=/x"],
    ["--object", "secret,id=s,data=x", "--object", "secret,id=s,data=y"],
    ["--object", "tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server", "--tls-creds", "t0"],
    ["--object", "tls-creds-x509,id=t0,dir=/nonexistent,endpoint=middle"],
    ["--object", "secret,id=t0,data=x", "--tls-creds", "t0"],
    ["--object", "tls-creds-psk,id=p0,dir=/nonexistent,endpoint=server"],
], ids=lambda a: " ".join(a))
def test_bad_options_as_qemu_nbd(tmp_path, args):
    img = make_raw(tmp_path / "a.raw", MiB)
    qemu, ours = both(*args, "-f", "raw", img)
    assert qemu.returncode == 1 and ours.returncode == 1, (qemu.stderr, ours.stderr)
    assert ours.stderr == as_qnbd(qemu.stderr)
    assert ours.stdout == qemu.stdout == ""


@pytest.mark.parametrize("args", [
    ["-L", "-x", "foo"], ["-L", "--fork"], ["-L", "-A"], ["-L", "--image-opts", "x"],
    ["-L", "-k", "/nonexistent/nbd.sock"],
], ids=lambda a: " ".join(a))
def test_list_mode_errors_as_qemu_nbd(args):
    qemu, ours = both(*args)
    assert (ours.returncode, ours.stderr) == (qemu.returncode, as_qnbd(qemu.stderr))


def test_offset_past_the_end_as_qemu_nbd(tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    qemu, ours = both("-k", os.path.join(short_tmpdir(), "s"), "-f", "raw", "-o", 2 * MiB, img)
    assert (ours.returncode, ours.stderr) == (qemu.returncode, as_qnbd(qemu.stderr))


@pytest.mark.parametrize("option", ["-V", "--version"])
def test_version(option):
    qemu, ours = both(option)
    assert qemu.returncode == ours.returncode == 0
    assert qemu.stderr == ours.stderr == ""
    # Scripts read the first line: the program, then its version.
    assert re.match(r"qemu-nbd \d+\.\d+", qemu.stdout)
    assert ours.stdout.splitlines()[0] == f"qnbd {qnbd.__version__}"
    assert run(*serve_cmd()[:-1], option).stdout == ours.stdout  # `qnbd --version` too


# --- qemu-nbd -L ---

def listing(*args) -> tuple[str, str]:
    """(qemu-nbd -L ARGS, qnbd serve -L ARGS) outputs, checked to succeed. Current qemu
    prints the header style it negotiated ("transaction size", qemu 8.2 and later) and
    qnbd does too; compared with an older qemu-nbd, that line is left out."""
    qemu, ours = both("-L", *args)
    assert qemu.returncode == 0, qemu.stderr
    assert ours.returncode == 0 and ours.stderr == "", ours.stderr
    out = ours.stdout
    if "transaction size:" not in qemu.stdout:
        out = "".join(line for line in out.splitlines(keepends=True)
                      if not line.startswith("  transaction size:"))
    return qemu.stdout, out


@pytest.fixture
def bitmap_image(tmp_path):
    img = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    run("qemu-img", "bitmap", "--add", img, "b0")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 64k 64k", img)
    return img


@pytest.mark.parametrize("server", ["qemu-nbd", "qnbd"])
def test_list_as_qemu_nbd(servers, bitmap_image, tmp_path, server):
    image = copy_image(bitmap_image, tmp_path / "copy.qcow2")
    running = servers(server, "-x", "disk", "-D", "my disk", "--allocation-depth",
                      "-B", "b0", "-e", "3", image)
    qemu, ours = listing(*running.where())
    assert ours == qemu
    assert " export: 'disk'" in ours and "qemu:allocation-depth" in ours


def test_list_both_servers_alike(servers, bitmap_image, tmp_path):
    """What qemu-nbd -L shows of a qnbd server is what it shows of a qemu-nbd server."""
    args = ["-f", "qcow2", "-x", "disk", "-D", "my disk", "-A", "-B", "b0", "-e", "3"]
    theirs = servers("qemu-nbd", *args, copy_image(bitmap_image, tmp_path / "q.qcow2"))
    mine = servers("qnbd", *args, copy_image(bitmap_image, tmp_path / "o.qcow2"))
    assert listing(*mine.where())[0] == listing(*theirs.where())[0]


# --- TLS: objects, authz, PSK ---

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")),
                    {"alice": "/O=Example/CN=alice", "bob": "/CN=bob"})


def x509(pki, who="server", ident="t0"):
    endpoint = "server" if who == "server" else "client"
    return ["--object", f"tls-creds-x509,id={ident},dir={pki[who]},endpoint={endpoint}",
            "--tls-creds", ident]


def connects(running, client_dir: str) -> bool:
    r = run("nbdinfo", "--size",
            f"nbds://127.0.0.1:{running.port}/?tls-certificates={client_dir}", check=False)
    return r.returncode == 0


def test_list_over_tls_as_qemu_nbd(servers, pki, tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    running = servers("qnbd", "-f", "raw", "-x", "tls", *x509(pki), img, tcp=True)
    qemu, ours = listing(*running.where(), *x509(pki, "alice", "c0"))
    assert ours == qemu and " export: 'tls'" in ours


@pytest.mark.skipif(not hasattr(nbd.NBD, "set_tls_hostname"),
                    reason="this libnbd has no nbd_set_tls_hostname")
def test_list_tls_hostname_as_qemu_nbd(servers, pki, tmp_path):
    """--tls-hostname: the name the server's certificate must carry (it names localhost)."""
    img = make_raw(tmp_path / "a.raw", MiB)
    running = servers("qnbd", "-f", "raw", *x509(pki), img, tcp=True)
    for hostname, ok in (("localhost", True), ("elsewhere.example", False)):
        qemu, ours = both("-L", *running.where(), *x509(pki, "alice", "c0"),
                          "--tls-hostname", hostname)
        assert (qemu.returncode, ours.returncode) == ((0, 0) if ok else (1, 1)), ours.stderr
        assert ours.stdout == qemu.stdout or not ok


@pytest.mark.parametrize("identity", ["O=Example,,CN=alice", "CN=alice,,O=Example"])
def test_authz_simple_as_qemu_nbd(servers, pki, tmp_path, identity):
    """authz-simple matches the distinguished name as qemu (GnuTLS) prints it."""
    img = make_raw(tmp_path / "a.raw", MiB)
    args = ["-f", "raw", "-e", "0", *x509(pki), "--object",
            f"authz-simple,id=a0,identity={identity}", "--tls-authz", "a0", img]
    answers = []
    for program in ("qemu-nbd", "qnbd"):
        running = servers(program, *args, tcp=True)
        answers.append([connects(running, pki[who]) for who in ("alice", "bob")])
    assert answers[0] == answers[1]
    assert answers[1] == [identity.startswith("O="), False]


def test_encrypted_server_key_with_a_secret(servers, pki, tmp_path):
    """tls-creds-x509's passwordid names the secret that decrypts server-key.pem."""
    creds = tmp_path / "encrypted"
    creds.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        shutil.copy(os.path.join(pki["server"], name), creds)
    run("openssl", "pkey", "-in", os.path.join(pki["server"], "server-key.pem"), "-aes256",
        "-passout", "pass:s3cret", "-out", creds / "server-key.pem")
    img = make_raw(tmp_path / "a.raw", MiB)
    for program in ("qemu-nbd", "qnbd"):
        running = servers(program, "-f", "raw", "--object", "secret,id=pw,data=s3cret",
                          "--object", f"tls-creds-x509,id=t0,dir={creds},endpoint=server,"
                          "passwordid=pw", "--tls-creds", "t0", img, tcp=True)
        assert connects(running, pki["alice"]), program


def test_authz_list_file_is_reread(servers, pki, tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    rules = tmp_path / "authz.json"
    rules.write_text(json.dumps({"rules": [{"match": "O=Example,CN=*", "format": "glob"}],
                                 "policy": "deny"}))
    running = servers("qnbd", "-f", "raw", "-e", "0", *x509(pki), "--object",
                      f"authz-list-file,id=a0,filename={rules}", "--tls-authz", "a0", img,
                      tcp=True)
    assert connects(running, pki["alice"]) and not connects(running, pki["bob"])
    rules.write_text(json.dumps({"rules": [{"match": "CN=bob"}], "policy": "deny"}))
    assert connects(running, pki["bob"]) and not connects(running, pki["alice"])


def _psk_supported() -> bool:
    if hasattr(ssl.SSLContext, "set_psk_server_callback"):
        return True
    return importlib.util.find_spec("sslpsk3") is not None


@pytest.fixture
def psk_dirs(tmp_path):
    """keys.psk directories: the server's, alice's (her key) and mallory's (a wrong key
    under alice's name)."""
    key = os.urandom(32).hex()
    files = {"server": f"alice:{key}\nbob:{os.urandom(32).hex()}\n", "alice": f"alice:{key}\n",
             "mallory": f"alice:{os.urandom(32).hex()}\n"}
    dirs = {}
    for name, text in files.items():
        d = tmp_path / f"psk-{name}"
        d.mkdir()
        (d / "keys.psk").write_text(text)
        dirs[name] = str(d)
    return dirs


@pytest.mark.skipif(not _psk_supported(), reason="TLS-PSK needs Python 3.13 or sslpsk3")
def test_psk_as_qemu_nbd(servers, psk_dirs, tmp_path):
    """qemu's tls-creds-psk: libnbd (tls-psk-file), qemu-img and qemu-nbd -L get in with
    the right key and not with a wrong one, from qemu-nbd and from qnbd alike."""
    img = make_raw(tmp_path / "a.raw", MiB, b"psk data", 0)
    server = ["--object", f"tls-creds-psk,id=p0,dir={psk_dirs['server']},endpoint=server",
              "--tls-creds", "p0"]
    answers = []
    for program in ("qemu-nbd", "qnbd"):
        running = servers(program, "-f", "raw", "-e", "0", *server, img, tcp=True)
        seen = []
        for who in ("alice", "mallory"):
            uri = (f"nbds://alice@127.0.0.1:{running.port}/?tls-psk-file="
                   f"{psk_dirs[who]}/keys.psk")
            seen.append(run("nbdinfo", "--size", uri, check=False).stdout.strip())
        client = ["--object", f"tls-creds-psk,id=c0,dir={psk_dirs['alice']},endpoint=client,"
                  "username=alice"]
        info = run("qemu-img", "info", "--output=json", *client, "--image-opts",
                   f"driver=nbd,host=127.0.0.1,port={running.port},tls-creds=c0", check=False)
        seen.append(info.returncode == 0 and json.loads(info.stdout)["virtual-size"])
        qemu, ours = listing(*running.where(), *client, "--tls-creds", "c0")
        assert ours == qemu
        answers.append(seen)
    assert answers[0] == answers[1] == [str(MiB), "", MiB]


# --- --offset, --image-opts, json: names ---

def exported(running) -> tuple[int, bytes]:
    """(size, content) of the default export."""
    uri = (f"nbd+unix:///?socket={running.sock}" if running.sock
           else f"nbd://127.0.0.1:{running.port}")
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=60)
    return info["exports"][0]["export-size"], out.stdout


@pytest.fixture
def patterned(tmp_path):
    data = bytes(range(256)) * (MiB // 256)
    raw = make_raw(tmp_path / "p.raw", MiB, data, 0)
    qcow = tmp_path / "p.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    return raw, str(qcow)


@pytest.mark.parametrize("how", [
    ["-f", "raw", "-o", "4096", "RAW"], ["-f", "raw", "--offset=0x1000", "RAW"],
    ["-f", "qcow2", "-o", "65536", "QCOW"],
    ["--image-opts", "driver=qcow2,file.filename=QCOW"],
    ["--image-opts", "driver=raw,file.driver=file,file.filename=RAW,offset=512,size=8192"],
    ["--image-opts", "driver=file,filename=RAW"],
    ['json:{"driver": "qcow2", "file": {"driver": "file", "filename": "QCOW"}}'],
    ["--image-opts", "-o", "1024", "driver=raw,file.filename=RAW,offset=512"],
], ids=lambda a: " ".join(a))
def test_images_as_qemu_nbd(servers, patterned, how):
    raw, qcow = patterned
    args = [a.replace("RAW", raw).replace("QCOW", qcow) for a in how]
    results = [exported(servers(program, "-r", *args)) for program in ("qemu-nbd", "qnbd")]
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("image", [
    "driver=raw,file.filename=RAW,foo=1", "driver=vmdkx,file.filename=RAW",
    "driver=raw,file.filename=/nonexistent/x.raw",
])
def test_image_opts_errors_one_line(patterned, image):
    raw, _ = patterned
    qemu, ours = both("-k", os.path.join(short_tmpdir(), "s"), "--image-opts",
                      image.replace("RAW", raw))
    assert qemu.returncode == ours.returncode == 1
    assert ours.stderr.count("\n") == 1 and ours.stderr.startswith("qnbd serve: "), ours.stderr


def test_aio_and_trace_are_accepted(servers, tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    log = tmp_path / "trace.log"
    running = servers("qnbd", "-f", "raw", "--aio=threads", "-T", f"nbd_*,file={log}", img)
    assert exported(running)[0] == MiB
    assert "listening on" in log.read_text()


# --- -B: a bitmap anywhere in the backing chain ---

@pytest.mark.parametrize("read_only", [True, False])
def test_bitmap_in_backing_file_as_qemu_nbd(servers, tmp_path, read_only):
    maps = []
    for program in ("qemu-nbd", "qnbd"):
        d = tmp_path / program
        d.mkdir()
        run("qemu-img", "create", "-q", "-f", "qcow2", d / "base.qcow2", "4M")
        run("qemu-img", "bitmap", "--add", "-g", "64k", d / "base.qcow2", "b0")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 128k 64k", "-c",
            "write -P 2 1M 4k", d / "base.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
            d / "top.qcow2")
        running = servers(program, "-f", "qcow2", "-B", "b0", *(["-r"] if read_only else []),
                          d / "top.qcow2")
        uri = f"nbd+unix:///?socket={running.sock}"
        if not read_only:
            run("qemu-io", "-f", "raw", "-c", "write -P 3 2M 64k", uri)
        r = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", uri)
        maps.append(json.loads(r.stdout))
    assert maps[0] == maps[1]
    assert any(e["type"] == 1 for e in maps[1])


# --- raw images of any size; probed raw images ---

@pytest.mark.parametrize("args", [["-f", "raw"], [], ["-r"]], ids=["raw", "probed", "probed-ro"])
def test_unaligned_raw_as_qemu_nbd(servers, tmp_path, args):
    """A 1000-byte file is a 1024-byte export whose tail reads zeros; a probed one has a
    minimum block size of 512, and a warning when it is writable."""
    seen = []
    for program in ("qemu-nbd", "qnbd"):
        img = tmp_path / f"{program}.raw"
        img.write_bytes(os.urandom(1000))
        running = servers(program, *args, img)
        uri = f"nbd+unix:///?socket={running.sock}"
        info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
        block_map = run("nbdinfo", "--map", uri).stdout
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(1024, 0) == img.read_bytes() + bytes(24)
        h.shutdown()
        write_block0 = run("qemu-io", "-f", "raw", "-c", "write -P 0 0 512", uri, check=False)
        warned = "probing guessed raw" in running.stop()
        seen.append((info["export-size"], info["block_size_minimum"], block_map, warned,
                     write_block0.returncode))
    assert seen[0] == seen[1]
    assert seen[1][0] == 1024


def test_probed_raw_keeps_probing_as_raw(servers, tmp_path):
    """Writing a qcow2 magic into the first sector of a probed raw image is refused by
    both (the image would open as qcow2 next time); with -f raw it is allowed."""
    magic = tmp_path / "magic"
    magic.write_bytes(b"QFI\xfb\0\0\0\3")
    for args in ([], ["-f", "raw"]):
        codes = []
        for program in ("qemu-nbd", "qnbd"):
            img = make_raw(tmp_path / f"{program}.raw", MiB)
            running = servers(program, *args, img)
            r = run("qemu-io", "-f", "raw", "-c", f"write -s {magic} 0 8",
                    f"nbd+unix:///?socket={running.sock}", check=False)
            codes.append("Operation not permitted" in r.stdout + r.stderr)
        assert codes[0] == codes[1] == (not args)
