"""Power cuts at random points of random workloads (DESIGN.md rules 2-6, 10).

After every cut: an image without lazy refcounts has no corruption (qemu-img check; leaks
are allowed), a lazy-refcounts image is repaired by opening it read-write and is then
clean; and every byte that no operation touched since the last completed flush reads back
as it was at that flush.
"""

import json
import os
import random
import subprocess

import pytest

import qnbd.fileio
from qnbd.formats import open_image

from crashsim import SECTOR, RecordingFile
from images import SHAPES, qemu_img
from test_qcow2_engine import Model, apply_ops, converted, random_ops

CRASH_SHAPES = [s for s in SHAPES if s.name in
                ("v3", "v2", "c4k-r1", "c512", "lazy", "qcow2-backing", "zlib")]


class Cut:
    def __init__(self, image: bytes, flushed: bytes, touched: bytes, during: str):
        self.image, self.flushed, self.touched = image, flushed, touched
        self.during = during  # the operation under way, for failure messages


def run_with_cuts(shape, tmp_path, seed, ops_count, cuts_wanted, monkeypatch, chance=0.1):
    rng = random.Random(seed)
    image = shape.build(tmp_path, seed=seed)
    start = converted(image, "qcow2", tmp_path)
    size = len(start)
    state = {"flushed": bytes(start), "touched": bytearray(size // SECTOR + 1), "op": None}
    cuts: list[Cut] = []
    files = []

    def maybe_cut(f: RecordingFile):
        if f.path == image and len(cuts) < cuts_wanted and rng.random() < chance:
            during = f"{state['op']} with {len(f.unsynced)} unsynced writes"
            cuts.append(Cut(f.crash_image(rng), state["flushed"], bytes(state["touched"]),
                            during))

    real_open = qnbd.fileio.open_file

    def recording_open(path, writable):
        f = RecordingFile(real_open(path, writable), maybe_cut)
        files.append(f)
        return f

    monkeypatch.setattr(qnbd.fileio, "open_file", recording_open)
    dev = open_image(image, "qcow2", read_only=False)
    model = Model(start, dev.cluster_size, discard_keeps=shape.v2 and shape.backing is not None)
    try:
        for i, op in enumerate(random_ops(rng, size, ops_count)):
            kind, off, n, pattern = op
            state["op"] = f"op {i} {op}"
            if kind != "flush":
                first, last = off // SECTOR, (off + n - 1) // SECTOR
                state["touched"][first:last + 1] = b"\1" * (last - first + 1)
            apply_ops(dev, model, [op])
            if kind == "flush" or (kind == "write" and pattern % 17 == 0):  # FUA
                state["flushed"] = bytes(model.data)
                state["touched"] = bytearray(size // SECTOR + 1)
    finally:
        dev.close()
        monkeypatch.setattr(qnbd.fileio, "open_file", real_open)
    return image, cuts


def check_cut(shape, image, cut: Cut, index: int, tmp_path):
    path = os.path.join(os.path.dirname(image), f"cut{index}.qcow2")
    with open(path, "wb") as f:
        f.write(cut.image)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    dirty = info.get("dirty-flag", False)
    if dirty:
        # Rule 6: a dirty image opened read-write is checked and repaired first.
        open_image(path, "qcow2", read_only=False).close()
    r = subprocess.run(["qemu-img", "check", "--output=json", path],
                       capture_output=True, text=True)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    assert r.returncode in (0, 3), f"cut {index}: {r.stdout} {r.stderr}"
    assert report.get("corruptions", 0) == 0, report
    if dirty:
        assert r.returncode == 0, f"cut {index}: repaired image still has leaks: {r.stdout}"
    content = converted(path, "qcow2", tmp_path)
    assert len(content) == len(cut.flushed)
    for sector, touched in enumerate(cut.touched):
        if not touched:
            lo = sector * SECTOR
            if content[lo:lo + SECTOR] != cut.flushed[lo:lo + SECTOR]:
                pytest.fail(f"cut {index} during {cut.during}: flushed data lost at "
                            f"offset {lo}")
    os.unlink(path)


@pytest.mark.parametrize("shape", CRASH_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_cuts(shape, seed, tmp_path, monkeypatch):
    """7 shapes x 3 seeds x 5+ cuts: over a hundred cuts in the default run."""
    image, cuts = run_with_cuts(shape, tmp_path, seed, 80, 6, monkeypatch)
    assert len(cuts) >= 5, f"only {len(cuts)} cuts: the workload made too few writes"
    for i, cut in enumerate(cuts):
        check_cut(shape, image, cut, i, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("shape", CRASH_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", range(10, 20))
def test_power_cuts_long(shape, seed, tmp_path, monkeypatch):
    """7 shapes x 10 seeds x 15 cuts: over a thousand cuts in the slow tier."""
    image, cuts = run_with_cuts(shape, tmp_path, seed, 400, 15, monkeypatch, chance=0.05)
    assert len(cuts) == 15, f"only {len(cuts)} cuts: the workload made too few writes"
    for i, cut in enumerate(cuts):
        check_cut(shape, image, cut, i, tmp_path)
