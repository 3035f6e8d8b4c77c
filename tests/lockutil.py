"""Real qemu processes holding an image's locks, for the tests of locking (the
`qemu_holder` fixture, registered in conftest.py)."""

import json
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


def leave_bitmaps_in_use(image, timeout=10):
    """What a qemu killed while it had the image open leaves: every bitmap in use.
    qemu marks them some time after it takes its locks, so wait until qemu-img info
    (-U: shared) shows it before killing."""
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", image], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = subprocess.run(["qemu-img", "info", "-U", "--output=json", image],
                                  capture_output=True, text=True)
            bitmaps = json.loads(info.stdout or "{}").get("format-specific", {}) \
                .get("data", {}).get("bitmaps", [])
            if bitmaps and all("in-use" in b["flags"] for b in bitmaps):
                return
            time.sleep(0.02)
        raise AssertionError("qemu did not mark the bitmaps in use")
    finally:
        holder.kill()
        holder.wait()
