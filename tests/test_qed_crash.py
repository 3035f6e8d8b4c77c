"""Power cuts at random points of random workloads on QED images (docs/DESIGN.md rule 12).

After every cut: an image without NEED_CHECK is consistent (qemu-img check finds
nothing, not even a leak); an image with NEED_CHECK is repaired by opening it read-write
(no corruption left, NEED_CHECK cleared); and every sector no operation touched since the
last completed flush reads back as it was at that flush. Written against
crashsim.RecordingFile, in its own file so that the enumerating simulator can take it
over.
"""

import json
import os
import random
import subprocess

import pytest

import qnbd.fileio
from qnbd.formats import open_image
from qnbd.qed.header import F_NEED_CHECK

from crashsim import SECTOR, RecordingFile
from qedimages import FEATURES_AT, SHAPES
from test_qcow2_engine import Model, apply_ops, converted, random_ops

CRASH_SHAPES = [s for s in SHAPES if s.name in ("qed", "qed-c4k", "qed-raw")]


def run_with_cuts(shape, tmp_path, seed, ops_count, cuts_wanted, monkeypatch, chance=0.1):
    rng = random.Random(seed)
    image = shape.build(tmp_path, seed=seed)
    start = converted(image, "qed", tmp_path)
    state = {"flushed": bytes(start), "touched": bytearray(len(start) // SECTOR + 1),
             "op": None}
    cuts = []

    def maybe_cut(f: RecordingFile):
        if f.path == image and len(cuts) < cuts_wanted and rng.random() < chance:
            cuts.append((f.crash_image(rng), state["flushed"], bytes(state["touched"]),
                         f"{state['op']} with {len(f.unsynced)} unsynced writes"))

    real_open = qnbd.fileio.open_file
    monkeypatch.setattr(qnbd.fileio, "open_file",
                        lambda path, writable: RecordingFile(real_open(path, writable),
                                                             maybe_cut))
    dev = open_image(image, "qed", read_only=False)
    model = Model(start, dev.cluster_size, discard_keeps=False)
    try:
        for i, op in enumerate(random_ops(rng, len(start), ops_count)):
            kind, off, n, pattern = op
            state["op"] = f"op {i} {op}"
            if kind != "flush":
                first, last = off // SECTOR, (off + n - 1) // SECTOR
                state["touched"][first:last + 1] = b"\1" * (last - first + 1)
            apply_ops(dev, model, [op])
            if kind == "flush" or (kind == "write" and pattern % 17 == 0):  # FUA
                state["flushed"] = bytes(model.data)
                state["touched"] = bytearray(len(start) // SECTOR + 1)
    finally:
        dev.close()
        monkeypatch.setattr(qnbd.fileio, "open_file", real_open)
    return image, cuts


def qemu_check(path):
    r = subprocess.run(["qemu-img", "check", "-f", "qed", "--output=json", path],
                       capture_output=True, text=True)
    return r.returncode, json.loads(r.stdout) if r.stdout.startswith("{") else {}, r


def check_cut(image, cut, index, tmp_path):
    content_bytes, flushed, touched, during = cut
    path = os.path.join(os.path.dirname(image), f"cut{index}.qed")
    with open(path, "wb") as f:
        f.write(content_bytes)
    what = f"cut {index} during {during}"
    if not content_bytes[FEATURES_AT] & F_NEED_CHECK:
        rc, _, r = qemu_check(path)
        assert rc == 0, f"{what}: inconsistent without NEED_CHECK: {r.stdout} {r.stderr}"
    else:
        open_image(path, "qed", read_only=False).close()  # checks and repairs first
        with open(path, "rb") as f:
            assert not f.read(FEATURES_AT + 1)[FEATURES_AT] & F_NEED_CHECK, what
        rc, report, r = qemu_check(path)
        assert rc in (0, 3) and report.get("corruptions", 0) == 0, \
            f"{what}: not repaired: {r.stdout} {r.stderr}"
    content = converted(path, "qed", tmp_path)
    assert len(content) == len(flushed)
    for sector, t in enumerate(touched):
        lo = sector * SECTOR
        if not t and content[lo:lo + SECTOR] != flushed[lo:lo + SECTOR]:
            pytest.fail(f"{what}: flushed data lost at offset {lo}")
    os.unlink(path)


@pytest.mark.parametrize("shape", CRASH_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_cuts(shape, seed, tmp_path, monkeypatch):
    image, cuts = run_with_cuts(shape, tmp_path, seed, 80, 6, monkeypatch)
    assert len(cuts) >= 5, f"only {len(cuts)} cuts: the workload made too few writes"
    for i, cut in enumerate(cuts):
        check_cut(image, cut, i, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("shape", CRASH_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", range(10, 20))
def test_power_cuts_long(shape, seed, tmp_path, monkeypatch):
    image, cuts = run_with_cuts(shape, tmp_path, seed, 400, 15, monkeypatch, chance=0.05)
    assert len(cuts) == 15
    for i, cut in enumerate(cuts):
        check_cut(image, cut, i, tmp_path)


def test_copy_on_write_data_durable_before_its_l2_entry(tmp_path, monkeypatch):
    """Barrier.BEFORE_L2: a partial write to an unallocated cluster over a backing file
    copies the backing data around it; every crash state of the flush that publishes it
    still reads the backing data in the untouched sectors (flushed content)."""
    base = str(tmp_path / "b.raw")
    with open(base, "wb") as f:
        f.write(b"\x11" * (1 << 20))
    image = str(tmp_path / "t.qed")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", "-b", "b.raw", "-F", "raw",
                    image, "2M"], check=True)
    states = []
    rng = random.Random(5)

    def cut(f: RecordingFile):
        if f.path == image and f.unsynced:
            states.extend(f.crash_image(rng) for _ in range(16))

    real_open = qnbd.fileio.open_file
    monkeypatch.setattr(qnbd.fileio, "open_file",
                        lambda path, writable: RecordingFile(real_open(path, writable), cut))
    dev = open_image(image, "qed", read_only=False)
    try:
        dev.write(0, b"a" * SECTOR, fua=True)  # the L2 table exists and is durable
        states.clear()
        dev.write(65536 + SECTOR, b"b" * SECTOR)  # cluster 1: copy-on-write
        dev.flush()
    finally:
        dev.close()
        monkeypatch.setattr(qnbd.fileio, "open_file", real_open)
    assert len(states) >= 32
    for i, state in enumerate(states):
        path = str(tmp_path / f"s{i}.qed")
        with open(path, "wb") as f:
            f.write(state)
        dev = open_image(path, "qed", read_only=False)
        try:
            cluster = bytes(dev.read(65536, 65536))
        finally:
            dev.close()
        assert cluster[:SECTOR] == b"\x11" * SECTOR, f"state {i}: backing data lost"
        assert cluster[2 * SECTOR:] == b"\x11" * (65536 - 2 * SECTOR), f"state {i}"
        os.unlink(path)
