"""A side-by-side sweep of qemu-nbd command lines (issue 13, item 4): the same options run
by the installed qemu-nbd and by qnbd serve, comparing what a script sees: exit code,
stdout and stderr of refused command lines, `nbdinfo --json` of served exports, the
errors a client gets, --fork/--pid-file, -e and signals. The deliberate differences are
listed in README.md ("Serving images")."""

import json
import os
import signal
import socket
import subprocess
import time

import nbd
import pytest

from nbdserver import free_port, make_raw, serve_cmd, short_tmpdir
from peers import as_qnbd, both, run

MiB = 1 << 20


@pytest.mark.parametrize("args", [
    ["IMG", "IMG"],                # two images: qemu-nbd's own hint line, unprefixed
    ["--read-only=1", "IMG"],      # getopt: a flag given a value
    ["--bogus=5", "IMG"],          # getopt names the whole unknown argument
    ["-P", "1", "IMG"],            # -P/--partition: gone from qemu-nbd, unknown here too
    ["--partition=1", "IMG"],
    ["--fork=x", "IMG"],
    ["--d", "IMG"], ["--de=1", "IMG"],  # ambiguous: getopt's words, qemu's table order
    ["-p", "abc", "-f", "raw", "IMG"], ["-p", "-1", "-f", "raw", "IMG"],  # getaddrinfo's
], ids=lambda a: " ".join(a))
def test_refused_command_lines_as_qemu_nbd(tmp_path, args):
    img = make_raw(tmp_path / "a.raw", MiB)
    qemu, ours = both(*[img if a == "IMG" else a for a in args])
    assert qemu.returncode == 1, qemu.stderr
    assert (ours.returncode, ours.stdout, ours.stderr) == (1, qemu.stdout, as_qnbd(qemu.stderr))


def described(sock: str, name: str = "") -> dict:
    """nbdinfo --json of an export, without the URI (it names each server's socket)."""
    out = run("nbdinfo", "--json", f"nbd+unix:///{name}?socket={sock}").stdout
    info = json.loads(out)
    for export in info["exports"]:
        export.pop("uri")
    return info


def write_errors(sock: str, name: str = "") -> dict:
    """The errno (or "ok") a client gets for each kind of write."""
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    out = {}
    for op, call in (("write", lambda: h.pwrite(b"x" * 512, 0)),
                     ("zero", lambda: h.zero(512, 0)), ("trim", lambda: h.trim(512, 0)),
                     ("flush", h.flush)):
        try:
            call()
            out[op] = "ok"
        except nbd.Error as e:
            out[op] = e.errno
    h.shutdown()
    return out


@pytest.mark.parametrize("args", [
    [], ["-r"], ["-r", "-s"], ["-s"], ["-x", "disk", "-D", "my disk"], ["-A"],
    ["--discard=unmap"], ["--discard=unmap", "--detect-zeroes=unmap"], ["-e", "3"],
    ["-e", "0"], ["--cache=writethrough"], ["-n"], ["-o", "512"],
], ids=lambda a: " ".join(a) or "defaults")
def test_served_exports_as_qemu_nbd(servers, tmp_path, args):
    seen = {}
    for program in ("qemu-nbd", "qnbd"):
        img = tmp_path / f"{program}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        server = servers(program, "-f", "qcow2", *args, img)
        name = args[args.index("-x") + 1] if "-x" in args else ""
        seen[program] = (described(server.sock, name), write_errors(server.sock, name))
    assert seen["qnbd"] == seen["qemu-nbd"]


