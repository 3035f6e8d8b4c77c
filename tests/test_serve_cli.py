"""`qnbd serve` as users start it: qemu-nbd's options, listeners, lifecycle (fork, pid
file, signals, socket activation), the config file, and real clients (qemu-io, qemu-img,
nbdinfo, nbdcopy) against it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import nbd
import pytest

from peers import run
from nbdserver import Server, make_raw, run_serve, serve_cmd, short_tmpdir, wait_for_socket

MiB = 1 << 20




def qcow2(path, size="64M"):
    run("qemu-img", "create", "-f", "qcow2", path, size)
    return str(path)


def sock_path():
    return os.path.join(short_tmpdir(), "nbd.sock")


# --- option errors: one line, non-zero, no traceback ---

@pytest.mark.parametrize("args, message", [
    (["--bitmap", "b0"], "Bitmap 'b0' is not found"),  # a raw image has no bitmaps
    (["--tls-creds", "/nonexistent"],
     "TLS credentials in '/nonexistent' cannot be loaded: No such file or directory"),
    (["-l", "snap"], "Failed to load snapshot: the raw format has no internal snapshots"),
    (["--detect-zeroes=unmap"], "setting detect-zeroes to unmap is not allowed without setting "
     "discard operation to unmap"),
    (["--config", "/nonexistent.toml"], "/nonexistent.toml: No such file or directory"),
])
def test_refused_options_one_line(tmp_path, args, message):
    img = make_raw(tmp_path / "a.raw", MiB)
    r = run_serve(*args, "-f", "raw", img) if args[0] != "--config" else run_serve(*args)
    assert r.returncode == 1
    assert r.stderr.strip() == f"qnbd serve: {message}", r.stderr
    assert "Traceback" not in r.stderr


def test_missing_image_one_line(tmp_path):
    r = run_serve("-k", sock_path(), tmp_path / "nope.qcow2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "nope.qcow2" in r.stderr


def test_bad_values_rejected_by_parser(tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    for bad in (["--discard", "sometimes"], ["-e", "-3"], ["-p", "70000"], ["--cache", "fast"]):
        r = run_serve(*bad, img)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, (bad, r.stderr)


# --- lifecycle ---

def test_fork_pid_file_and_sigterm_cleanup(tmp_path):
    img = qcow2(tmp_path / "a.qcow2")
    sock = sock_path()
    pid_file = tmp_path / "qnbd.pid"
    r = run_serve("--fork", "--pid-file", pid_file, "-k", sock, "-t", img)
    assert r.returncode == 0, r.stderr
    pid = int(pid_file.read_text())
    # Listening before the parent returned: no waiting needed.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x6b 10M 64k",
        f"nbd+unix:///?socket={sock}")
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    # As qemu-nbd: the socket is removed, the pid file stays (test_serve_lifecycle.py).
    assert not os.path.exists(sock) and int(pid_file.read_text()) == pid
    run("qemu-img", "check", img)  # clean: exits 0
    run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x6b 10M 64k", img)


def test_fork_failure_reported_by_parent(tmp_path):
    r = run_serve("--fork", "-k", sock_path(), tmp_path / "missing.raw")
    assert r.returncode == 1
    assert "missing.raw" in r.stderr and "Traceback" not in r.stderr


def test_sigint_finishes_and_image_is_clean(tmp_path, serve):
    img = qcow2(tmp_path / "a.qcow2")
    server = serve(img)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for i in range(16):
        h.pwrite(bytes([i + 1]) * 65536, i * 3 * 65536)
    code, err = server.stop(signal.SIGINT)
    assert code == 0, err
    assert not os.path.exists(server.sock)
    run("qemu-img", "check", img)
    out = run("qemu-io", "-f", "qcow2", "-r", "-c", f"read -P 16 {15 * 3 * 65536} 64k", img).stdout
    assert "read 65536/65536" in out


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Until `pid` has exited (a zombie left to an init that does not reap counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still running")


def test_exits_after_last_client_without_persistent(tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    sock = sock_path()
    pid_file = tmp_path / "pid"
    r = run_serve("--fork", "--pid-file", pid_file, "-k", sock, "-f", "raw", img)
    assert r.returncode == 0, r.stderr
    pid = int(pid_file.read_text())
    run("nbdinfo", f"nbd+unix:///?socket={sock}")
    _wait_gone(pid)
    assert not os.path.exists(sock) and os.path.exists(pid_file)   # kept, as by qemu-nbd


def test_shared_clients_wait_for_a_free_slot(tmp_path, serve):
    img = make_raw(tmp_path / "a.raw", MiB)
    server = serve(img, "-f", "raw")  # -e 1 by default, as qemu-nbd
    first = nbd.NBD()
    first.connect_uri(server.uri)
    second = subprocess.Popen(["nbdinfo", "--size", server.uri], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert second.poll() is None  # held, unanswered, like qemu-nbd
    first.shutdown()
    out, _ = second.communicate(timeout=10)
    assert out.strip() == str(MiB)


ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.close(int(sys.argv[1]))
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def test_socket_activation(tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB, b"activated", 0)
    d = short_tmpdir()
    path = os.path.join(d, "act.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen()
    fd = lsock.fileno()
    # systemd passes the socket as fd 3 and names the pid it meant; exec keeps the pid.
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, str(fd), *serve_cmd("-t", "-f", "raw", img)],
                            pass_fds=(fd,), stderr=subprocess.PIPE, text=True)
    lsock.close()
    try:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={path}")
        assert h.pread(9, 0) == b"activated"
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_socket_activation_refuses_listener_options(tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    env = dict(os.environ, LISTEN_FDS="1")
    r = subprocess.run(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh",
                        *serve_cmd("-k", sock_path(), img)], env=env, capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 1
    assert "cannot be used with socket activation" in r.stderr


def _free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family, host, uri_host", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"), (socket.AF_INET6, "::1", "[::1]")])
def test_tcp_listener(tmp_path, family, host, uri_host):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = _free_port(family, host)
    except OSError:
        pytest.skip(f"cannot bind {host}")
    img = make_raw(tmp_path / "a.raw", MiB, b"tcp!", 0)
    server = Server(["-t", "-f", "raw", "-b", host, "-p", port, img], sock="")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((host, port)).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.proc.poll() is None
                time.sleep(0.02)
        h = nbd.NBD()
        h.connect_uri(f"nbd://{uri_host}:{port}")
        assert h.pread(4, 0) == b"tcp!"
        h.shutdown()
    finally:
        code, err = server.stop()
    assert code == 0, err


# --- export policy ---

def test_snapshot_writes_do_not_reach_the_image(tmp_path, serve):
    img = make_raw(tmp_path / "a.raw", 4 * MiB, b"orig" * 1024, 0)
    before = open(img, "rb").read()
    server = serve(img, "-f", "raw", "-s")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"new!", 2)
    h.zero(MiB, MiB)
    h.flush()
    assert h.pread(8, 0) == b"ornew!ig"
    assert h.pread(4, 1024) == b"orig"
    h.shutdown()
    server.stop()
    assert open(img, "rb").read() == before


def test_snapshot_of_qcow2_leaves_it_untouched_and_clean(tmp_path, serve):
    img = qcow2(tmp_path / "a.qcow2", "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", img)
    before = open(img, "rb").read()
    server = serve(img, "-s")
    run("qemu-io", "-f", "raw", "-c", "write -P 4 512k 1M", "-c", "read -P 3 0 512k",
        "-c", "read -P 4 512k 1M", "-c", "flush", server.uri)
    code, err = server.stop()
    assert code == 0, err
    assert open(img, "rb").read() == before
    run("qemu-img", "check", img)


def test_qcow2_trim_with_discard_unmap_frees_clusters(tmp_path, serve):
    img = qcow2(tmp_path / "a.qcow2", "8M")
    server = serve(img, "--discard=unmap")
    run("qemu-io", "-f", "raw", "-c", "write -P 9 0 2M", "-c", "discard 0 1M", server.uri)
    out = json.loads(run("nbdinfo", "--map", "--json", server.uri).stdout)
    assert out[0]["offset"] == 0 and out[0]["length"] == MiB and out[0]["type"] & 2
    assert any(e["offset"] == MiB and e["type"] == 0 for e in out)
    server.stop()
    run("qemu-img", "check", img)


def test_detect_zeroes_unmap_makes_holes(tmp_path, serve):
    img = make_raw(tmp_path / "a.raw", 4 * MiB, b"\x01" * MiB, 0)
    server = serve(img, "-f", "raw", "--discard=unmap", "--detect-zeroes=unmap")
    run("qemu-io", "-f", "raw", "-c", "write -P 0 0 1M", server.uri)
    out = json.loads(run("nbdinfo", "--map", "--json", server.uri).stdout)
    assert out == [{"offset": 0, "length": 4 * MiB, "type": 3, "description": "hole,zero"}]


def test_discard_ignore_keeps_data(tmp_path, serve):
    img = make_raw(tmp_path / "a.raw", 4 * MiB, b"\x01" * MiB, 0)
    server = serve(img, "-f", "raw")
    run("qemu-io", "-f", "raw", "-c", "discard 0 1M", server.uri)
    with open(img, "rb") as f:
        assert f.read(16) == b"\x01" * 16


@pytest.mark.parametrize("mode", ["none", "writeback", "writethrough", "directsync", "unsafe"])
def test_cache_modes_serve_correct_data(tmp_path, serve, mode):
    img = make_raw(tmp_path / "a.raw", MiB)
    server = serve(img, "-f", "raw", f"--cache={mode}")
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "flush", "-c", "read -P 7 0 64k",
        server.uri)


def test_names_descriptions_and_list(tmp_path, serve):
    img = make_raw(tmp_path / "a.raw", MiB)
    server = serve(img, "-f", "raw", "-x", "vm-disk", "-D", "The VM's disk")
    out = json.loads(run("nbdinfo", "--list", "--json", server.uri).stdout)
    (export,) = out["exports"]
    assert export["export-name"] == "vm-disk" and export["description"] == "The VM's disk"
    assert export["export-size"] == MiB


# --- real clients ---

def test_qemu_img_convert_compare_and_nbdcopy(tmp_path, serve):
    src = make_raw(tmp_path / "src.raw", 16 * MiB, os.urandom(3 * MiB), 5 * MiB)
    dst = qcow2(tmp_path / "dst.qcow2", "16M")
    server = serve(dst, "-e", "4")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri)
    back = tmp_path / "back.raw"
    run("nbdcopy", server.uri, back)
    assert open(back, "rb").read() == open(src, "rb").read()
    run("nbdcopy", "--flush", src, server.uri)
    mapped = json.loads(run("nbdinfo", "--map", "--json", server.uri).stdout)
    data = [e for e in mapped if not e["type"] & 1]
    assert sum(e["length"] for e in data) >= 3 * MiB
    code, err = server.stop()
    assert code == 0, err
    run("qemu-img", "check", dst)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst)


def test_qemu_io_patterns_over_nbd(tmp_path, serve):
    img = make_raw(tmp_path / "a.raw", 8 * MiB)
    server = serve(img, "-f", "raw")
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 512k", "-c", "write -z 1M 4k",
              "-c", "read -P 0 1M 4k", "-c", "read -P 0xab 1052672 507904",
              "-c", "aio_write -P 1 0 4k", "-c", "aio_flush", "-c", "read -P 1 0 4k",
              server.uri).stdout
    assert "Pattern verification failed" not in out


# --- config file ---

def test_config_file_serves_many_exports(tmp_path):
    a = make_raw(tmp_path / "a.raw", MiB, b"AAAA", 0)
    b = make_raw(tmp_path / "b.raw", 2 * MiB, b"BBBB", 0)
    sock = sock_path()
    conf = tmp_path / "qnbd.toml"
    conf.write_text(f"""
