"""NBD_CMD_BLOCK_STATUS with REQ_ONE on an image of small clusters (issue 17): qemu's
client asks with REQ_ONE for the rest of the disk each time, so answering must cost what
the first extent needs, not a walk of every L2 table up to the request's end. The answer
is checked against qemu-img map of the same image; the work by the L2 cache's counters."""

import json
import random
from types import SimpleNamespace

import pytest

from peers import qemu_img, qemu_io
from qnbd.block.base import HOLE, ZERO
from qnbd.block.overlay import SnapshotOverlay
from qnbd.formats import open_image
from qnbd.nbd.contexts import FIRST_WINDOW, contexts_for

CLUSTER = 512
TABLE_SPAN = CLUSTER * (CLUSTER // 8)  # guest bytes one L2 table maps: 32 KiB
SIZE = 8 << 20  # 256 L2 tables


@pytest.fixture(scope="module")
def fragmented(tmp_path_factory):
    """Writes of 4-64 KiB at random places, plus zeroed and discarded ranges, and one
    long data run: extents of every length, in host clusters out of guest order."""
    path = tmp_path_factory.mktemp("one") / "small.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, str(SIZE))
    rng = random.Random(17)
    commands = [f"write -P 7 {SIZE // 2} 1M"]
    for _ in range(120):
        n = rng.choice((4, 8, 16, 64)) << 10
        commands.append(f"write -P {rng.randrange(1, 255)} {rng.randrange(0, SIZE - n, 4096)} {n}")
    commands += [f"write -z {SIZE // 4} 64k", f"discard {SIZE // 8} 32k"]
    qemu_io(path, "qcow2", *commands)
    return path


def _peer_runs(path) -> list[tuple[int, int, int]]:
    """(start, end, base:allocation flags) of qemu-img map, neighbours with the same
    flags merged (map splits them by host offset; base:allocation does not)."""
    runs = []
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path).stdout):
        flags = (0 if e["data"] else HOLE) | (ZERO if e["zero"] else 0)
        if runs and runs[-1][2] == flags:
            runs[-1] = (runs[-1][0], e["start"] + e["length"], flags)
        else:
            runs.append((e["start"], e["start"] + e["length"], flags))
    return runs


def test_req_one_answers_the_first_extent_and_walks_only_its_tables(fragmented):
    runs = _peer_runs(fragmented)
    assert len(runs) > 100  # the image is fragmented enough for the walk to matter
    image = open_image(str(fragmented))
    try:
        base = contexts_for(SimpleNamespace(device=image, allocation_depth=False,
                                            bitmaps=[]))[0]
        cache = image.tables.l2_cache
        for start, end, flags in runs:
            for offset in {start, (start + end) // 2 // CLUSTER * CLUSTER}:
                before = cache.hits + cache.misses
                assert base.extents(offset, SIZE - offset, one=True) == \
                    [(end - offset, flags)], offset
                touched = cache.hits + cache.misses - before
                # Windows double until a second extent shows: at most the tables of
                # twice the extent and the first window, and one more at each edge.
                bound = (2 * (end - offset) + FIRST_WINDOW) // TABLE_SPAN + 2
                assert touched <= bound, (offset, end - offset, touched)
    finally:
        image.close()


def test_without_req_one_every_extent_still_comes(fragmented):
    """The windows are REQ_ONE's only: a full request answers the whole range."""
    image = open_image(str(fragmented))
    try:
        base = contexts_for(SimpleNamespace(device=image, allocation_depth=False,
                                            bitmaps=[]))[0]
        got = base.extents(0, SIZE, one=False)
    finally:
        image.close()
    assert got == [(end - start, flags) for start, end, flags in _peer_runs(fragmented)]


def test_a_snapshot_overlay_maps_each_extent_once(fragmented, tmp_path):
    """qnbd serve -s: the overlay answers one extent a call, so it asks its base for the
    first extent only (block/extents.py first_extent); asking for the whole rest each
    time walked up to 64 L2 tables per extent. A full map touches each table about
    twice, plus the first windows."""
    runs = _peer_runs(fragmented)
    image = open_image(str(fragmented))
    overlay = SnapshotOverlay(image, str(tmp_path))
    try:
        base = contexts_for(SimpleNamespace(device=overlay, allocation_depth=False,
                                            bitmaps=[]))[0]
        cache = image.tables.l2_cache
        before = cache.hits + cache.misses
        got = base.extents(0, SIZE, one=False)
        touched = cache.hits + cache.misses - before
    finally:
        overlay.close()
    assert got == [(end - start, flags) for start, end, flags in runs]
    tables = SIZE // TABLE_SPAN
    assert touched <= 2 * tables + len(runs) * (FIRST_WINDOW // TABLE_SPAN + 2), touched