def test_socket_wins_over_bind_and_port(servers, tmp_path):
    """With -k, qemu-nbd listens on the socket alone: -b and -p are ignored."""
    img = make_raw(tmp_path / "a.raw", MiB)
    for program in ("qemu-nbd", "qnbd"):
        port = free_port()
        server = servers(program, "-f", "raw", "-b", "127.0.0.1", "-p", port, img)
        assert described(server.sock)["exports"][0]["export-size"] == MiB
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_fork_and_pid_file_as_qemu_nbd(tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    seen = []
    for program in ("qemu-nbd", "qnbd"):
        d = short_tmpdir()
        sock, pid_file = os.path.join(d, "s"), os.path.join(d, "pid")
        cmd = ["qemu-nbd"] if program == "qemu-nbd" else serve_cmd()
        r = run(*cmd, "--fork", "--pid-file", pid_file, "-k", sock, "-f", "raw", "-t", img,
                check=False, timeout=30)
        pid = int(open(pid_file).read())
        try:
            # Listening when the parent returned; the pid file names the server.
            size = described(sock)["exports"][0]["export-size"]
            seen.append((r.returncode, r.stdout, r.stderr, size, os.path.exists(f"/proc/{pid}")))
        finally:
            os.kill(pid, 15)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    assert seen[0] == seen[1] == (0, "", "", MiB, True)


def test_shared_limit_holds_the_next_client_as_qemu_nbd(servers, tmp_path):
    """-e 2: a third client is held unanswered until one of the two leaves."""
    img = make_raw(tmp_path / "a.raw", MiB)
    for program in ("qemu-nbd", "qnbd"):
        server = servers(program, "-f", "raw", "-e", "2", img)
        uri = f"nbd+unix:///?socket={server.sock}"
        first, second = nbd.NBD(), nbd.NBD()
        first.connect_uri(uri)
        second.connect_uri(uri)
        third = subprocess.Popen(["nbdinfo", "--size", uri], stdout=subprocess.PIPE,
                                 text=True)
        time.sleep(1)
        assert third.poll() is None, program
        first.shutdown()
        out, _ = third.communicate(timeout=10)
        assert out.strip() == str(MiB), program
        second.shutdown()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_signals_stop_cleanly_as_qemu_nbd(tmp_path, sig):
    """Each signal qemu-nbd stops on: exit 0, socket removed, bitmaps stored (not left
    in use), image clean."""
    seen = []
    for program in ("qemu-nbd", "qnbd"):
        img = tmp_path / f"{program}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        run("qemu-img", "bitmap", "--add", img, "b0")
        sock = os.path.join(short_tmpdir(), "s")
        cmd = ["qemu-nbd"] if program == "qemu-nbd" else serve_cmd()
        proc = subprocess.Popen([*cmd, "-t", "-k", sock, "-f", "qcow2", img])
        deadline = time.monotonic() + 15
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        # qemu-nbd binds its socket before it opens the image and enters its main loop,
        # and loses a signal that comes in between (it hangs): give it time to get there.
        time.sleep(1)
        proc.send_signal(sig)
        code = proc.wait(timeout=15)
        bitmaps = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
        flags = bitmaps["format-specific"]["data"]["bitmaps"][0]["flags"]
        seen.append((code, os.path.exists(sock), flags,
                     run("qemu-img", "check", img, check=False).returncode))
    assert seen[0] == seen[1] == (0, False, ["auto"], 0)


def test_abbreviations_mean_qemu_nbd_options(servers, tmp_path):
    """A prefix of one qemu-nbd option means it even where qnbd's own options share it
    (--i: --image-opts, not --idle-timeout; --lo: --load-snapshot, not --log-level)."""
    img = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", img)
    run("qemu-img", "snapshot", "-c", "snap1", img)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 8 0 64k", img)
    seen = {}
    for program in ("qemu-nbd", "qnbd"):
        opts = servers(program, "-r", "--i", f"driver=qcow2,file.filename={img}")
        snap = servers(program, "--lo", "snap1", "-f", "qcow2", img)
        seen[program] = [(described(s.sock), run("nbdinfo", "--map", "--totals",
                                                 f"nbd+unix:///?socket={s.sock}").stdout)
                         for s in (opts, snap)]
    assert seen["qnbd"] == seen["qemu-nbd"]
    assert seen["qnbd"][1][0]["exports"][0]["is_read_only"]


def _qemu_nbd_knows(option: str) -> bool:
    return option in run("qemu-nbd", "--help").stdout


@pytest.mark.parametrize("value", ["-1", "x", "99999999999"])
def test_handshake_limit_values_as_qemu_nbd(tmp_path, value):
    """qemu-nbd 10's --handshake-limit (qnbd's --handshake-timeout in whole seconds):
    bad values refused in qemu-nbd's words where it has the option (qemu 7.2 has not)."""
    img = make_raw(tmp_path / "a.raw", MiB)
    qemu, ours = both(f"--handshake-limit={value}", "-f", "raw", img)
    assert ours.returncode == 1
    assert ours.stderr == f"qnbd serve: Invalid handshake limit '{value}'\n"
    if _qemu_nbd_knows("--handshake-limit"):
        assert (qemu.returncode, as_qnbd(qemu.stderr)) == (1, ours.stderr)


def test_handshake_limit_drops_a_silent_client(servers, tmp_path):
    img = make_raw(tmp_path / "a.raw", MiB)
    programs = ["qnbd"] + (["qemu-nbd"] if _qemu_nbd_knows("--handshake-limit") else [])
    for program in programs:
        server = servers(program, "--handshake-limit=1", "-f", "raw", img)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(server.sock)
            s.settimeout(10)
            start = time.monotonic()
            while s.recv(4096):   # the greeting, then EOF once the limit passes
                pass
            assert 0.5 < time.monotonic() - start < 8, program