[limits]
handshake_timeout = 5
max_connections = 8

[[listen]]
unix = "{sock}"

[[export]]
name = "a"
image = "{a}"
format = "raw"
description = "first"

[[export]]
name = "b"
image = "{b}"
format = "raw"
read_only = true
shared = 0
""")
    server = Server(["--config", conf], sock)
    try:
        wait_for_socket(sock, server.proc)
        listed = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}").stdout)
        assert sorted(e["export-name"] for e in listed["exports"]) == ["a", "b"]
        h = nbd.NBD()
        h.connect_uri(server.uri_for("b"))
        assert h.pread(4, 0) == b"BBBB" and h.is_read_only() and h.can_multi_conn()
        h.shutdown()
        h = nbd.NBD()
        h.connect_uri(server.uri_for("a"))
        assert h.pread(4, 0) == b"AAAA" and h.get_size() == MiB
    finally:
        code, err = server.stop()
    assert code == 0, err


def test_config_export_client_limit_refuses_go(tmp_path):
    a = make_raw(tmp_path / "a.raw", MiB)
    sock = sock_path()
    conf = tmp_path / "qnbd.toml"
    conf.write_text(f'[[listen]]\nunix = "{sock}"\n[[export]]\nname = "a"\nimage = "{a}"\nshared = 1\n')
    server = Server(["--config", conf], sock)
    try:
        wait_for_socket(sock, server.proc)
        first = nbd.NBD()
        first.connect_uri(server.uri_for("a"))
        second = nbd.NBD()
        # NBD_REP_ERR_POLICY: libnbd 1.14 says "server policy prevents NBD_OPT_GO",
        # 1.22 "server policy prevents the operation: " and the server's message.
        with pytest.raises(nbd.Error, match="server policy prevents"):
            second.connect_uri(server.uri_for("a"))
        first.shutdown()
    finally:
        code, err = server.stop()
    assert code == 0, err


@pytest.mark.parametrize("body, message", [
    ('[[export]]\nimage = "x"\nshred = 1\n', "export[0].shred: unknown key"),
    ('[[export]]\nimage = "x"\nread_only = "yes"\n', "export[0].read_only: expected bool"),
    ('[[export]]\nname = "x"\n', "export[0].image: missing"),
    ('[[export]]\nimage = "x"\ndiscard = "maybe"\n', "export[0]: Invalid discard mode 'maybe'"),
    ('[[export]]\nimage = "x"\nformat = "vmdk"\n', "export[0]: Unknown image format 'vmdk'"),
    ('[limits]\nmax_connections = 0\n[[export]]\nimage = "x"\n', "limits.max_connections"),
    ('[[listen]]\nport = 99999\n[[export]]\nimage = "x"\n', "listen[0].port"),
    ('[server]\npersistent = true\n', "no [[export]] table"),
    ('[[export]\n', "Expected ']]'"),
])
def test_config_errors_name_the_key(tmp_path, body, message):
    conf = tmp_path / "bad.toml"
    conf.write_text(body)
    r = run_serve("--config", conf)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_config_cannot_mix_with_an_image(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('[[export]]\nimage = "x"\n')
    r = run_serve("--config", conf, "-r")
    assert r.returncode == 1 and "--read-only cannot be combined with --config" in r.stderr


def test_example_config_parses():
    from qnbd.config import load_config
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(repo, "config", "qnbd.toml"))
    assert config.exports and config.listeners


def test_backing_policy_option_and_config(tmp_path):
    (tmp_path / "other").mkdir()
    base = tmp_path / "other" / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    r = run_serve("--backing-policy", "same-dir", "-k", sock_path(), top)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"qnbd serve: backing file '{base}' is not allowed by the "
                                "backing policy 'same-dir'")
    conf = tmp_path / "q.toml"
    conf.write_text(f'[[listen]]\nunix = "{sock_path()}"\n'
                    f'[[export]]\nimage = "{top}"\nbacking = "none"\n')
    r = run_serve("--config", conf)
    assert r.returncode == 1 and "backing policy 'none'" in r.stderr, r.stderr
    conf.write_text(f'[[export]]\nimage = "{top}"\nbacking = "some"\n')
    r = run_serve("--config", conf)
    assert r.returncode == 1 and "Invalid backing mode 'some' (expected any|same-dir|none)" in r.stderr
