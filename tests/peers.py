"""The real peers the tests compare against (qemu-img, qemu-io) and running commands:
defined once here, used by every test module (docs/DESIGN.md: tests against peers)."""

import subprocess

from nbdserver import serve_cmd


def run(*cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run a command, text output captured; fails the test on a non-zero exit unless
    check=False."""
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True,
                          timeout=timeout, **kw)


def qemu_img(*args) -> subprocess.CompletedProcess:
    return run("qemu-img", *args)


def qemu_io(image, fmt, *commands) -> subprocess.CompletedProcess:
    args = []
    for c in commands:
        args += ["-c", c]
    return run("qemu-io", "-f", fmt, *args, image)


def check_clean(image) -> None:
    """qemu-img check finds nothing wrong (no corruption, no leak)."""
    r = run("qemu-img", "check", image, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout, r.stdout


# --- qemu-nbd and `qnbd serve` side by side -------------------------------------------------

def both(*args) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The same command line run by qemu-nbd and by qnbd serve (exit codes not checked)."""
    return (run("qemu-nbd", *args, check=False, timeout=30),
            run(*serve_cmd(*args), check=False, timeout=30))


def as_qnbd(qemu_text: str) -> str:
    """qemu-nbd's output with its program name as qnbd's."""
    return qemu_text.replace("qemu-nbd", "qnbd serve")
