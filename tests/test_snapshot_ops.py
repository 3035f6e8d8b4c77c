"""`qnbd snapshot -c/-a/-d` against `qemu-img snapshot` run side by side on copies of
one image: the same snapshot table (dates aside), the same data in every snapshot and in
the active layer, qemu-img check clean, the same errors and exit codes; and writes
through `qnbd serve` copy the clusters a snapshot shares (qnbd's snapshots and qemu's)."""

import json
import re
import os
import shutil
import struct
import subprocess

import nbd
import pytest

from qnbd.formats import open_image

from bitmaputil import info_bitmaps, qemu_dirty_map
from cli_util import qnbd, qnbd_ok, qnbd_on_terminal, qnbd_subprocess
from nbdserver import wait_for_socket
from peers import check_clean, qemu_img, qemu_io, run

MiB = 1 << 20

SHAPES = [("v3", ""), ("v2", "compat=0.10"), ("c512-r64", "cluster_size=512,refcount_bits=64"),
          ("lazy", "lazy_refcounts=on"), ("extl2", "extended_l2=on,cluster_size=16384"),
          # Every cluster allocated, host-contiguous: whole L2 tables and refcount blocks
          # are one run for the bulk updates (issue 17).
          ("prealloc", "preallocation=metadata"),
          ("prealloc-c512", "preallocation=metadata,cluster_size=512"),
          ("backing", None)]


def _build(directory, options: str | None, size=4 * MiB) -> str:
    """An image written by qemu-io: data, a compressed cluster (but over preallocated
    clusters), zeroes, a discard."""
    image = str(directory / "img.qcow2")
    args = ["create", "-q", "-f", "qcow2"]
    if options is None:
        base = str(directory / "base.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", base, str(size))
        qemu_io(base, "qcow2", f"write -P 0x11 0 {size}")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    elif options:
        args += ["-o", options]
    qemu_img(*args, image, str(size))
    # qemu writes compressed to unallocated clusters only.
    compressed = "-c " if "preallocation" not in (options or "") else ""
    qemu_io(image, "qcow2", "write -P 1 0 1M", f"write {compressed}-P 2 2M 64k",
            "write -z 3M 128k", "write -P 3 3200k 4k", "discard 512k 64k")
    return image


def _twins(tmp_path, image):
    """Two copies of `image` (and its backing file) in directories of their own: one
    for qnbd, one for qemu-img."""
    out = []
    for name in ("ours", "theirs"):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(os.path.dirname(image)):
            src = os.path.join(os.path.dirname(image), f)
            if os.path.isfile(src):
                shutil.copy(src, d / f)
        out.append(str(d / os.path.basename(image)))
    return out


def _raw(image, snapshot=None) -> bytes:
    out = image + (f".{snapshot}" if snapshot else "") + ".raw"
    qemu_img("convert", "-U", "-O", "raw", *(["-l", snapshot] if snapshot else []), image, out)
    with open(out, "rb") as f:
        return f.read()


def _table(image) -> list[dict]:
    """The snapshot table as qemu-img info reads it, without the dates (each tool puts
    the time it ran)."""
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", image).stdout)
    return [{k: v for k, v in s.items() if k not in ("date-sec", "date-nsec")}
            for s in info.get("snapshots", [])]


def _extra_data_sizes(image) -> list[int]:
    """Each entry's extra_data_size, from the table itself (qcow2.rst, "Snapshots")."""
    with open(image, "rb") as f:
        raw = f.read()
    count, offset = struct.unpack_from(">IQ", raw, 60)
    sizes = []
    for _ in range(count):
        _, _, id_len, name_len, *_, extra = struct.unpack_from(">QIHHIIQII", raw, offset)
        sizes.append(extra)
        offset += 40 + extra + id_len + name_len
        offset += -offset % 8
    return sizes


def _both(ours, theirs, *args):
    """The same snapshot command by qnbd and by qemu-img."""
    rc, out, err = qnbd("snapshot", *args, ours)
    assert rc == 0, err
    qemu_img("snapshot", *args, theirs)


@pytest.fixture(params=SHAPES, ids=lambda s: s[0])
def twins(request, tmp_path):
    image = _build(_mkdir(tmp_path / "src"), request.param[1])
    return _twins(tmp_path, image)


def _mkdir(path):
    path.mkdir()
    return path


