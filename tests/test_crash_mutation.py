"""Every barrier is needed (docs/DESIGN.md, "Proving crash safety"): with any one named
fsync removed, the enumeration of crash states finds a broken image.

The file system is made unable to punch holes (as some are: fileio then leaves the
data), so freed clusters keep their old bytes and a reused one shows what a missing
barrier let through. Each barrier is paired with the workload whose enumeration exposes
it (tests/crashrun.py).
"""

import pytest

import qnbd.fileio
from qnbd.block.storage import Barrier, Storage

from crashrun import (SCENARIOS, SNAPSHOT_SCENARIOS, _PooledWrites, enumerate_crashes,
                      random_scenario)

EXPOSED_BY = [
    (Barrier.BEFORE_L2, "issue-10"),
    (Barrier.BEFORE_L2, "data-file-reuse"),  # data in the data file before the mapping
    (Barrier.BEFORE_L1, random_scenario("c512-r64-raw", 1, 25)),
    (Barrier.BEFORE_RELEASE, random_scenario("c4k-r1", 1, 25)),
    (Barrier.NEW_REFBLOCK, random_scenario("c512-r64-raw", 1, 25)),
    (Barrier.BEFORE_HEADER, random_scenario("bitmaps", 1, 25)),
    (Barrier.HEADER, "reftable-growth"),
    # Rule 15: the new snapshot table, the applied L1 table, before the header names it.
    (Barrier.BEFORE_HEADER, SNAPSHOT_SCENARIOS["snapshot-create-c512-r64"]),
    (Barrier.BEFORE_HEADER, SNAPSHOT_SCENARIOS["snapshot-apply-c512-r64"]),
    (Barrier.BITMAPS_IN_USE, random_scenario("bitmaps", 1, 25)),
    (Barrier.FLUSH, random_scenario("c512-r64-raw", 1, 25)),
    (Barrier.REPAIR, "repair-raises-refcount"),
    (Barrier.NEED_CHECK, random_scenario("qed-c4k", 1, 8)),  # QED, rule 12
]


def _scenario_name(scenario) -> str:
    if isinstance(scenario, str):
        return scenario
    return next((n for n, s in SNAPSHOT_SCENARIOS.items() if s is scenario), "random")


def test_every_barrier_has_a_workload_that_needs_it():
    assert {barrier for barrier, _ in EXPOSED_BY} == set(Barrier)


@pytest.mark.slow
@pytest.mark.parametrize("barrier,scenario", EXPOSED_BY,
                         ids=[f"{b.name}-{_scenario_name(s)}" for b, s in EXPOSED_BY])
def test_removing_a_barrier_breaks_some_crash_state(barrier, scenario, tmp_path,
                                                    monkeypatch):
    real_sync = Storage.sync

    def sync(self, why):
        if why is not barrier:
            real_sync(self, why)

    with monkeypatch.context() as m:
        m.setattr(Storage, "sync", sync)
        m.setattr(qnbd.fileio.File, "punch_hole", lambda self, offset, length: False)
        run = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
        image, intervals = run(tmp_path, m)
    checked, failures = enumerate_crashes(image, intervals, 1, tmp_path)
    assert failures, f"without {barrier.name}, none of {checked} crash states failed"
    print(f"\nwithout {barrier.name}: {len(failures)} of {checked} states fail, e.g. {failures[0][:300]}")


@pytest.mark.slow
@pytest.mark.parametrize("mutation", ["map-at-plan", "commit-before-write"])
def test_mapping_before_the_pooled_data_breaks_some_crash_state(mutation, tmp_path,
                                                                monkeypatch):
    """Write plans (qnbd/block/plan.py): the L2 entry changes only at the plan's commit,
    after its HostWrites. Installed when the write is planned, or committed before the
    data is written, it reaches the disk (a FUA write's flush in between) ahead of the
    data, and the enumeration finds a cluster that reads what was never written."""
    from qnbd.qcow2.writer import ClusterWriter

    with monkeypatch.context() as m:
        m.setattr(qnbd.fileio.File, "punch_hole", lambda self, offset, length: False)
        if mutation == "map-at-plan":
            install = ClusterWriter._install
            m.setattr(ClusterWriter, "_install",
                      lambda self, table, updates, dropped, plan:
                      install(self, table, updates, dropped, None))
        else:
            def settle(self):   # as _PooledWrites.settle, but each commit first
                plans, self.plans = self.plans, []
                for plan, (_kind, off, n, pattern) in plans:
                    plan.commit()
                    self.dev.flush()   # the next request may be a FLUSH
                    for w in plan.writes:
                        w.perform()
                    self.model.write(off, bytes([pattern]) * n)
            m.setattr(_PooledWrites, "settle", settle)
        image, intervals = SCENARIOS["pooled-mapping"](tmp_path, m)
    checked, failures = enumerate_crashes(image, intervals, 1, tmp_path)
    assert failures, f"{mutation}: none of {checked} crash states failed"
    print(f"\n{mutation}: {len(failures)} of {checked} states fail, e.g. {failures[0][:300]}")
