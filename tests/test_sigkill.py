"""SIGKILL of a real `qnbd serve` under write load, many rounds (issue: crash safety).

A killed process loses what it held in memory (metadata caches, pending refcount updates)
but not what it handed to the kernel. After each kill: no corruption; a lazy-refcounts
image is repaired when served again; every write acknowledged before the last completed
flush reads back; a bitmap left in-use is refused.
"""

import json
import random
import subprocess

import pytest

from qnbd.formats import open_image
from qnbd.errors import ImageError

from peers import qemu_img
from images import MiB
from nbdload import kill_during_writes, lost_flushed_sector, new_state
from workload import converted

SIZE = 32 * MiB


@pytest.mark.parametrize("options", ["", "lazy_refcounts=on"], ids=["eager", "lazy"])
def test_sigkill_under_write_load(serve, tmp_path, options):  # noqa: F811
    image = str(tmp_path / "k.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), image,
             str(SIZE))
    qemu_img("bitmap", "--add", image, "b")
    rng = random.Random(options)
    expected = bytes(SIZE)
    for _round in range(4):
        state = new_state(expected)
        kill_during_writes(serve(image, "-f", "qcow2"), rng, state, SIZE)
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
        content = converted(image, "qcow2", tmp_path)
        lost = lost_flushed_sector(content, state)
        if lost is not None:
            pytest.fail(f"round {_round}: acknowledged and flushed data lost at offset {lost}: "
                        f"{content[lost:lost + 8].hex()} instead of "
                        f"{state['flushed'][lost:lost + 8].hex()}, model "
                        f"{state['model'][lost:lost + 8].hex()}")
        dev = open_image(image, read_only=True, force_share=True)
        try:
            with pytest.raises(ImageError, match="inconsistent"):
                dev.bitmaps.get("b")
        finally:
            dev.close()
        expected = content