def test_create_as_qemu_img(twins):
    ours, theirs = twins
    before = _raw(ours)
    _both(ours, theirs, "-c", "first")
    qemu_io(ours, "qcow2", "write -P 9 0 2M")
    qemu_io(theirs, "qcow2", "write -P 9 0 2M")
    _both(ours, theirs, "-c", "first")  # a name may be used twice; the id differs
    _both(ours, theirs, "-c", "\u00e9" * 200)  # cut to 255 bytes, as qemu-img cuts it
    for image in twins:
        check_clean(image)
    assert _table(ours) == _table(theirs)
    assert [s["id"] for s in _table(ours)] == ["1", "2", "3"]
    assert _extra_data_sizes(ours) == _extra_data_sizes(theirs)
    assert _raw(ours, "snapshot.id=1") == _raw(theirs, "snapshot.id=1") == before
    assert _raw(ours, "snapshot.id=2") == _raw(theirs, "snapshot.id=2")
    assert _raw(ours) == _raw(theirs)
    assert qnbd_ok("snapshot", "-l", ours).splitlines()[0] == "Snapshot list:"
    dev = open_image(ours, snapshot="1")  # qnbd serve -l reads it so
    try:
        assert bytes(dev.read(0, dev.size)) == before
    finally:
        dev.close()


def test_apply_as_qemu_img(twins):
    ours, theirs = twins
    _both(ours, theirs, "-c", "s1")
    for image in twins:
        qemu_io(image, "qcow2", "write -P 7 64k 1M", "write -z 2M 64k", "discard 0 64k")
    _both(ours, theirs, "-c", "s2")
    for image in twins:
        qemu_io(image, "qcow2", "write -P 8 1M 1M")
    _both(ours, theirs, "-a", "s1")
    for image in twins:
        check_clean(image)
    assert _raw(ours) == _raw(theirs) == _raw(ours, "s1")
    _both(ours, theirs, "-a", "2")  # an id first
    assert _raw(ours) == _raw(theirs) == _raw(theirs, "s2")
    # The applied layer is written again: the snapshots keep their data.
    s1 = _raw(ours, "s1")
    qemu_io(ours, "qcow2", "write -P 5 0 4M")
    check_clean(ours)
    assert _raw(ours, "s1") == s1 and _raw(ours, "s2") == _raw(theirs, "s2")


def test_delete_as_qemu_img(twins):
    ours, theirs = twins
    for name, pattern in (("a", 4), ("b", 5), ("c", 6)):
        for image in twins:
            qemu_io(image, "qcow2", f"write -P {pattern} {pattern * 300}k 300k")
        _both(ours, theirs, "-c", name)
    _both(ours, theirs, "-d", "b")
    for image in twins:
        check_clean(image)
    assert _table(ours) == _table(theirs)
    for s in ("a", "c"):
        assert _raw(ours, s) == _raw(theirs, s)
    _both(ours, theirs, "-d", "a")
    _both(ours, theirs, "-d", "c")
    for image in twins:
        check_clean(image)  # COPIED is set again where the active layer is alone
    assert _table(ours) == [] and _raw(ours) == _raw(theirs)
    assert os.path.getsize(ours) <= os.path.getsize(theirs) + 64 * 1024


def test_apply_restores_the_snapshot_size(tmp_path):
    """qemu resizes the image to the snapshot's size when applying it."""
    image = _build(_mkdir(tmp_path / "src"), "")
    ours, theirs = _twins(tmp_path, image)
    _both(ours, theirs, "-c", "small")
    for image in (ours, theirs):
        qemu_img("resize", image, "9M")
        qemu_io(image, "qcow2", "write -P 4 7M 1M")
    _both(ours, theirs, "-a", "small")
    for image in (ours, theirs):
        check_clean(image)
    assert _raw(ours) == _raw(theirs)
    assert len(_raw(ours)) == 4 * MiB


@pytest.mark.parametrize("origin", ["qnbd", "qemu-img"])
def test_writes_through_serve_copy_shared_clusters(tmp_path, serve, origin):
    """A snapshot (made by either tool), then writes, zeroes and discards through
    `qnbd serve`: the snapshot still reads what the image held, qemu-nbd -l exports it
    unchanged, and the image is clean."""
    image = _build(_mkdir(tmp_path / "src"), "cluster_size=4096")
    before = _raw(image)
    if origin == "qnbd":
        qnbd_ok("snapshot", "-c", "snap", image)
    else:
        qemu_img("snapshot", "-c", "snap", image)
    server = serve(image)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    try:
        h.pwrite(b"\xab" * 100000, 5000)
        h.zero(64 * 1024, 2 * MiB)
        h.trim(4096, 3 * MiB)
        h.pwrite(b"\xcd" * 4096, 3 * MiB + 4096)
        h.flush()
        written = h.pread(4 * MiB, 0)
    finally:
        h.shutdown()
    server.stop()
    check_clean(image)
    assert _raw(image, "snap") == before
    assert _raw(image) == written != before
    sock = str(tmp_path / "qemu.sock")
    qemu_nbd = subprocess.Popen(["qemu-nbd", "-r", "-l", "snap", "-k", sock, image])
    try:
        wait_for_socket(sock, qemu_nbd)
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        assert h.pread(4 * MiB, 0) == before
        h.shutdown()
    finally:
        qemu_nbd.kill()
        qemu_nbd.wait()


