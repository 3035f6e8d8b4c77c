"""The installed qemu's version, for the few outputs whose layout changed between qemu
releases: qnbd's tools are drop-ins for the installed qemu-img, so they print what it
prints. Without a usable qemu-img, qnbd answers as the newest qemu it knows."""

import functools
import re
import subprocess

NEWEST = (10, 0)


@functools.cache
def qemu_version() -> tuple[int, int]:
    """(major, minor) from `qemu-img --version`, once a process."""
    try:
        out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return NEWEST
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else NEWEST


def at_least(major: int, minor: int = 0) -> bool:
    return qemu_version() >= (major, minor)
