"""entries.run_end, the bulk run finder under block status, map and snapshot updates
(issue 17): on any table, the same end as comparing entry after entry. The images
these walks serve are checked against qemu-img elsewhere (test_map, test_snapshot_ops,
test_block_status_one); this pins the slicing and halving on tables no image would hold
(runs cut at every length, flags changing mid-run, offsets at the top of the field)."""

from array import array

from hypothesis import given, strategies as st

from qnbd.qcow2.entries import L2E_OFFSET_MASK, OFLAG_COPIED, run_end

CLUSTER = 512


def _one_by_one(table, i, stop, step):
    j = i + 1
    while j < stop and table[j] == table[j - 1] + step and \
            (not step or table[j] & L2E_OFFSET_MASK > table[j - 1] & L2E_OFFSET_MASK):
        j += 1
    return j


@st.composite
def tables(draw):
    """Runs of contiguous clusters, zeros and repeated entries, flags flipped here and
    there, some near the end of the offset field."""
    out = []
    while len(out) < draw(st.integers(1, 300)):
        kind = draw(st.sampled_from(["data", "zero", "same", "top"]))
        n = draw(st.integers(1, 80))
        if kind == "data":
            host = draw(st.integers(1, 1 << 20)) * CLUSTER
            flags = draw(st.sampled_from([0, OFLAG_COPIED]))
            out += [flags | host + k * CLUSTER for k in range(n)]
        elif kind == "top":  # the last clusters the offset field can name
            host = L2E_OFFSET_MASK - draw(st.integers(0, n)) * CLUSTER
            out += [min(host + k * CLUSTER, (1 << 63) - 1) for k in range(n)]
        else:
            out += [0 if kind == "zero" else draw(st.sampled_from([1, OFLAG_COPIED]))] * n
        if out and draw(st.booleans()):
            out[draw(st.integers(0, len(out) - 1))] ^= OFLAG_COPIED
    return array("Q", out)


@given(tables(), st.data())
def test_run_end_matches_an_entry_by_entry_walk(table, data):
    i = data.draw(st.integers(0, len(table) - 1))
    stop = data.draw(st.integers(i + 1, len(table)))
    entry = table[i]
    step = CLUSTER if entry & L2E_OFFSET_MASK else 0
    assert run_end(table, i, stop, entry, step) == _one_by_one(table, i, stop, step)