def _errors(tmp_path):
    """(label, image, args): refusals qemu-img snapshot reports."""
    d = _mkdir(tmp_path / "err")
    plain = str(d / "plain.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", plain, "1M")
    qemu_img("snapshot", "-c", "s", plain)
    datafile = str(d / "df.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d}/df.raw", datafile, "1M")
    bitmap = str(d / "bitmap.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", bitmap, "1M")
    qemu_img("bitmap", "--add", "--disable", bitmap, "b0")
    qemu_img("snapshot", "-c", "s", bitmap)
    one_bit = str(d / "r1.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", one_bit, "1M")
    qemu_io(one_bit, "qcow2", "write 0 64k")
    two_bit = str(d / "r2.qcow2")  # 2-bit refcounts: three snapshots, no fourth
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=2", two_bit, "1M")
    qemu_io(two_bit, "qcow2", "write 0 64k")
    for name in ("a", "b"):
        qemu_img("snapshot", "-c", name, two_bit)
    raw = str(d / "disk.raw")
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    return [("apply-missing", plain, ["-a", "nope"]),
            ("delete-missing", plain, ["-d", "nope"]),
            ("delete-by-id", plain, ["-d", "1"]),  # -d looks names up only
            ("data-file-create", datafile, ["-c", "x"]),
            ("data-file-apply", datafile, ["-a", "x"]),
            ("data-file-delete", datafile, ["-d", "x"]),
            ("bitmaps-apply", bitmap, ["-a", "s"]),
            ("refcount-overflow", one_bit, ["-c", "x"]),
            ("refcount-overflow-2-bit", two_bit, ["-c", "x"]),
            ("force-share", plain, ["-U", "-c", "x"]),
            ("mixed", plain, ["-c", "x", "-d", "s"]),
            ("raw", raw, ["-c", "x"]),
            ("raw-apply", raw, ["-a", "x"]),
            ("raw-delete", raw, ["-d", "x"])]


def test_errors_as_qemu_img(tmp_path):
    for label, image, args in _errors(tmp_path):
        with open(image, "rb") as f:
            before = f.read()
        theirs = run("qemu-img", "snapshot", *args, image, check=False)
        with open(image, "wb") as f:  # qemu may leak a cluster on a failed create
            f.write(before)
        p = qnbd_subprocess("snapshot", *args, image)
        assert p.returncode == theirs.returncode == 1, (label, p.stderr, theirs.stderr)
        # One error line each (a probed raw image also gets qemu's warning first).
        ours_lines = [line for line in p.stderr.splitlines()
                      if line.startswith("qnbd snapshot: ")]
        their_lines = [line for line in theirs.stderr.splitlines()
                       if line.startswith("qemu-img: ")]
        assert len(ours_lines) == 1 and "Traceback" not in p.stderr, (label, p.stderr)
        assert ours_lines[0].removeprefix("qnbd snapshot: ") == \
            their_lines[0].removeprefix("qemu-img: "), label
        if label == "bitmaps-apply":  # opened read-write: the bitmaps were stored again
            check_clean(image)
            assert "b0" in run("qemu-img", "info", image).stdout
        elif not label.startswith("raw"):
            with open(image, "rb") as f:
                assert f.read() == before, f"{label}: qnbd changed the image"


def test_create_refuses_while_locked(tmp_path):
    """qemu-img takes the write lock to change snapshots; so does qnbd."""
    image = _build(_mkdir(tmp_path / "src"), "")
    sock = str(tmp_path / "q.sock")
    holder = subprocess.Popen(["qemu-nbd", "-k", sock, image])
    try:
        wait_for_socket(sock, holder)
        theirs = run("qemu-img", "snapshot", "-c", "x", image, check=False)
        rc, _, err = qnbd("snapshot", "-c", "x", image)
        assert rc == theirs.returncode == 1
        assert "lock" in err and "lock" in theirs.stderr
    finally:
        holder.kill()
        holder.wait()
    assert _table(image) == []


def _entries(image) -> list[bytes]:
    """The raw bytes of each snapshot table entry (qcow2.rst, "Snapshots")."""
    with open(image, "rb") as f:
        raw = f.read()
    count, offset = struct.unpack_from(">IQ", raw, 60)
    out = []
    for _ in range(count):
        _, _, id_len, name_len, *_, extra = struct.unpack_from(">QIHHIIQII", raw, offset)
        end = offset + 40 + extra + id_len + name_len
        out.append(raw[offset:end])
        offset = end + -end % 8
    return out


