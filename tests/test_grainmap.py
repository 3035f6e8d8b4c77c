"""The sparse grain map of the temporary overlays (qnbd/block/grainmap.py) against a flat
bytearray, one byte a grain: the same answers, and memory only where grains were set."""

from hypothesis import given, settings, strategies as st

from qnbd.block.grainmap import CHUNK, GRAIN, GrainMap

GRAINS = 5 * CHUNK + 17   # a partial last chunk


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, GRAINS - 1), st.integers(1, 3 * CHUNK)),
                max_size=8),
       st.lists(st.tuples(st.integers(0, GRAINS - 1), st.integers(0, GRAINS - 1)),
                min_size=1, max_size=8))
def test_grain_map_answers_as_a_flat_map(sets, queries):
    flat = bytearray(GRAINS)
    m = GrainMap(GRAINS * GRAIN - 1)
    assert m.grains == GRAINS
    for first, n in sets:
        stop = min(first + n, GRAINS)
        flat[first:stop] = b"\x01" * (stop - first)
        m.set(first, stop)
    for a, b in queries:
        first, last = min(a, b), max(a, b)
        assert m[first] == flat[first]
        assert m.first_clear(first, last + 1) == flat.find(0, first, last + 1)
        end = first + 1
        while end <= last and flat[end] == flat[first]:
            end += 1
        assert m.run_end(first, last) == end


def test_memory_follows_what_was_set_not_the_size():
    m = GrainMap(1 << 51)   # 2 PiB claimed
    assert m.first_clear(0, m.grains) == 0 and m.run_end(0, m.grains - 1) == m.grains
    m.set(m.grains - 3, m.grains)
    assert len(m.chunks) == 1
    assert m.run_end(0, m.grains - 1) == m.grains - 3
    assert m.first_clear(m.grains - 3, m.grains) == -1
