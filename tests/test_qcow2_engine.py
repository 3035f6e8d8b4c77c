"""The qcow2 engine against qemu: reads equal qemu-img convert's, and random workloads
mirrored on a model leave images that qemu-img check calls clean and compare equal."""

import os
import random
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnbd.formats import open_image
from qnbd.errors import NotFast

from peers import check_clean, qemu_img
from images import MiB, RAW, SHAPES
from workload import Model, apply_ops, converted, discard_unit, random_ops, with_compressed

ALL_SHAPES = SHAPES + [RAW]


@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: s.name)
def test_reads_equal_qemu(shape, tmp_path):
    image = shape.build(tmp_path)
    expected = converted(image, shape.fmt, tmp_path)
    dev = open_image(image, shape.fmt, read_only=True)
    try:
        assert dev.size == len(expected)
        # Whole image in one call, then odd-sized pieces crossing cluster boundaries.
        assert bytes(dev.read(0, dev.size)) == expected
        rng = random.Random(7)
        for _ in range(200):
            off = rng.randrange(0, dev.size)
            n = min(rng.randrange(1, 300000), dev.size - off)
            assert bytes(dev.read(off, n)) == expected[off:off + n], (off, n)
    finally:
        dev.close()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_block_status_matches_data(shape, tmp_path):
    """Extents tile the range, and every extent flagged ZERO really reads as zeros."""
    image = shape.build(tmp_path)
    expected = converted(image, "qcow2", tmp_path)
    dev = open_image(image, read_only=True)
    try:
        pos = 0
        while pos < dev.size:
            extents = dev.block_status(pos, dev.size - pos)
            assert extents and all(e.length > 0 for e in extents)
            for e in extents:
                if e.flags & 2:
                    assert expected[pos:pos + e.length].count(0) == e.length, (pos, e)
                pos += e.length
        assert pos == dev.size
    finally:
        dev.close()


def run_workload(shape, tmp_path, ops, reopen_every=None):
    image = shape.build(tmp_path)
    model_path = os.path.join(str(tmp_path), "model.raw")
    # The starting content is read by qemu before the engine opens (and locks) the image.
    start = converted(image, shape.fmt, tmp_path)
    dev = open_image(image, shape.fmt, read_only=False)
    model = Model(start, discard_unit(dev), discard_keeps=shape.v2 and shape.backing is not None)
    try:
        for i in range(0, len(ops), reopen_every or len(ops) or 1):
            apply_ops(dev, model, ops[i:i + (reopen_every or len(ops))])
            assert bytes(dev.read(0, dev.size)) == model.data
            if reopen_every:
                dev.close()
                dev = open_image(image, shape.fmt, read_only=False)
    finally:
        dev.close()
    with open(model_path, "wb") as f:
        f.write(model.data)
    if shape.fmt == "qcow2":
        check_clean(image)
    r = subprocess.run(["qemu-img", "compare", "-f", shape.fmt, "-F", "raw", image, model_path],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", [1, 2])
def test_random_workload(shape, seed, tmp_path):
    rng = random.Random(seed * 1000 + len(shape.name))
    ops = random_ops(rng, shape.size, 120)
    run_workload(shape, tmp_path, ops, reopen_every=40)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_random_workload_with_compressed_writes(shape, tmp_path):
    """Compressed clusters packed into shared host clusters, then overwritten, zeroed and
    discarded: qemu-img check stays clean and the content matches the model."""
    rng = random.Random(7 + len(shape.name))
    ops = with_compressed(rng, random_ops(rng, shape.size, 120), shape.size)
    assert sum(op[0] == "compress" for op in ops) > 10
    run_workload(shape, tmp_path, ops, reopen_every=40)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", range(3, 13))
def test_random_workload_long(shape, seed, tmp_path):
    rng = random.Random(seed * 1000 + len(shape.name))
    run_workload(shape, tmp_path, random_ops(rng, shape.size, 400), reopen_every=100)


_op = st.tuples(st.sampled_from(["write", "zero", "zero_trim", "discard", "flush"]),
                st.integers(0, 12 * MiB - 1), st.integers(1, 300000), st.integers(1, 255))


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[6],
                                   next(s for s in SHAPES if s.name == "extl2-c16k-backing")],
                         ids=lambda s: s.name)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=25))
def test_hypothesis_workload(shape, ops, tmp_path_factory):
    ops = [(k, o, min(n, shape.size - o), p) for k, o, n, p in ops if o < shape.size]
    run_workload(shape, tmp_path_factory.mktemp(shape.name), ops)


