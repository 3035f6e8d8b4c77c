"""Power cuts, enumerated (docs/DESIGN.md, "Proving crash safety"; rules 2-6, 9, 10).

A workload runs on an image through the file seam; every interval between two fsyncs is
recorded and its crash states enumerated (tests/crashsim.py): every prefix, every single
operation, torn writes, random subsets. For each state: an image without lazy refcounts
has no corruption (qemu-img check rc 2; leaks are allowed), a lazy-refcounts image is
repaired by opening it read-write and is then clean, and every sector no operation
touched since the last completed flush reads as it was at that flush.
"""

import random

import pytest

from crashrun import SHAPES, SHAPE_IDS, crash_ops, enumerate_crashes, record_driven, record_workload

def run_enumeration(shape, tmp_path, seed, count, monkeypatch) -> int:
    rng = random.Random(seed)
    ops = crash_ops(rng, shape.size, count)
    image, intervals = record_workload(shape, tmp_path, ops, monkeypatch)
    checked, failures = enumerate_crashes(image, intervals, seed, tmp_path)
    assert not failures, f"{len(failures)} of {checked} crash states fail:\n" + \
        "\n".join(failures[:5])
    return checked


def test_refcounts_durable_before_an_l2_table_already_on_disk(tmp_path, monkeypatch):
    """The corruption of the engine issue: 512 B clusters, 64-bit refcounts, a raw
    backing file. A data cluster is written into an L2 table already on disk, then
    write-zeroes over a range with no L2 table needs a new table whose allocation
    needs a new refcount block, then a flush. The refcount of the data cluster must be
    durable before the old L2 table is rewritten to point to it; the old engine wrote
    the refcount block and the L2 table with no fsync between them."""
    shape = SHAPES[0]
    cs = 512
    table_span = cs * (cs // 8)  # guest bytes one L2 table maps

    def drive(dev, do):
        do(("write", 0, cs, 3))
        do(("flush", 0, 0, 0))  # the L2 table of guest offset 0 is on disk
        rc = dev.refcounts
        # Fill the free clusters of the allocated regions, one data cluster at a time
        # into that same table, until the next allocation opens a new region.
        guest = cs
        while True:
            nxt = rc._next_free(rc.free_hint)
            if nxt % rc.per_block == 0 and not (nxt // rc.per_block < len(rc.table)
                                                and rc.table[nxt // rc.per_block]):
                break
            do(("write", guest, cs, 5))
            guest += cs
        assert guest < table_span, "the regions did not fill within one table"
        do(("zero", 3 * table_span, table_span, 0))  # needs a new L2 table, new refblock
        do(("flush", 0, 0, 0))

    image, intervals = record_driven(shape, tmp_path, monkeypatch, drive)
    checked, failures = enumerate_crashes(image, intervals, 1, tmp_path)
    assert not failures, f"{len(failures)} of {checked} crash states fail:\n" + \
        "\n".join(failures[:3])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_enumerated_power_cuts(shape, tmp_path, monkeypatch):
    checked = run_enumeration(shape, tmp_path, 1, 8, monkeypatch)
    assert checked >= 20, f"only {checked} crash states: the workload wrote too little"


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("seed", range(10, 14))
def test_enumerated_power_cuts_long(shape, seed, tmp_path, monkeypatch):
    """7 shapes x 4 seeds; the note reports the total number of states checked."""
    checked = run_enumeration(shape, tmp_path, seed, 40, monkeypatch)
    print(f"\n{shape.name} seed {seed}: {checked} crash states")
    assert checked >= 300, f"only {checked} crash states"
