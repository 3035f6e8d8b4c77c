"""qcow2 extended L2 entries (qcow2.rst, "Extended L2 Entries"; issue 11): what the
shape matrix of images.py does not show by itself. Writes, zeroes and discards touch
only the subclusters they cover (qemu-img map of the result says so), a client sees the
same block status from qnbd serve as from qemu-nbd, and damaged subcluster bitmaps are
refused in one line and reported by both checkers."""

import json
import os
import random
import subprocess

import pytest

from qnbd.errors import NotFast
from qnbd.formats import open_image

from cli_util import qnbd
from images import SHAPES
from peers import check_clean, qemu_img, qemu_io, run
from qcow2util import read_u64, patch_u64
from workload import Model, apply_ops, converted, discard_unit, random_ops

KiB, MiB = 1 << 10, 1 << 20
CS = 16 * KiB  # 512-byte subclusters
SUB = CS // 32


def _overlay(tmp_path, size=MiB):
    """A 16 KiB-cluster extended-L2 image over a qcow2 base full of 0x11."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, str(size))
    qemu_io(base, "qcow2", f"write -P 0x11 0 {size}")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={CS}",
             "-b", "base.qcow2", "-F", "qcow2", top)
    return top


def _top_layer(image) -> list[tuple[int, int, bool, bool]]:
    """(start, length, zero, data) of the runs qemu-img map puts in the top image."""
    out = json.loads(qemu_img("map", "--output=json", image).stdout)
    return [(e["start"], e["length"], e["zero"], e["data"]) for e in out if e["depth"] == 0]


def _same_as(image, expected: bytes, tmp_path):
    model = tmp_path / "model.raw"
    model.write_bytes(expected)
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, model, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_write_allocates_only_the_subclusters_it_touches(tmp_path):
    """100 bytes across subclusters 1 and 2 of a cluster: only those two are allocated,
    their untouched bytes copied from the backing file; the rest still shows it."""
    top = _overlay(tmp_path)
    dev = open_image(top, read_only=False)
    try:
        dev.write(CS + 1000, b"\x22" * 100)
        # A whole-subcluster write needs no copy; one in a subcluster already
        # allocated here writes in place.
        dev.write(3 * CS + 4 * SUB, b"\x33" * SUB)
        dev.write(CS + 1050, b"\x44" * 10)
    finally:
        dev.close()
    check_clean(top)
    assert _top_layer(top) == [(CS + SUB, 2 * SUB, False, True),
                               (3 * CS + 4 * SUB, SUB, False, True)]
    expected = bytearray(b"\x11" * MiB)
    expected[CS + 1000:CS + 1100] = b"\x22" * 100
    expected[CS + 1050:CS + 1060] = b"\x44" * 10
    expected[3 * CS + 4 * SUB:3 * CS + 5 * SUB] = b"\x33" * SUB
    _same_as(top, bytes(expected), tmp_path)
    # One host cluster a guest cluster, however many subclusters it holds.
    assert json.loads(qemu_img("check", "--output=json", top).stdout)[
        "allocated-clusters"] == 2


@pytest.mark.parametrize("trim", [False, True])
def test_zeroes_per_subcluster(tmp_path, trim):
    """Zeroing 3 subclusters of a written cluster sets their zero bits: the rest of the
    cluster keeps its data; over the backing file, zeroed subclusters hide it."""
    top = _overlay(tmp_path)
    dev = open_image(top, read_only=False)
    try:
        dev.write(0, b"\x55" * CS)
        dev.write_zeroes(2 * SUB, 3 * SUB, may_trim=trim)
        dev.write_zeroes(4 * CS + SUB, SUB, may_trim=trim)  # unallocated: backing hidden
        dev.discard(8 * CS, SUB)
    finally:
        dev.close()
    check_clean(top)
    assert _top_layer(top) == [(0, 2 * SUB, False, True), (2 * SUB, 3 * SUB, True, False),
                               (5 * SUB, CS - 5 * SUB, False, True),
                               (4 * CS + SUB, SUB, True, False),
                               (8 * CS, SUB, True, False)]
    expected = bytearray(b"\x11" * MiB)
    expected[:CS] = b"\x55" * CS
    for start, n in ((2 * SUB, 3 * SUB), (4 * CS + SUB, SUB), (8 * CS, SUB)):
        expected[start:start + n] = bytes(n)
    _same_as(top, bytes(expected), tmp_path)


def test_discarding_every_subcluster_frees_the_cluster(tmp_path):
    image = str(tmp_path / "e.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={CS}",
             image, str(MiB))
    dev = open_image(image, read_only=False)
    try:
        dev.write(CS, os.urandom(2 * CS))
        dev.flush()
        for k in range(32):  # one subcluster at a time, the whole of the first cluster
            dev.discard(CS + k * SUB, SUB)
        dev.discard(2 * CS, SUB)
    finally:
        dev.close()
    check_clean(image)
    info = json.loads(qemu_img("check", "--output=json", image).stdout)
    assert info["allocated-clusters"] == 1
    assert bytes(open_image(image).read(CS, 2 * CS)[:CS + SUB]) == bytes(CS + SUB)


def test_compressed_cluster_partly_overwritten(tmp_path):
    """A compressed cluster has no subclusters: writing or zeroing part of it turns it
    into a standard cluster with every subcluster allocated (qcow2.rst)."""
    image = str(tmp_path / "c.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={CS}",
             image, str(MiB))
    content = bytes(range(256)) * (CS // 256)
    dev = open_image(image, read_only=False)
    try:
        dev.write_compressed(0, content)
        dev.write_compressed(CS, content)
        assert dev.layer_status(0, CS)[0].compressed
        dev.write(100, b"\x77" * 10)
        dev.write_zeroes(CS + SUB, SUB)
    finally:
        dev.close()
    check_clean(image)
    expected = bytearray(MiB)
    expected[:2 * CS] = content * 2
    expected[100:110] = b"\x77" * 10
    expected[CS + SUB:CS + 2 * SUB] = bytes(SUB)
    _same_as(image, bytes(expected), tmp_path)
    top = _top_layer(image)
    assert (CS + SUB, SUB, True, False) in top
    assert sum(n for _s, n, zero, data in top if data and not zero) == 2 * CS - SUB


def _seen(running) -> dict:
    uri = f"nbd+unix:///?socket={running.sock}"
    out = {}
    for context in ("base:allocation", "qemu:allocation-depth"):
        out[context] = run("nbdinfo", f"--map={context}", uri).stdout
    out["data"] = subprocess.run(["nbdcopy", uri, "-"], capture_output=True).stdout
    return out


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.name.startswith("extl2")],
                         ids=lambda s: s.name)
def test_block_status_and_data_as_qemu_nbd(servers, shape, tmp_path):
    """qemu-made images with subclusters allocated, zero, unallocated over a backing
    file, unallocated in an allocated cluster, and compressed clusters: nbdinfo --map
    (base:allocation and qemu:allocation-depth) and the bytes, qnbd serve vs qemu-nbd."""
    image = shape.build(tmp_path)
    answers = []
    for program in ("qemu-nbd", "qnbd"):
        running = servers(program, "-r", "-A", "-f", "qcow2", image)
        answers.append(_seen(running))
        running.stop()
    assert answers[0] == answers[1]
    assert len(answers[0]["data"]) == shape.size


def _first_l2_entry(image, cluster_index=0) -> int:
    """File offset of the extended L2 entry of guest cluster `cluster_index`."""
    l1_offset = read_u64(image, 40)
    l2_offset = read_u64(image, l1_offset) & 0x00FFFFFFFFFFFE00
    return l2_offset + 16 * cluster_index


DAMAGE = [
    # (id, descriptor (None: keep), bitmap): qcow2.rst, "Subcluster Allocation Bitmap"
    ("allocated-and-zero", None, 1 | 1 << 32),
    ("allocated-without-host", 0, 0xFF),
    ("compressed-with-bitmap", "compressed", 1),
]


@pytest.mark.parametrize("case", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_damaged_bitmap(tmp_path, case):
    _id, descriptor, bitmap = case
    image = str(tmp_path / "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={CS}",
             image, str(MiB))
    if descriptor == "compressed":
        src = tmp_path / "src.raw"
        src.write_bytes(b"\x42" * CS + bytes(MiB - CS))
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o",
                 f"extended_l2=on,cluster_size={CS}", src, image)
    else:
        qemu_io(image, "qcow2", f"write -P 0x42 0 {CS}")
    entry = _first_l2_entry(image)
    if descriptor is not None and descriptor != "compressed":
        patch_u64(image, entry, descriptor)
    patch_u64(image, entry + 8, bitmap)
    # qemu-img check counts it a corruption (as qnbd check); qemu refuses to read it.
    rc, out, err = qnbd("check", image)
    assert rc == 2 and "bitmap" in out + err, out + err
    if _id != "allocated-without-host":  # qemu's check only looks at allocated clusters
        assert run("qemu-img", "check", image, check=False).returncode == 2
    for read_only in (True, False):
        dev = open_image(image, read_only=read_only)
        try:
            with pytest.raises(Exception) as e:
                dev.read(0, 4096)
            assert "bitmap" in str(e.value) and "\n" not in str(e.value)
            assert bytes(dev.read(CS, CS)) == bytes(CS)  # the other clusters still read
        finally:
            dev.close()
    assert json.loads(qemu_img("info", "--output=json", "-U", image).stdout)[
        "format-specific"]["data"]["corrupt"]


def test_fast_zero_refused_inside_a_compressed_cluster(tmp_path):
    image = str(tmp_path / "c.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={CS}",
             image, str(MiB))
    dev = open_image(image, read_only=False)
    try:
        dev.write_compressed(0, b"\x61" * CS)
        with pytest.raises(NotFast):
            dev.write_zeroes(SUB, SUB, fast=True)
        dev.write_zeroes(0, CS, fast=True)  # the whole cluster: dropped, no data written
        dev.write_zeroes(2 * CS + SUB, SUB, fast=True)  # bitmap only
        assert bytes(dev.read(0, 3 * CS)) == bytes(3 * CS)
    finally:
        dev.close()
    check_clean(image)


def test_external_data_file(tmp_path):
    """Subclusters with an external data file (guest offset = host offset, qcow2.rst):
    a random workload, then qemu-img check and compare."""
    image = str(tmp_path / "x.qcow2")
    # qemu opens a relative data file name from its working directory: the image's.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"extended_l2=on,cluster_size={CS},data_file=x.data", image, str(4 * MiB),
        cwd=tmp_path)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 1000 70000",
        "-c", f"write -z {3 * SUB} {SUB}", image, cwd=tmp_path)
    start = converted(image, "qcow2", tmp_path)
    dev = open_image(image, read_only=False)
    model = Model(start, discard_unit(dev), discard_keeps=False)
    try:
        apply_ops(dev, model, random_ops(random.Random(5), 4 * MiB, 40))
    finally:
        dev.close()
    r = run("qemu-img", "check", image, cwd=tmp_path, check=False)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    model_path = tmp_path / "model.raw"
    model_path.write_bytes(bytes(model.data))
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, model_path,
            cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_qemu_io_through_qnbd_serve_equals_qemu_io_on_the_image(serve, tmp_path):
    """The same qemu-io commands (unaligned writes, zeroes, cluster discards over a
    backing file) run by qemu on one copy of an image and through qnbd serve on another: the
    images compare equal and both check clean."""
    shape = next(s for s in SHAPES if s.name == "extl2-c16k-backing")
    image = shape.build(tmp_path)
    theirs = str(tmp_path / "theirs.qcow2")  # a copy, over the same base
    with open(image, "rb") as src, open(theirs, "wb") as dst:
        dst.write(src.read())
    commands = []
    rng = random.Random(11)
    for _ in range(40):
        off, n = rng.randrange(0, shape.size - 70000), rng.randrange(1, 70000)
        kind = rng.choice(["write -P %d" % rng.randrange(1, 255), "write -z", "discard"])
        if kind == "discard":
            # Whole clusters: qemu ignores the rest (content after a discard is the
            # server's choice; qnbd also zeroes whole subclusters).
            off, n = off // CS * CS, max(CS, n // CS * CS)
        commands.append(f"{kind} {off} {n}")
    qemu_io(theirs, "qcow2", *commands)
    server = serve(image, "-f", "qcow2", "--discard=unmap")
    run("qemu-io", "-f", "raw", *[a for c in commands for a in ("-c", c)], server.uri)
    server.stop()
    check_clean(image)
    check_clean(theirs)
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", image, theirs, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_writes_to_clusters_shared_with_a_snapshot(tmp_path):
    """After qemu-img snapshot -c every cluster is shared (no COPIED flag): a write moves
    the cluster whole with its allocated subclusters, zeroes only touch the bitmap of
    this layer's L2 copy, and the snapshot still reads what it held."""
    top = _overlay(tmp_path)
    qemu_io(top, "qcow2", f"write -P 0x66 {SUB + 7} {3 * CS}", f"write -z {5 * CS} {SUB}",
            f"write -P 0x67 {8 * CS + 2 * SUB} {SUB}")
    snapshot = converted(top, "qcow2", tmp_path)
    qemu_img("snapshot", "-c", "s1", top)
    start = converted(top, "qcow2", tmp_path)
    dev = open_image(top, read_only=False)
    model = Model(start, discard_unit(dev), discard_keeps=False)
    try:
        apply_ops(dev, model, [("write", CS + 100, 10, 1), ("write", 8 * CS, 5, 2),
                               ("zero", 2 * CS + SUB, SUB, 0), ("discard", 3 * CS, CS, 0),
                               ("write", 5 * CS + 3, 4, 3)])
    finally:
        dev.close()
    check_clean(top)
    _same_as(top, bytes(model.data), tmp_path)
    out = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", top, out)
    assert out.read_bytes() == snapshot