def test_fast_zero_refused_where_data_must_be_written(tmp_path):
    """v2 with a backing file has no zero flag: zeroing means writing, so not fast."""
    shape = SHAPES[8]
    assert shape.name == "v2-backing"
    image = shape.build(tmp_path)
    dev = open_image(image, read_only=False)
    try:
        before = bytes(dev.read(0, 4 * MiB))
        with pytest.raises(NotFast):
            dev.write_zeroes(0, 4 * MiB, fast=True)
        assert bytes(dev.read(0, 4 * MiB)) == before
    finally:
        dev.close()
    check_clean(image)


def test_fast_zero_of_whole_clusters_on_v3(tmp_path):
    image = SHAPES[0].build(tmp_path)
    dev = open_image(image, read_only=False)
    try:
        dev.write_zeroes(0, 4 * MiB, fast=True)
        assert bytes(dev.read(0, 4 * MiB)) == bytes(4 * MiB)
        with pytest.raises(NotFast):  # a partial cluster with data in it
            dev.write(8 * MiB, b"x" * 100)
            dev.write_zeroes(8 * MiB + 10, 20, fast=True)
    finally:
        dev.close()
    check_clean(image)


def test_discard_returns_space(tmp_path):
    image = os.path.join(str(tmp_path), "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    dev = open_image(image, read_only=False)
    try:
        dev.write(0, os.urandom(32 * MiB))
        dev.flush()
        used = os.stat(image).st_blocks * 512
        dev.discard(0, 32 * MiB)
        dev.flush()
        assert os.stat(image).st_blocks * 512 < used - 30 * MiB
        assert bytes(dev.read(0, 32 * MiB)) == bytes(32 * MiB)
        # Freed clusters are reused: rewriting does not grow the file.
        end = os.path.getsize(image)
        dev.write(0, b"y" * (16 * MiB))
        dev.flush()
        assert os.path.getsize(image) <= end
    finally:
        dev.close()
    check_clean(image)


def test_refcount_table_growth(tmp_path):
    """512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB, so a few
    MiB of writes need new refcount blocks and several moves of the refcount table."""
    image = os.path.join(str(tmp_path), "g.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
             image, "16M")
    dev = open_image(image, read_only=False)
    data = os.urandom(6 * MiB)
    try:
        dev.write(MiB, data)
        dev.flush()
        assert dev.refcounts.table_clusters > 1
        assert bytes(dev.read(MiB, len(data))) == data
    finally:
        dev.close()
    check_clean(image)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -v {MiB} 16", image],
                       capture_output=True, text=True)
    assert data[:16].hex()[:8] in r.stdout.replace(" ", "")


def test_memory_bounded_by_cache(tmp_path):
    """The L2 cache holds at most its configured number of tables, however much of a
    large image is touched."""
    image = os.path.join(str(tmp_path), "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "64G")
    dev = open_image(image, read_only=False, l2_cache_bytes=16 * 4096)
    try:
        for i in range(300):  # one write per L2 table (each maps 2 MiB here)
            dev.write(i * (2 * MiB) + 5, b"z" * 10)
        assert len(dev.tables.l2_cache) <= 16
        for i in range(300):
            assert bytes(dev.read(i * (2 * MiB) + 5, 10)) == b"z" * 10
    finally:
        dev.close()
    check_clean(image)


def test_block_status_stops_after_a_bounded_number_of_tables(tmp_path):
    """A query over many allocated L2 tables returns early (the contract allows it), and
    asking again from where it stopped covers the rest exactly."""
    from qnbd.qcow2.mapping import MAX_STATUS_TABLES

    image = os.path.join(str(tmp_path), "frag.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "1G")
    dev = open_image(image, read_only=False)
    table_span = 4096 * 512  # bytes one 4 KiB-cluster L2 table maps
    tables = MAX_STATUS_TABLES * 3
    try:
        for t in range(tables):
            dev.write(t * table_span, b"d" * 4096)
        first = dev.block_status(0, dev.size)
        assert sum(e.length for e in first) == MAX_STATUS_TABLES * table_span
        pos, seen = 0, []
        while pos < dev.size:
            for e in dev.block_status(pos, dev.size - pos):
                seen.append((pos, e.flags))
                pos += e.length
        assert pos == dev.size
        data = [p for p, flags in seen if flags == 0]
        assert data == [t * table_span for t in range(tables)]
    finally:
        dev.close()
