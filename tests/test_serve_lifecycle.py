"""Issue 13 items 1, 5 and 8: what a script sees of the server's life is what qemu-nbd
shows. The same command lines run against qemu-nbd and `qnbd serve`, and the outcomes
(exit codes, stderr after the program's prefix, the pid file) are compared; qnbd's own
connection log is behind --log-level/--log-file/--log-format."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from nbdserver import REPO, make_raw, serve_cmd, short_tmpdir

MiB = 1 << 20
PROGRAMS = {"qemu-nbd": ["qemu-nbd"], "qnbd": serve_cmd()}


def start(program: str, *args) -> subprocess.Popen:
    return subprocess.Popen(PROGRAMS[program] + [str(a) for a in args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_listening(sock: str, proc: subprocess.Popen, timeout: float = 10) -> None:
    """Until the socket exists and listens: probed without connecting, since a client
    that connects and leaves makes qemu-nbd print a line of its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(sock) and _listening(sock):
            return
        time.sleep(0.005)
    raise AssertionError(f"{sock} never accepted")


def _listening(path: str) -> bool:
    """Whether a unix socket is in LISTEN state (/proc/net/unix: flags 00010000)."""
    with open("/proc/net/unix") as f:
        return any(line.split()[-1] == path and line.split()[3] == "00010000"
                   for line in f if len(line.split()) >= 8)


def finish(proc: subprocess.Popen, sig=signal.SIGTERM) -> tuple[int, str]:
    """Signal, wait; (exit code, stderr with the program's own prefix removed)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, strip_prefix(err)


def strip_prefix(err: str) -> str:
    return "\n".join(line.split(": ", 1)[1] if line.startswith(("qemu-nbd: ", "qnbd serve: "))
                     else line for line in err.splitlines())


@pytest.fixture
def work(tmp_path):
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("extra", [[], ["-v"]])
def test_stderr_has_no_connection_lines_as_with_qemu_nbd(tmp_path, work, extra):
    image = make_raw(tmp_path / "a.raw", MiB)
    seen = {}
    for program in PROGRAMS:
        sock = os.path.join(work, f"{program}.sock")
        proc = start(program, "-f", "raw", "-k", sock, "-t", *extra, image)
        wait_listening(sock, proc)
        # qemu-io ends with NBD_CMD_DISC (nbdinfo's abrupt close makes qemu-nbd complain).
        subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", "-c", "write 0 512",
                        f"nbd+unix:///?socket={sock}"], check=True, capture_output=True)
        seen[program] = finish(proc)
    assert seen["qnbd"] == seen["qemu-nbd"] == (0, "")


def test_connection_log_behind_log_options(tmp_path, work):
    image = make_raw(tmp_path / "a.raw", MiB)
    sock = os.path.join(work, "s")
    proc = start("qnbd", "-f", "raw", "-k", sock, "-t", "--log-level", "info", image)
    wait_listening(sock, proc)
    subprocess.run(["nbdinfo", f"nbd+unix:///?socket={sock}"], check=True, capture_output=True)
    code, err = finish(proc)
    assert code == 0
    assert "serving export ''" in err and "shutting down (SIGTERM)" in err
    log_file = tmp_path / "qnbd.log"
    proc = start("qnbd", "-f", "raw", "-k", sock, "-t", "--log-level", "info",
                 "--log-format", "json", "--log-file", log_file, image)
    wait_listening(sock, proc)
    subprocess.run(["nbdinfo", f"nbd+unix:///?socket={sock}"], check=True, capture_output=True)
    assert finish(proc) == (0, "")
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["message"] == "unix client: serving export ''" and e["level"] == "info"
               for e in entries)


def _second_instance(program: str, image: str, work: str, pid_file: str):
    """A server with --pid-file, then a second one with the same file; both outcomes, and
    the pid file after the first has stopped."""
    first = start(program, "-f", "raw", "-k", os.path.join(work, f"{program}1"), "-t",
                  "--pid-file", pid_file, image)
    wait_listening(os.path.join(work, f"{program}1"), first)
    # qemu-nbd takes the pid file after its socket listens: wait for it.
    deadline = time.monotonic() + 10
    while not (os.path.exists(pid_file) and open(pid_file).read() == f"{first.pid}\n"):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    second = subprocess.run(PROGRAMS[program] + ["-f", "raw", "-k",
                                                 os.path.join(work, f"{program}2"), "-t",
                                                 "--pid-file", pid_file, image],
                            cwd=REPO, capture_output=True, text=True, timeout=20)
    written = open(pid_file).read()
    code, _ = finish(first)
    kept = open(pid_file).read() if os.path.exists(pid_file) else None
    return (second.returncode, strip_prefix(second.stderr), written == f"{first.pid}\n",
            code, kept == written)


def test_pid_file_locked_and_kept_as_qemu_nbd(tmp_path, work):
    image = make_raw(tmp_path / "a.raw", MiB)
    seen = {program: _second_instance(program, image, work, str(tmp_path / f"{program}.pid"))
            for program in PROGRAMS}
    assert seen["qnbd"] == seen["qemu-nbd"]
    assert seen["qnbd"][0] == 1 and "Cannot lock pid file" in seen["qnbd"][1]


def test_pid_file_that_cannot_be_created(tmp_path, work):
    image = make_raw(tmp_path / "a.raw", MiB)
    seen = {}
    for program in PROGRAMS:
        r = subprocess.run(PROGRAMS[program] + ["-f", "raw", "-k", os.path.join(work, program),
                                                "--pid-file", "/nonexistent/dir/pid", image],
                           cwd=REPO, capture_output=True, text=True, timeout=20)
        seen[program] = (r.returncode, strip_prefix(r.stderr))
    assert seen["qnbd"] == seen["qemu-nbd"]


def _bitmaps_in_use(image: str) -> list:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", image],
                                     check=True, capture_output=True, text=True).stdout)
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])
            if "in-use" in b["flags"]]


def test_sigterm_as_soon_as_the_socket_exists(tmp_path, work):
    """The signal handler exists before the socket accepts: a SIGTERM the moment the
    socket appears ends the server cleanly (exit 0, bitmaps no longer in use). (qnbd only:
    qemu-nbd 7.2 itself ignores a SIGTERM this early and serves on.)"""
    program = "qnbd"
    image = str(tmp_path / "a.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", image, "b"], check=True)
    for attempt in range(5):
        sock = os.path.join(work, f"s{attempt}")
        proc = start(program, "-f", "qcow2", "-k", sock, image)
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.001)
        code, err = finish(proc)
        assert (code, err) == (0, ""), attempt
        assert _bitmaps_in_use(image) == []
        subprocess.run(["qemu-img", "check", "-q", image], check=True)
