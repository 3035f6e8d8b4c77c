"""Incremental backup through `qnbd serve`, the way virtnbdbackup-style tools do it with
qemu-nbd: `-B NAME` exports `qemu:dirty-bitmap:NAME`, `-A` exports `qemu:allocation-depth`
(qemu docs/interop/nbd.rst), and the answers must equal qemu-nbd's for the same image.

Every server is started through the CLI; images and reference answers come from qemu's
own tools (qemu-img, qemu-io, qemu-nbd, nbdinfo, nbdcopy).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile

import nbd
import pytest

from peers import check_clean, qemu_img, qemu_io, run
from images import MiB
from nbdserver import Server, connect, run_serve, short_tmpdir, status, wait_for_socket
from bitmaputil import expected_dirty, info_bitmaps, qemu_dirty_map, qnbd

SIZE = 16 * MiB


def nbd_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """(offset, length, flags) as nbdinfo --map reads them."""
    out = run("nbdinfo", "--json", f"--map={context}", uri).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def dirty(extents) -> list[tuple[int, int]]:
    return [(off, n) for off, n, flags in extents if flags & 1]


def in_use(image) -> dict[str, bool]:
    return {b["name"]: "in-use" in b["flags"] for b in info_bitmaps(image, force=True)}


@contextlib.contextmanager
def qemu_nbd(*args):
    """A persistent qemu-nbd on a fresh unix socket: yields its URI."""
    d = tempfile.mkdtemp(prefix="qemu-nbd-", dir="/tmp")
    sock, pid_file = os.path.join(d, "s"), os.path.join(d, "pid")
    run("qemu-nbd", "--fork", "-t", "-k", sock, "--pid-file", pid_file, *args)
    try:
        yield f"nbd+unix:///?socket={sock}"
    finally:
        with open(pid_file) as f:
            os.kill(int(f.read()), signal.SIGTERM)
        shutil.rmtree(d, ignore_errors=True)


def stop_clean(server):
    code, err = server.stop()
    assert code == 0, err


def full_map(h: nbd.NBD, context: str, size: int):
    out, pos = [], 0
    while pos < size:
        got = status(h, context, pos, size - pos)
        out += got
        pos = got[-1][0] + got[-1][1]
    return out


# --- the incremental-backup round trip ---------------------------------------------------

def test_incremental_backup_round_trip(tmp_path, serve):
    img, full = str(tmp_path / "disk.qcow2"), str(tmp_path / "full.raw")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_io(img, "qcow2", "write -P 0x11 0 3M", "write -P 0x22 8M 1M", "write -P 0x33 15M 1M")
    qemu_img("bitmap", "--add", "-g", "64K", img, "b")          # qemu's bitmap ...
    qnbd("bitmap", "--add", "-g", "1M", img, "q")  # ... and qnbd's

    # Full backup: every byte, while the bitmaps start tracking.
    server = serve(img, "-B", "b", "-B", "q")
    assert in_use(img) == {"b": True, "q": True}
    run("nbdcopy", server.uri, full)
    stop_clean(server)
    assert in_use(img) == {"b": False, "q": False}

    # The guest runs: writes, write-zeroes and trims through the server.
    server = serve(img, "--discard=unmap")
    changes = [(1 * MiB + 100, 5000), (3 * MiB - 10, 20), (12 * MiB, 2 * MiB),
               (8 * MiB + 64 * 1024, 128 * 1024), (15 * MiB + 512, 1000)]
    h = connect(server.uri)
    h.pwrite(b"\xaa" * 5000, 1 * MiB + 100)
    h.pwrite(b"\xbb" * 20, 3 * MiB - 10)
    h.zero(2 * MiB, 12 * MiB)
    h.trim(128 * 1024, 8 * MiB + 64 * 1024)
    h.flush()
    h.shutdown()
    qemu_io(server.uri, "raw", "write -P 0x44 15728640 1000")  # qemu as a client too
    changes[-1] = (15 * MiB, 1000)
    stop_clean(server)
    assert in_use(img) == {"b": False, "q": False}
    check_clean(img)

    # Incremental backup: only what the bitmap calls dirty is read.
    server = serve(img, "-r", "-B", "b", "-B", "q")
    want_b, want_q = expected_dirty(changes, 64 * 1024, SIZE), expected_dirty(changes, MiB, SIZE)
    assert dirty(nbd_map(server.uri, "qemu:dirty-bitmap:b")) == want_b
    assert dirty(nbd_map(server.uri, "qemu:dirty-bitmap:q")) == want_q
    h = connect(server.uri, "qemu:dirty-bitmap:b")
    read = 0
    with open(full, "r+b") as f:
        for off, n, flags in full_map(h, "qemu:dirty-bitmap:b", SIZE):
            if flags & 1:
                f.seek(off)
                f.write(h.pread(n, off))
                read += n
    h.shutdown()
    stop_clean(server)
    assert read == sum(n for _, n in want_b) < SIZE // 4
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", full, img],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # What qnbd stored means the same to qemu.
    assert qemu_dirty_map(img, "b") == want_b
    check_clean(img)


# --- bitmap life cycle through the server ------------------------------------------------

def test_dirty_sets_qemu_reads_back_for_several_granularities(tmp_path, serve):
    img = str(tmp_path / "g.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    granularities = {"g512": 512, "g64k": 65536, "g2m": 2 * MiB}
    for name, g in granularities.items():
        qemu_img("bitmap", "--add", "-g", str(g), img, name)
    qemu_img("bitmap", "--add", "--disable", img, "off")
    sessions = [[(0, 1), (700, 300), (5 * MiB + 4095, 2)],
                [(9 * MiB, 3 * MiB + 7), (SIZE - 1, 1)]]
    done = []
    for ranges in sessions:  # dirty sets accumulate over serve sessions
        server = serve(img, "-B", "g64k")
        h = connect(server.uri)
        for off, n in ranges:
            h.pwrite(b"\x5a" * n, off)
        h.shutdown()
        stop_clean(server)
        done += ranges
        for name, g in granularities.items():
            assert qemu_dirty_map(img, name) == expected_dirty(done, g, SIZE), name
    assert qemu_dirty_map(img, "off") == []
    # qnbd's own answer for the stored bitmaps equals qemu's.
    server = serve(img, "-r", *[a for n in granularities for a in ("-B", n)])
    for name, g in granularities.items():
        assert dirty(nbd_map(server.uri, f"qemu:dirty-bitmap:{name}")) == \
            expected_dirty(done, g, SIZE)
    stop_clean(server)
    check_clean(img)


def test_bitmap_left_in_use_by_killed_server_is_refused_then_removable(tmp_path, serve):
    img = str(tmp_path / "k.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_img("bitmap", "--add", img, "b")
    server = serve(img, "-B", "b")
    h = connect(server.uri)
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    code, _ = server.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert in_use(img) == {"b": True}
    r = run_serve("-k", str(tmp_path / "s"), "-B", "b", img)
    assert (r.returncode, r.stderr) == (1, "qnbd serve: Bitmap 'b' is inconsistent and "
                                           "cannot be used\n")
    assert in_use(img) == {"b": True}  # kept untouched until removed
    qnbd("bitmap", "--remove", img, "b")
    assert info_bitmaps(img) == []
    check_clean(img)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_unknown_bitmap_is_a_startup_error(tmp_path, fmt):
    img = str(tmp_path / f"u.{fmt}")
    qemu_img("create", "-q", "-f", fmt, img, str(SIZE))
    if fmt == "qcow2":
        qemu_img("bitmap", "--add", img, "other")
    # -f: a probed raw image would first warn about probing, as qemu-nbd does.
    r = run_serve("-k", str(tmp_path / "s"), "-f", fmt, "-B", "nope", img)
    assert (r.returncode, r.stderr) == (1, "qnbd serve: Bitmap 'nope' is not found\n")
    if fmt == "qcow2":  # the failed start closed the image cleanly: no bitmap left in use
        assert in_use(img) == {"other": False}
        check_clean(img)


# --- allocation depth and base:allocation against qemu-nbd -------------------------------

@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_allocation_depth_and_base_allocation_over_a_chain_equal_qemu_nbd(tmp_path, serve,
                                                                          base_fmt):
    base, mid, top = (str(tmp_path / n) for n in (f"base.{base_fmt}", "mid.qcow2", "top.qcow2"))
    qemu_img("create", "-q", "-f", base_fmt, base, str(SIZE))
    qemu_io(base, base_fmt, "write -P 1 0 2M", "write -P 1 10M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", base_fmt, mid)
    qemu_io(mid, "qcow2", "write -P 2 1M 2M", "write -z 6M 1M", "write -P 2 14M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 3 512k 1M", "write -z 10M 512k", "write -P 3 6M 64k",
            "discard 14M 64k")
    server = serve(top, "-r", "-A")
    ours = {c: nbd_map(server.uri, c) for c in ("qemu:allocation-depth", "base:allocation")}
    with qemu_nbd("-r", "-A", "-f", "qcow2", top) as uri:
        theirs = {c: nbd_map(uri, c) for c in ours}
    assert ours == theirs
    assert {flags for _, _, flags in ours["qemu:allocation-depth"]} == {0, 1, 2, 3} \
        if base_fmt == "qcow2" else {1, 2, 3}


# --- metadata context negotiation against qemu-nbd ---------------------------------------

QUERIES = [[], ["base:"], ["qemu:"], ["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:a"],
           ["qemu:allocation-depth"], ["qemu:dirty-bitmap:b", "base:allocation"],
           ["qemu:dirty-bitmap:zz", "x-other:", ""], ["qemu:allocation-depth:"],
           ["base:allocation:"], ["qemu:dirty-bitmap"], ["base:", "qemu:", "base:allocation"]]
CONTEXTS = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b"]


def negotiate(uri: str, queries) -> tuple[list[str], list[str], list]:
    """(LIST answer, contexts SET selected, one REQ_ONE and one full BLOCK_STATUS per
    selected context)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    listed = []
    h.opt_list_meta_context(lambda name: listed.append(name) or 0)
    h.opt_go()  # SET_META_CONTEXT with the same queries, then GO
    selected = [c for c in CONTEXTS if h.can_meta_context(c)]
    answers = [(status(h, c, 3 * MiB, 4 * MiB, nbd.CMD_FLAG_REQ_ONE),
                status(h, c, 3 * MiB, 4 * MiB)) for c in selected]
    h.shutdown()
    return listed, selected, answers


