"""What `qnbd check` imports (issue 17). Checking a sparse image takes a millisecond, so
start-up is most of the command, and qemu-img's whole check takes ~10 ms: the drivers and
libraries the check does not use must stay unloaded. Asserted on module names in a fresh
interpreter, not on timings, which are noise on a shared machine."""

import subprocess
import sys

import pytest

from peers import qemu_img, qemu_io

# Never needed to check an image: other formats' drivers (parallels pulls in hashlib and
# OpenSSL), the NBD client and server, and libraries that cost milliseconds to import.
NOT_FOR_CHECK = (
    "hashlib", "_hashlib", "uuid", "subprocess", "typing", "dataclasses", "inspect",
    "asyncio", "uvloop", "logging", "ctypes", "fractions", "decimal", "zstandard", "json",
    "qnbd.block.parallels", "qnbd.block.parallels_ext", "qnbd.block.nbd_client",
    "qnbd.block.null", "qnbd.nbd", "qnbd.export", "qnbd.config", "qnbd.control")
# The other engine, and the image engine itself (a check reads the metadata only).
OTHER_ENGINE = {"qcow2": ("qnbd.qed", "qnbd.qcow2.image", "qnbd.qcow2.compression"),
                "qed": ("qnbd.qcow2", "qnbd.qed.image")}

_LOADED = "import sys; from qnbd.cli import main; code = main(sys.argv[1:]); " \
          "print(*sorted(sys.modules), file=sys.stderr); sys.exit(code)"


def _modules_after(*argv) -> tuple[subprocess.CompletedProcess, set]:
    r = subprocess.run([sys.executable, "-c", _LOADED, *argv], capture_output=True,
                       text=True, timeout=60)
    lines = r.stderr.splitlines()
    return r, set(lines[-1].split()) if lines else set()


def _bare_interpreter() -> set:
    """What this interpreter loads for nothing (site, sitecustomize): not qnbd's doing."""
    r = subprocess.run([sys.executable, "-c", "import sys; print(*sys.modules)"],
                       capture_output=True, text=True, check=True, timeout=60)
    return set(r.stdout.split())


def _unwanted(loaded: set, fmt: str) -> list:
    bare = _bare_interpreter()
    banned = NOT_FOR_CHECK + OTHER_ENGINE[fmt]
    return sorted(m for m in loaded - bare
                  if any(m == b or m.startswith(b + ".") for b in banned))


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
@pytest.mark.parametrize("written", [False, True], ids=["sparse", "written"])
def test_check_loads_only_what_it_uses(tmp_path, fmt, written):
    image = tmp_path / f"x.{fmt}"
    qemu_img("create", "-f", fmt, image, "1T" if fmt == "qcow2" else "64G")
    if written:
        qemu_io(image, fmt, "write -P 0x5a 0 1M", "write -P 0xa5 40G 64k")
    r, loaded = _modules_after("check", str(image))
    assert r.returncode == 0, r.stderr
    assert "No errors were found on the image." in r.stdout
    assert f"qnbd.{fmt}.check" in loaded  # the check did run through the driver
    assert _unwanted(loaded, fmt) == []


def test_json_output_still_works_without_a_json_import_up_front(tmp_path):
    """json is imported by the JSON output only; that output must still come out."""
    image = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", image, "1G")
    r, loaded = _modules_after("check", "--output=json", str(image))
    assert r.returncode == 0, r.stderr
    assert '"check-errors": 0' in r.stdout and "json" in loaded