def test_unknown_extra_data_is_kept(tmp_path):
    """qcow2.rst: extra data this implementation does not know must be preserved when
    the table is rewritten. An entry is given 8 more bytes of extra data (the table
    moved to the end of the file, its refcount fixed by qemu-img check -r), then each
    tool adds a snapshot: the old entry is kept byte for byte, as qemu keeps it."""
    image = _build(_mkdir(tmp_path / "src"), "")
    qemu_img("snapshot", "-c", "old", image)
    (entry,) = _entries(image)
    head, extra_len = entry[:36], struct.unpack_from(">I", entry, 36)[0]
    names = entry[40 + extra_len:]
    unknown = b"\xfe\xed\xfa\xce\x01\x02\x03\x04"
    new_entry = head + struct.pack(">I", extra_len + 8) + \
        entry[40:40 + extra_len] + unknown + names
    with open(image, "r+b") as f:
        end = -(-f.seek(0, 2) // 65536) * 65536
        f.seek(end)
        f.write(new_entry)
        f.seek(60)
        f.write(struct.pack(">IQ", 1, end))
    run("qemu-img", "check", "-q", "-r", "all", image, check=False)
    check_clean(image)
    ours, theirs = _twins(tmp_path, image)
    _both(ours, theirs, "-c", "new")
    assert _entries(ours)[0] == _entries(theirs)[0] == new_entry
    assert _table(ours) == _table(theirs)
    for image in (ours, theirs):
        check_clean(image)


def test_damaged_snapshot_is_not_applied(tmp_path):
    """A snapshot whose L2 table maps a cluster past the end of the file: applying it is
    one error line and changes nothing (a damaged entry must not make the refcount
    structures grow to its offset)."""
    image = _build(_mkdir(tmp_path / "src"), "")
    qemu_img("snapshot", "-c", "s", image)
    qemu_io(image, "qcow2", "write -P 8 0 4M")  # the active layer has tables of its own
    with open(image, "rb") as f:
        raw = bytearray(f.read())
    _, offset = struct.unpack_from(">IQ", raw, 60)
    l1_offset = struct.unpack_from(">Q", raw, offset)[0]
    l2 = struct.unpack_from(">Q", raw, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2, 1 << 50)
    with open(image, "wb") as f:
        f.write(raw)
    p = qnbd_subprocess("snapshot", "-a", "s", image)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr and "0x4000000000000" in p.stderr
    with open(image, "rb") as f:
        assert f.read() == raw


def test_bitmaps_survive_create_and_delete_as_with_qemu(tmp_path):
    """qemu-img creates and deletes snapshots of an image with persistent bitmaps (and
    only refuses to apply one): the bitmaps stay stored, consistent, with the bits they
    had (a snapshot operation is no guest write)."""
    image = _build(_mkdir(tmp_path / "src"), "")
    qemu_img("bitmap", "--add", image, "b0")
    qemu_io(image, "qcow2", "write -P 4 1M 64k")
    ours, theirs = _twins(tmp_path, image)
    _both(ours, theirs, "-c", "s")
    _both(ours, theirs, "-d", "s")
    for image in (ours, theirs):
        check_clean(image)
    assert info_bitmaps(ours) == info_bitmaps(theirs)
    assert "in-use" not in info_bitmaps(ours)[0]["flags"]
    assert qemu_dirty_map(ours, "b0") == qemu_dirty_map(theirs, "b0") == [(MiB, 64 * 1024)]


def test_changes_of_a_big_image_show_progress_on_a_terminal(tmp_path):
    """Each change walks the L2 tables a known number of times: on a terminal its bar
    only grows and ends at 100%; with -q, or for a small image, nothing is drawn."""
    image = str(tmp_path / "big.qcow2")   # 8 MiB written in 512 B clusters: 256 L2 tables
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", image, "8M")
    qemu_io(image, "qcow2", "write -P 1 0 8M")
    for args in (["-c", "s1"], ["-c", "s2"], ["-a", "s1"], ["-d", "s2"]):
        rc, shown = qnbd_on_terminal("snapshot", *args, image)
        assert rc == 0, shown
        percents = [float(m) for m in re.findall(rb"\((\d+\.\d+)/100%\)", shown)]
        assert percents and percents[-1] == 100.0, (args, shown)
        assert percents == sorted(percents), (args, percents)
    check_clean(image)
    assert qnbd_on_terminal("snapshot", "-q", "-c", "s3", image) == (0, b"")
    small = _build(tmp_path, "")
    assert qnbd_on_terminal("snapshot", "-c", "s1", small) == (0, b"")