def test_list_and_set_meta_context_answer_like_qemu_nbd(tmp_path, serve):
    img = str(tmp_path / "m.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_img("bitmap", "--add", img, "a")
    qemu_img("bitmap", "--add", "-g", "1M", img, "b")
    qemu_io(img, "qcow2", "write 3M 100k", "write -z 5M 1M", "write 6M 4k")
    server = serve(img, "-r", "-A", "-B", "a", "-B", "b")
    ours = [negotiate(server.uri, q) for q in QUERIES]
    stop_clean(server)
    with qemu_nbd("-r", "-A", "-B", "a", "-B", "b", "-f", "qcow2", img) as uri:
        theirs = [negotiate(uri, q) for q in QUERIES]
    for q, a, b in zip(QUERIES, ours, theirs):
        assert a == b, q


# --- the config file ---------------------------------------------------------------------

def test_config_file_exports_bitmaps_and_allocation_depth(tmp_path):
    img = str(tmp_path / "c.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_img("bitmap", "--add", img, "a")
    qemu_img("bitmap", "--add", img, "b")
    sock = os.path.join(short_tmpdir(), "s")
    conf = tmp_path / "q.toml"
    conf.write_text(f'[[listen]]\nunix = "{sock}"\n[[export]]\nname = "d"\nimage = "{img}"\n'
                    'bitmaps = ["b", "a"]\nallocation_depth = true\n')
    server = Server(["--config", conf], sock)
    try:
        wait_for_socket(sock, server.proc)
        listed, _, _ = negotiate(server.uri_for("d"), [])
    finally:
        stop_clean(server)
    assert listed == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b",
                      "qemu:dirty-bitmap:a"]
    assert in_use(img) == {"a": False, "b": False}


@pytest.mark.parametrize("line, message", [
    ('bitmaps = "a"', "export[0].bitmaps: expected list, got 'a'"),
    ('bitmaps = ["a", 1]', "export[0].bitmaps: expected a list of bitmap names (strings)"),
    ("allocation_depth = 1", "export[0].allocation_depth: expected bool, got 1"),
])
def test_config_errors_name_the_bitmap_keys(tmp_path, line, message):
    conf = tmp_path / "bad.toml"
    conf.write_text(f'[[export]]\nimage = "x"\n{line}\n')
    r = run_serve("--config", conf)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
