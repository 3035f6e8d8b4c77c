"""Issue 16.3: persistent bitmaps are paged from the image, never loaded whole, and an
entry qemu would refuse (block/qcow2-bitmap.c check_constraints) is refused in qemu's
words before anything is allocated for it."""

import itertools
import json
import os
import random
import struct
import subprocess
import sys

import pytest

import qnbd.fileio
from qnbd.formats import open_image

from bitmaputil import expected_dirty, info_bitmaps, qemu_dirty_map
from crashsim import Recorder, crash_states
from nbdserver import connect, status
from peers import qemu_img, qemu_io
from qcow2util import EXT_BITMAPS, extension_locations

TiB = 1 << 40
GiB = 1 << 30


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The image of the issue: 2 TiB, four bitmaps of granularity 512 (512 MiB of bits
    each), a few ranges dirtied by qemu itself."""
    path = str(tmp_path_factory.mktemp("big") / "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "2T")
    for i in range(4):
        qemu_img("bitmap", "--add", "-g", "512", path, f"b{i}")
    qemu_io(path, "qcow2", "write 1G 1M", "write 1500G 4k")
    return path


MEASURE = """
import json, resource, sys, time
from qnbd.formats import open_image
t = time.monotonic()
dev = open_image(sys.argv[1], read_only=sys.argv[2] == "ro")
opened = time.monotonic() - t
runs = [list(dev.bitmaps.get(f"b{i}").extents(0, dev.size)) for i in range(4)]
dev.close()
print(json.dumps({"open": opened, "rss_mib": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "runs": runs}))
"""


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_opening_2tib_with_four_fine_bitmaps_is_cheap(big, mode, tmp_path):
    """Loading the bits whole cost 2 GiB and over a second (5.6 s on a busy machine);
    paged, opening and listing every dirty range stays under 100 MiB and 1 s."""
    path = str(tmp_path / "copy.qcow2")
    subprocess.run(["cp", "--sparse=always", big, path], check=True)
    r = subprocess.run([sys.executable, "-c", MEASURE, path, mode], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["rss_mib"] < 100 and got["open"] < 1, got
    dirty = [(GiB, 1 << 20), (1500 * GiB, 4096)]
    for runs in got["runs"]:
        offsets = list(itertools.accumulate([0] + [n for n, _ in runs]))
        assert [(o, n) for o, (n, d) in zip(offsets, runs) if d] == dirty
    assert qemu_dirty_map(path, "b3") == dirty  # a read-write close stored them as found


def test_served_bitmaps_track_writes_in_bounded_memory(big, tmp_path, serve):
    """`qnbd serve -B` on the 2 TiB image: a client's writes show in the dirty bitmap at
    once and, after the server stops, in what qemu reads from the stored bitmap; the
    server never holds the bitmaps in memory."""
    path = str(tmp_path / "served.qcow2")
    subprocess.run(["cp", "--sparse=always", big, path], check=True)
    server = serve(path, "-B", "b0", "-B", "b2")
    h = connect(server.uri, "qemu:dirty-bitmap:b0")
    h.pwrite(b"w" * 8192, TiB + 512)
    got = status(h, "qemu:dirty-bitmap:b0", TiB - 4096, 1 << 20)
    assert [(o, n) for o, n, f in got if f & 1] == [(TiB + 512, 8192)]
    step = 4 * GiB - 65536  # an NBD request's length is 32 bits
    for offset in range(TiB, TiB + 256 * GiB, step):
        h.zero(min(step, TiB + 256 * GiB - offset), offset)  # whole chunks (256 MiB)
    h.zero(1 << 20, 2 * TiB - (1 << 20))
    with open(f"/proc/{server.proc.pid}/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    assert peak < 100 * 1024, f"server peak RSS {peak} KiB"
    expected = [(GiB, 1 << 20), (TiB, 256 * GiB), (1500 * GiB, 4096),
                (2 * TiB - (1 << 20), 1 << 20)]
    assert qemu_dirty_map(path, "b0") == expected
    assert qemu_dirty_map(path, "b1") == expected  # enabled: tracks, exported or not
    # Whole chunks set are stored as all-ones table entries, not as 512 MiB of 0xff each.
    assert os.stat(path).st_blocks * 512 < 64 << 20
    subprocess.run(["qemu-img", "check", path], check=True, capture_output=True)


def test_stopping_early_costs_only_what_was_read(tmp_path):
    """A bitmap whose bits alternate over 1 GiB: the first thousand runs come without
    walking the other two million (a reply's descriptor cap, issue 16.2)."""
    path = str(tmp_path / "alt.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "1G")
    qemu_img("bitmap", "--add", "-g", "512", path, "alt")
    dev = open_image(path, read_only=False)
    try:
        bitmap = dev.bitmaps.get("alt")
        for offset in range(0, 64 << 20, 1024):
            bitmap.set_range(offset, 512)
        first = list(itertools.islice(bitmap.extents(0, 1 << 30), 1000))
        assert first == [(512, True), (512, False)] * 500
    finally:
        dev.close()
    assert qemu_dirty_map(path, "alt")[:3] == [(0, 512), (1024, 512), (2048, 512)]


def _craft_huge_bitmap(path, table_size, gbits, in_use=False):
    """A 256 TiB image made by qemu-img whose bitmap entry is then made to claim
    granularity 2^gbits and a table of `table_size` entries (the file is extended so
    that the table fits: the entries are zero, all clear)."""
    qemu_img("create", "-q", "-f", "qcow2", path, "256T")
    qemu_img("bitmap", "--add", "-g", "65536", path, "b")
    ext_offset, _ = extension_locations(path)[EXT_BITMAPS]
    with open(path, "r+b") as f:
        f.seek(ext_offset + 16)
        directory = struct.unpack(">Q", f.read(8))[0]
        f.seek(directory)
        table_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(directory + 8)
        f.write(struct.pack(">II", table_size, 2 | int(in_use)))
        f.seek(directory + 17)
        f.write(bytes([gbits]))
        f.truncate(max(os.path.getsize(path), table_offset + table_size * 8))


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from qnbd.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("table_size,gbits,in_use", [
    (1 << 20, 9, False),   # 64 GiB of bits: a table sized for the disk, past BME_MAX_PHYS_SIZE
    (8192, 9, False),      # a table too small for the disk at that granularity
    (1 << 20, 9, True),    # in_use does not lift the size limit
])
def test_crafted_huge_bitmap_is_refused_in_qemus_words(tmp_path, table_size, gbits, in_use):
    path = str(tmp_path / "huge.qcow2")
    _craft_huge_bitmap(path, table_size, gbits, in_use)
    qemu = subprocess.run(["qemu-img", "info", path], capture_output=True, text=True)
    assert qemu.returncode == 1 and "Bitmap 'b' doesn't satisfy the constraints" in qemu.stderr
    if not in_use:  # qemu-img check fails to open it (qemu 10 aborts on the in_use one)
        qemu = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
        assert qemu.returncode == 1, qemu.stderr
        assert "Bitmap 'b' doesn't satisfy the constraints" in qemu.stderr
    for command in (["info"], ["check"], ["serve", "-r", "-k", str(tmp_path / "s")]):
        r = subprocess.run([sys.executable, "-c", LIMITED, *command, path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            f"qnbd {command[0]}: Bitmap 'b' doesn't satisfy the constraints"], r.stderr


def test_adding_a_bitmap_too_large_is_refused_as_qemu_does(tmp_path):
    path = str(tmp_path / "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "4T")
    qemu = subprocess.run(["qemu-img", "bitmap", "--add", "-g", "512", path, "b"],
                          capture_output=True, text=True)
    assert qemu.returncode == 1 and "Too much space will be occupied" in qemu.stderr
    r = subprocess.run([sys.executable, "-m", "qnbd.cli", "bitmap", "--add", "-g", "512",
                        path, "b"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "qnbd bitmap: Too much space will be occupied by the bitmap. Use larger granularity"]
    assert "bitmaps" not in json.dumps(json.loads(qemu_img(
        "info", "--output=json", path).stdout).get("format-specific", {}))


def test_power_cuts_while_storing_bitmaps(tmp_path, monkeypatch):
    """store() now keeps the data clusters of unchanged chunks and writes only changed
    ones. A power cut anywhere in the close (every state crashsim enumerates) leaves
    either the old directory (bitmaps in_use: inconsistent, as rule 9 wants) or the new
    one with exactly the new bits, and never a corruption qemu-img check reports."""
    image = str(tmp_path / "b.qcow2")
    size = 64 << 20
    # 4 KiB clusters: a chunk of the granularity-512 bitmap covers 16 MiB, so the disk
    # has four: one changed, one new, one unchanged (reused), one clear.
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, str(size))
    qemu_img("bitmap", "--add", "-g", "512", image, "fine")
    qemu_img("bitmap", "--add", "-g", "65536", image, "coarse")
    qemu_io(image, "qcow2", "write -P 1 0 4M", "write -P 2 40M 64k")
    session = [(1 << 20 | 512, 4096), (20 << 20, 8192)]
    intervals = []
    closing = False

    def interval_closed(recorder):
        if closing:
            intervals.append(recorder.interval(None))

    recorder = Recorder(interval_closed)
    real_open = qnbd.fileio.open_file
    monkeypatch.setattr(qnbd.fileio, "open_file",
                        lambda path, writable: recorder.wrap(real_open(path, writable))
                        if writable else real_open(path, writable))
    dev = open_image(image, "qcow2", read_only=False)
    for offset, length in session:
        dev.write(offset, b"s" * length)
    dev.flush()
    closing = True
    dev.close()
    closing = False
    monkeypatch.setattr(qnbd.fileio, "open_file", real_open)
    rng = random.Random(16)
    cuts = [contents[image] for iv in intervals
            for _what, contents in crash_states(iv, rng)]
    assert len(cuts) >= 12
    ranges = [(0, 4 << 20), (40 << 20, 65536)] + session
    expected = {"fine": expected_dirty(ranges, 512, size),
                "coarse": expected_dirty(ranges, 65536, size)}
    states = set()  # old directory (in_use) and new one: both must be met
    for i, cut in enumerate(cuts + [open(image, "rb").read()]):
        path = str(tmp_path / f"cut{i}.qcow2")
        with open(path, "wb") as f:
            f.write(cut)
        check = subprocess.run(["qemu-img", "check", "--output=json", path],
                               capture_output=True, text=True)
        assert check.returncode in (0, 3), f"cut {i}: {check.stdout} {check.stderr}"
        assert json.loads(check.stdout).get("corruptions", 0) == 0, f"cut {i}"
        for b in info_bitmaps(path, force=True):
            states.add("in-use" in b["flags"])
            if "in-use" not in b["flags"]:
                assert qemu_dirty_map(path, b["name"]) == expected[b["name"]], f"cut {i}"
        os.unlink(path)
    assert states == {True, False}
