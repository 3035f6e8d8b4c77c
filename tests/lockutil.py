"""Real qemu processes holding an image's locks, for the tests of locking (the
`qemu_holder` fixture, registered in conftest.py)."""

import os
import subprocess
import time

import pytest


def wait_for_locks(path, timeout=10):
    """Until some process holds OFD locks on the file (qemu takes them at open)."""
    ino = os.stat(path).st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any(f":{ino} " in line and "OFDLCK" in line for line in f):
                return
        time.sleep(0.02)
    raise AssertionError("qemu took no lock")


@pytest.fixture
def qemu_holder():
    """Start a qemu-nbd (or qemu-io) holding an image until the test ends."""
    procs = []

    def start(path, fmt="qcow2", read_only=False, tool="qemu-nbd"):
        if tool == "qemu-nbd":
            cmd = ["qemu-nbd", "-f", fmt, "-k", path + ".sock"] + (["-r"] if read_only else [])
        else:  # qemu-io stays open while its stdin does
            cmd = ["qemu-io", "-f", fmt] + (["-r"] if read_only else [])
        p = subprocess.Popen(cmd + [path], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        procs.append(p)
        wait_for_locks(path)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()