@pytest.mark.parametrize("name", ["v3", "qcow2-backing", "zlib"])
def test_convert_to_extended_l2_like_qemu_img(tmp_path, name):
    """qnbd convert -O qcow2 -o extended_l2=on: the content, a clean image, and the same
    unallocated / zero / data runs as qemu-img convert's."""
    shape = next(s for s in SHAPES if s.name == name)
    src = shape.build(tmp_path)
    opts = ["-o", f"extended_l2=on,cluster_size={CS}"]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    rc, _out, err = qnbd("convert", "-O", "qcow2", *opts, src, ours)
    assert rc == 0, err
    qemu_img("convert", "-O", "qcow2", *opts, src, theirs)
    r = run("qemu-img", "compare", src, ours, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    check_clean(ours)
    assert json.loads(qemu_img("info", "--output=json", ours).stdout)[
        "format-specific"]["data"]["extended-l2"]
    assert _runs(ours) == _runs(theirs)


def _runs(image) -> list:
    """qemu-img map as data / zero / unallocated runs, host offsets left out."""
    runs = []
    for e in json.loads(qemu_img("map", "--output=json", image).stdout):
        kind = "data" if e["data"] else "zero" if e["present"] else "unallocated"
        if runs and runs[-1][1] == kind:
            runs[-1][0] += e["length"]
        else:
            runs.append([e["length"], kind])
    return runs


def test_unallocated_subclusters_of_an_allocated_cluster(servers, tmp_path):
    """A host cluster whose bitmap allocates only some subclusters (qcow2.rst: the others
    read from the backing file, or as zeros when their zero bit is set): made by
    clearing bits of a cluster qemu wrote. Bytes, qemu-img map and nbdinfo --map as
    qemu's; writing into it fills the subclusters from the backing file."""
    top = _overlay(tmp_path)
    qemu_io(top, "qcow2", f"write -P 0x70 0 {2 * CS}")
    entry = _first_l2_entry(top)
    patch_u64(top, entry + 8, 0x0000FF00_F0F000F0)  # allocated 4-7, 20-23, 28-31; zero 8-15
    patch_u64(top, entry + 24, 0)  # cluster 1: a host cluster, no subcluster in it
    expected = converted(top, "qcow2", tmp_path)
    assert expected[:SUB] == b"\x11" * SUB and expected[4 * SUB:5 * SUB] == b"\x70" * SUB
    dev = open_image(top)
    try:
        assert bytes(dev.read(0, MiB)) == expected
    finally:
        dev.close()
    for output in ("json", "human"):
        assert qnbd("map", f"--output={output}", top)[1] == \
            qemu_img("map", f"--output={output}", top).stdout
    answers = []
    for program in ("qemu-nbd", "qnbd"):
        running = servers(program, "-r", "-A", "-f", "qcow2", top)
        answers.append(_seen(running))
        running.stop()
    assert answers[0] == answers[1]
    dev = open_image(top, read_only=False)
    model = Model(expected, discard_unit(dev), discard_keeps=False)
    try:
        apply_ops(dev, model, [("write", 100, 10, 5), ("write", CS + SUB + 1, 3 * SUB, 6),
                               ("zero", 9 * SUB, SUB, 0)])
    finally:
        dev.close()
    check_clean(top)
    _same_as(top, bytes(model.data), tmp_path)
