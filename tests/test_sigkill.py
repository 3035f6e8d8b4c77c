"""SIGKILL of a real `qnbd serve` under write load, many rounds (issue: crash safety).

A killed process loses what it held in memory (metadata caches, pending refcount updates)
but not what it handed to the kernel. After each kill: no corruption; a lazy-refcounts
image is repaired when served again; every write acknowledged before the last completed
flush reads back; a bitmap left in-use is refused.
"""

import json
import random
import signal
import subprocess
import threading
import time

import pytest

from qnbd.formats import open_image
from qnbd.errors import ImageError

from peers import qemu_img
from images import MiB
from nbdload import write_load

SIZE = 32 * MiB
SECTOR = 512


def converted(image, tmp_path):
    out = str(tmp_path / "out.raw")
    qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", image, out)
    with open(out, "rb") as f:
        return f.read()


@pytest.mark.parametrize("options", ["", "lazy_refcounts=on"], ids=["eager", "lazy"])
def test_sigkill_under_write_load(serve, tmp_path, options):  # noqa: F811
    image = str(tmp_path / "k.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), image,
             str(SIZE))
    qemu_img("bitmap", "--add", image, "b")
    rng = random.Random(options)
    expected = bytes(SIZE)
    for _round in range(4):
        state = {"model": bytearray(expected), "flushed": expected,
                 "touched": bytearray(SIZE // SECTOR)}
        server = serve(image, "-f", "qcow2")
        stop = threading.Event()
        t = threading.Thread(target=write_load, args=(server.uri, rng, state, stop, SIZE))
        t.start()
        time.sleep(rng.uniform(0.2, 0.8))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        stop.set()
        t.join()
        info = json.loads(qemu_img("info", "-U", "--output=json", image).stdout)
        bitmaps = info["format-specific"]["data"]["bitmaps"]
        assert "in-use" in bitmaps[0]["flags"]
        if options:
            assert info["dirty-flag"]
            # Serving again repairs the lazy refcounts, then a clean stop leaves it clean.
            again = serve(image, "-f", "qcow2")
            code, err = again.stop()
            assert code == 0, err
            assert "repaired" in err
        r = subprocess.run(["qemu-img", "check", "--output=json", image],
                           capture_output=True, text=True)
        report = json.loads(r.stdout)
        assert report.get("corruptions", 0) == 0, r.stdout
        assert r.returncode in (0, 3), r.stdout + r.stderr
        content = converted(image, tmp_path)
        for sector, touched in enumerate(state["touched"]):
            lo = sector * SECTOR
            if not touched and content[lo:lo + SECTOR] != state["flushed"][lo:lo + SECTOR]:
                pytest.fail(f"round {_round}: acknowledged and flushed data lost at offset {lo}: "
                            f"{content[lo:lo + 8].hex()} instead of "
                            f"{state['flushed'][lo:lo + 8].hex()}, model "
                            f"{state['model'][lo:lo + 8].hex()}")
        dev = open_image(image, read_only=True, force_share=True)
        try:
            with pytest.raises(ImageError, match="inconsistent"):
                dev.bitmaps.get("b")
        finally:
            dev.close()
        expected = content
