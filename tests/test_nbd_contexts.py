"""The metadata context registry, sans-I/O: descriptors from extent functions, and the
query rules (qemu-nbd's; checked against qemu-nbd itself in test_backup.py)."""

from types import SimpleNamespace

from qnbd.block.base import HOLE, ZERO, Extent
from qnbd.nbd.contexts import MAX_DESCRIPTORS, MetaContext, contexts_for, list_contexts, \
    select_contexts


def test_descriptors_merge_cover_the_request_and_honour_req_one():
    calls = []

    def source(offset, length):  # stops early, like an engine at an L2 slice boundary
        calls.append((offset, length))
        return [(10, 0), (10, 0), (5, 3)] if offset == 0 else [(length + 100, 3)]
    ctx = MetaContext("x:y", source)
    assert ctx.extents(0, 40, one=False) == [(20, 0), (20, 3)]
    assert calls == [(0, 40), (25, 15)]
    assert ctx.extents(0, 40, one=True) == [(20, 0)]


def test_descriptors_at_least_one_and_capped():
    assert MetaContext("x:y", lambda o, n: []).extents(5, 7, one=False) == [(7, 0)]
    alternating = MetaContext("x:y", lambda o, n: [(1, (o + i) & 1) for i in range(n)])
    assert len(alternating.extents(0, 3 * MAX_DESCRIPTORS, one=False)) == MAX_DESCRIPTORS


def test_export_contexts_in_qemu_order_with_ids_and_query_rules():
    device = SimpleNamespace(block_status=lambda o, n: [Extent(n, HOLE | ZERO, 2)])
    bitmap = SimpleNamespace(name="b", granularity=512, extents=lambda o, n: [(n, True)])
    export = SimpleNamespace(device=device, allocation_depth=True, bitmaps=[bitmap])
    ctxs = contexts_for(export)
    names = [c.name for c in ctxs]
    assert names == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b"]
    assert [c.id for c in ctxs] == [1, 2, 3]
    assert [c.extents(0, 8, False) for c in ctxs] == [[(8, 3)], [(8, 2)], [(8, 1)]]

    def listed(*q):
        return [c.name for c in list_contexts(ctxs, list(q))]
    assert listed() == names
    assert listed("qemu:") == names[1:]
    assert listed("qemu:dirty-bitmap:", "base:") == [names[0], names[2]]
    assert listed("qemu:allocation-depth:", "qemu:dirty", "base:allocation:", "") == []
    # SET: exact names only, in the export's order, each once.
    assert [c.name for c in select_contexts(ctxs, ["qemu:dirty-bitmap:b", "qemu:", "base:",
                                                   "base:allocation", "base:allocation"])] \
        == [names[0], names[2]]


def test_dirty_bitmap_asks_for_no_more_runs_than_a_reply_carries():
    """Issue 16: a fine bitmap with alternating bits costs what is sent, not what is asked."""
    asked = []

    def extents(offset, length):  # alternating runs of one granule
        asked.append(length)
        return [(512, (offset // 512 + i) % 2 == 1) for i in range(length // 512)]
    bitmap = SimpleNamespace(name="b", granularity=512, extents=extents)
    device = SimpleNamespace(block_status=lambda o, n: [Extent(n, 0, 1)])
    ctx = contexts_for(SimpleNamespace(device=device, allocation_depth=False,
                                       bitmaps=[bitmap]))[-1]
    out = ctx.extents(0, 4 << 30, one=False)
    assert len(out) == MAX_DESCRIPTORS and max(asked) == MAX_DESCRIPTORS * 512
