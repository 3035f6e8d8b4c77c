"""Power cuts on QED images, enumerated (docs/DESIGN.md rule 12, "Proving crash safety").

The enumeration of tests/crashrun.py over QED shapes: for every crash state of every
interval between two fsyncs, an image without NEED_CHECK is consistent (qemu-img check
finds nothing, not even a leak); an image with NEED_CHECK is repaired by our read-write
open (no corruption left, NEED_CHECK cleared); every sector not written since the last
completed flush reads as it was then. And each QED barrier is needed: with it removed,
some crash state fails (NEED_CHECK: in test_crash_mutation.py with the other barriers).
"""

import random

import pytest

import qnbd.fileio
from qnbd.block.storage import Barrier, Storage

from crashrun import QED_SHAPES as SHAPES
from crashrun import crash_ops, enumerate_crashes, record_driven, record_workload


def run_enumeration(shape, tmp_path, seed, count, monkeypatch) -> int:
    ops = crash_ops(random.Random(seed), shape.size, count)
    image, intervals = record_workload(shape, tmp_path, ops, monkeypatch)
    checked, failures = enumerate_crashes(image, intervals, seed, tmp_path)
    assert not failures, f"{len(failures)} of {checked} crash states fail:\n" + \
        "\n".join(failures[:5])
    return checked


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_enumerated_power_cuts(shape, tmp_path, monkeypatch):
    checked = run_enumeration(shape, tmp_path, 1, 8, monkeypatch)
    assert checked >= 20, f"only {checked} crash states: the workload wrote too little"


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", range(10, 14))
def test_enumerated_power_cuts_long(shape, seed, tmp_path, monkeypatch):
    """3 shapes x 4 seeds, 40 operations each: 140-210 crash states a run (QED has fewer
    barriers than qcow2, so fewer intervals)."""
    checked = run_enumeration(shape, tmp_path, seed, 40, monkeypatch)
    print(f"\n{shape.name} seed {seed}: {checked} crash states")
    assert checked >= 120, f"only {checked} crash states"


def cow_into_a_table_on_disk(dev, do):
    """Partial writes into clusters where backing data shows through, mapped by an L2
    table already on disk, then a flush: the copy-on-write data must be durable before
    the table points to it. (Without the barrier the flush's interval is [data...,
    table]: the states that show the loss keep the table and a later cluster but not an
    earlier one, which extends the file over a hole. Random subsets find them; twelve
    clusters make that near certain.)"""
    cs = dev.cluster_size
    do(("write", 0, 512, 3))
    do(("flush", 0, 0, 0))  # the image has one L2 table (4 KiB clusters: 8 MiB a table)
    chosen = [c for c in range(1, dev.size // cs)
              if all(e.depth == 2 for e in dev.block_status(c * cs, cs)[:1])
              and dev.block_status(c * cs, cs)[0].length >= cs
              and any(dev.read(c * cs, 512))][:12]
    assert len(chosen) == 12, "the shape has too little backing data showing through"
    for c in chosen:
        do(("write", c * cs + 1024, 512, 5))
    do(("flush", 0, 0, 0))


def test_removing_the_copy_on_write_barrier_breaks_some_crash_state(tmp_path, monkeypatch):
    """Barrier.BEFORE_L2 as QED uses it (with a backing file only); the mutation test
    of test_crash_mutation.py shows NEED_CHECK needed."""
    shape = next(s for s in SHAPES if s.name == "qed-raw")
    real_sync = Storage.sync

    def sync(self, why):
        if why is not Barrier.BEFORE_L2:
            real_sync(self, why)

    with monkeypatch.context() as m:
        m.setattr(Storage, "sync", sync)
        m.setattr(qnbd.fileio.File, "punch_hole", lambda self, offset, length: False)
        image, intervals = record_driven(shape, tmp_path, m, cow_into_a_table_on_disk)
    checked, failures = enumerate_crashes(image, intervals, 1, tmp_path)
    assert failures, f"without BEFORE_L2, none of {checked} crash states failed"


def test_cow_workload_passes_with_every_barrier(tmp_path, monkeypatch):
    shape = SHAPES[1]
    image, intervals = record_driven(shape, tmp_path, monkeypatch, cow_into_a_table_on_disk)
    checked, failures = enumerate_crashes(image, intervals, 1, tmp_path)
    assert checked >= 10 and not failures, failures[:3]
