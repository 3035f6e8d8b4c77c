"""Every barrier is needed (docs/DESIGN.md, "Proving crash safety"): with any one named
fsync removed, the enumeration of crash states finds a broken image.

The file system is made unable to punch holes (as some are: fileio falls back to leaving
the data), so freed clusters keep their old bytes and a reused one shows what a missing
barrier let through. Each barrier is paired with the shape and workload seed whose
enumeration exposes it.
"""

import random

import pytest

import qnbd.fileio
from qnbd.block.storage import Barrier, Storage

import crashrun as support

# barrier -> (shape, seed) whose enumeration fails without it
EXPOSED_BY = {
    Barrier.BEFORE_L2: ("c512-r64-raw", 1),
    Barrier.BEFORE_L1: ("c512-r64-raw", 1),
    Barrier.BEFORE_RELEASE: ("c4k-r1", 1),
    Barrier.NEW_REFBLOCK: ("c512-r64-raw", 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("barrier", list(EXPOSED_BY), ids=lambda b: b.name)
def test_removing_a_barrier_breaks_some_crash_state(barrier, tmp_path, monkeypatch):
    shape_name, seed = EXPOSED_BY[barrier]
    shape = next(s for s in support.SHAPES if s.name == shape_name)
    real_sync = Storage.sync

    def sync(self, why):
        if why is not barrier:
            real_sync(self, why)

    with monkeypatch.context() as m:
        m.setattr(Storage, "sync", sync)
        m.setattr(qnbd.fileio.File, "punch_hole", lambda self, offset, length: False)
        ops = support.crash_ops(random.Random(seed), shape.size, 25)
        image, intervals = support.record_workload(shape, tmp_path, ops, m)
    checked, failures = support.enumerate_crashes(image, intervals, seed, tmp_path)
    assert failures, f"without {barrier.name}, none of {checked} crash states failed"
