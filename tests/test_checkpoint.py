"""Checkpoints (issue 15): a live, consistent incremental backup while a client writes.

The proof the issue asks for: one connection writes in a loop (each write tagged with its
sequence number) while `checkpoint disk cp1` is taken; `disk@cp1`, read in full while the
writes go on, must equal the model after exactly k1 writes for one k1 between the writes
answered before the request was sent and those sent before its reply came. Then
`checkpoint disk cp2 --bitmap cp1`: `qemu:dirty-bitmap:cp1` on `disk@cp2` is exactly the
granules written between k1 and k2, and full + incremental restored equal the model at k2.
"""

import json
import signal

from bitmaputil import expected_dirty, info_bitmaps, qemu_dirty_map
from ctlutil import ControlClient, control_path, ctl
from writers import Writer, model, read_all
from images import MiB
from nbdserver import connect, status
from peers import check_clean, qemu_img, qemu_io, run

SIZE = 16 * MiB
G = 64 * 1024


def ranges(writes):
    return [(off, len(data)) for off, data in writes]


def instant(base, writes, lo, hi, seen: bytes) -> int:
    """The one k in [lo, hi] whose model equals `seen`."""
    image = model(base, writes[:lo])
    for k in range(lo, hi + 1):
        if k > lo:
            off, data = writes[k - 1]
            image[off:off + len(data)] = data
        if image == seen:
            return k
    raise AssertionError(f"the view matches no state between write {lo} and {hi}")


def checkpoint(c: ControlClient, writer: Writer, *args) -> tuple[int, int]:
    lo = writer.done
    reply = c.call("checkpoint", **dict(zip(("export", "name", "bitmap"), args)))
    hi = writer.sent
    assert reply["ok"], reply
    return lo, hi


def test_checkpoints_while_writing_then_full_and_incremental_restore(tmp_path, serve):
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_io(img, "qcow2", "write -P 0x11 0 6M", "write -P 0x22 10M 1M")
    with open(str(tmp_path / "base.raw"), "wb"):
        pass
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, str(tmp_path / "base.raw"))
    base = (tmp_path / "base.raw").read_bytes()
    path = control_path()
    server = serve(img, "-x", "disk", "-e", "0", "--control", path)
    c = ControlClient(path)
    writer = Writer(server.uri_for("disk"))
    writer.start()
    try:
        writer.wait_for(150)
        lo1, hi1 = checkpoint(c, writer, "disk", "cp1")
        # A full backup, read with a real peer while the writer goes on.
        full = tmp_path / "full.raw"
        run("nbdcopy", server.uri_for("disk@cp1"), str(full))
        writer.wait_for(hi1 + 150)
        seen1 = full.read_bytes()
        assert read_all(server.uri_for("disk@cp1")) == seen1   # stable under writes
        lo2, hi2 = checkpoint(c, writer, "disk", "cp2", "cp1")
        writer.wait_for(hi2 + 50)
    finally:
        writer.halt.set()
        writer.join()
    writes = writer.writes
    k1 = instant(base, writes, lo1, hi1, seen1)
    seen2 = read_all(server.uri_for("disk@cp2"))
    k2 = instant(base, writes, lo2, hi2, seen2)
    assert k2 - k1 >= 150

    # qemu:dirty-bitmap:cp1 on disk@cp2: exactly the granules written between.
    want = expected_dirty(ranges(writes[k1:k2]), G, SIZE)
    h = connect(server.uri_for("disk@cp2"), "qemu:dirty-bitmap:cp1")
    got, pos = [], 0
    while pos < SIZE:
        ext = status(h, "qemu:dirty-bitmap:cp1", pos, SIZE - pos)
        got += [(off, n) for off, n, f in ext if f & 1]
        pos = ext[-1][0] + ext[-1][1]
    merged = []
    for off, n in got:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((off, n))
    assert merged == want
    # Full + incremental restored = the image at cp2.
    restored = bytearray(seen1)
    for off, n in merged:
        restored[off:off + n] = h.pread(n, off)
    h.shutdown()
    assert restored == seen2 == model(base, writes[:k2])

    # The live export went on: it holds every write.
    assert read_all(server.uri_for("disk")) == model(base, writes)
    metrics = c.call("metrics")["result"]["exports"]["disk"]
    assert metrics["copy_before_write_bytes"] > 0
    for name in ("disk@cp1", "disk@cp2"):
        assert c.call("release", export=name)["ok"]
    assert [e["name"] for e in c.call("exports")["result"]] == ["disk"]
    c.close()
    writer.h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    # Rule 9 through qemu: cp1 stopped at cp2 (disabled), cp2 records on.
    assert {b["name"]: sorted(b["flags"]) for b in info_bitmaps(img)} == \
        {"cp1": [], "cp2": ["auto"]}
    assert qemu_dirty_map(img, "cp1") == want
    assert qemu_dirty_map(img, "cp2") == expected_dirty(ranges(writes[k2:]), G, SIZE)
    check_clean(img)


def test_checkpoint_refusals_are_one_line_and_change_nothing(tmp_path, serve):
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_img("bitmap", "--add", img, "b0")
    path = control_path()
    server = serve(img, "-x", "disk", "-e", "0", "--control", path)
    for args, code in ((("checkpoint", "nope", "cp"), "unknown-export"),
                       (("checkpoint", "disk", "cp", "--bitmap", "missing"), "failed"),
                       (("checkpoint", "disk", "b0"), "failed"),        # bitmap exists
                       (("checkpoint", "disk", "cp", "--bitmap", "cp"), "failed"),
                       (("release", "disk"), "failed"),                  # not a checkpoint
                       (("release", "disk@none"), "unknown-export")):
        r = ctl(path, *args, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"qnbd ctl: {code}: "), (args, r.stderr)
    c = ControlClient(path)
    assert [e["name"] for e in c.call("exports")["result"]] == ["disk"]
    assert [b["name"] for b in c.call("exports")["result"][0]["bitmaps"]] == ["b0"]
    # A view with a client is not released under it; twice the same name is refused.
    assert ctl(path, "checkpoint", "disk", "cp1", "--bitmap", "b0").stdout == "disk@cp1\n"
    r = ctl(path, "checkpoint", "disk", "cp1", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    h = connect(server.uri_for("disk@cp1"))
    assert h.is_read_only()
    r = ctl(path, "release", "disk@cp1", check=False)
    assert r.returncode == 1 and r.stderr.startswith("qnbd ctl: busy: ")
    r = ctl(path, "bitmap-clear", "disk", "b0", check=False)   # offered by disk@cp1
    assert r.returncode == 1 and r.stderr.startswith("qnbd ctl: busy: ")
    h.shutdown()
    ctl(path, "release", "disk@cp1")
    # SIGTERM with a view and its client still there: a clean stop all the same.
    ctl(path, "checkpoint", "disk", "cp2", "--bitmap", "cp1")
    assert "checkpoints: disk@cp2" in ctl(path, "exports").stdout
    h = connect(server.uri_for("disk@cp2"), "qemu:dirty-bitmap:cp1")
    h.pread(4096, 0)
    code, err = server.stop()
    assert code == 0, err
    assert {b["name"]: sorted(b["flags"]) for b in info_bitmaps(img)} == \
        {"b0": [], "cp1": [], "cp2": ["auto"]}
    check_clean(img)
    # Read-only exports take no checkpoint.
    ro = str(tmp_path / "ro.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", ro, str(SIZE))
    path2 = control_path()
    serve(ro, "-r", "--control", path2)
    r = ctl(path2, "checkpoint", "", "cp", check=False)
    assert r.returncode == 1 and r.stderr.startswith("qnbd ctl: not-supported: ")


def dirty_extents(uri: str, bitmap: str) -> list[tuple[int, int]]:
    """What nbdinfo (libnbd) reads as dirty in qemu:dirty-bitmap:BITMAP of a view."""
    out = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def incremental(tmp_path, uri: str, bitmap: str, backing: str, name: str, raw: str):
    """An incremental backup of the view at `uri`: its dirty extents written into a qcow2
    overlay of `backing` by qemu-io (as a backup tool keeps a chain), and patched into the
    raw restore `raw`. Returns the overlay."""
    target = str(tmp_path / name)
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", target)
    h = connect(uri)
    commands = []
    with open(raw, "r+b") as restore:
        for i, (off, n) in enumerate(dirty_extents(uri, bitmap)):
            data = h.pread(n, off)
            piece = tmp_path / f"{name}.{i}"
            piece.write_bytes(data)
            commands.append(f"write -s {piece} {off} {n}")
            restore.seek(off)
            restore.write(data)
    h.shutdown()
    qemu_io(target, "qcow2", *commands)
    return target


def test_full_and_two_incrementals_restored_with_nbdcopy_and_qemu_img(tmp_path, serve):
    """cp1 full (nbdcopy to raw, qemu-img convert to qcow2), cp2 and cp3 incremental
    while a client writes; both restores equal the view at cp3, which is the model at
    one instant. Metrics scraped meanwhile agree with what the writer counted."""
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_io(img, "qcow2", "write -P 0x11 0 6M")
    base = b"\x11" * (6 * MiB) + bytes(SIZE - 6 * MiB)
    path = control_path()
    server = serve(img, "-x", "disk", "-e", "0", "--control", path)
    c = ControlClient(path)
    writer = Writer(server.uri_for("disk"))
    writer.start()
    full_raw, full_qcow2 = str(tmp_path / "full.raw"), str(tmp_path / "full.qcow2")
    try:
        writer.wait_for(100)
        checkpoint(c, writer, "disk", "cp1")
        run("nbdcopy", server.uri_for("disk@cp1"), full_raw)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", server.uri_for("disk@cp1"),
            full_qcow2)
        chain, raw = full_qcow2, full_raw
        for name, prev in (("cp2", "cp1"), ("cp3", "cp2")):
            done = writer.done
            writer.wait_for(done + 100)
            before = writer.done   # metrics during the load: between the writer's counts
            got = c.call("metrics")["result"]["exports"]["disk"]["requests"]["write"]
            assert before <= got <= writer.sent
            lo, hi = checkpoint(c, writer, "disk", name, prev)
            chain = incremental(tmp_path, server.uri_for(f"disk@{name}"), prev, chain,
                                f"{name}.qcow2", raw)
            assert c.call("release", export=f"disk@{prev}")["ok"]
        seen3 = tmp_path / "cp3.raw"
        run("nbdcopy", server.uri_for("disk@cp3"), str(seen3))
    finally:
        writer.halt.set()
        writer.join()
    k3 = instant(base, writer.writes, lo, hi, seen3.read_bytes())
    assert k3 >= 200
    # The qcow2 chain full <- cp2 <- cp3, read by qemu-img; and the patched raw restore.
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", chain, str(seen3))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, str(seen3))
    metrics = c.call("metrics")["result"]["exports"]["disk"]
    assert metrics["requests"]["write"] == writer.done == len(writer.writes)
    assert metrics["bytes"]["write"] == sum(len(d) for _, d in writer.writes)
    c.close()
    writer.h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    check_clean(img)


def test_killed_with_views_leaves_only_bitmaps_under_rule_9(tmp_path, serve):
    """SIGKILL with two checkpoints' views open and a reader on one: the overlays die
    with the process; on disk the bitmaps loaded at open are in use (qemu refuses them
    as inconsistent), those added live were never stored, and the image is sound."""
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_img("bitmap", "--add", img, "b0")
    path = control_path()
    server = serve(img, "-x", "disk", "-e", "0", "--control", path)
    c = ControlClient(path)
    h = connect(server.uri_for("disk"))
    h.pwrite(b"\x01" * 65536, 0)
    assert c.call("checkpoint", export="disk", name="cp1", bitmap="b0")["ok"]
    h.pwrite(b"\x02" * 65536, 0)
    assert c.call("checkpoint", export="disk", name="cp2", bitmap="cp1")["ok"]
    h.pwrite(b"\x03" * 65536, 65536)
    h.flush()
    view = connect(server.uri_for("disk@cp1"))
    assert view.pread(65536, 0) == b"\x01" * 65536
    code, _ = server.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    c.close()
    assert {b["name"]: "in-use" in b["flags"] for b in info_bitmaps(img, force=True)} == \
        {"b0": True}
    r = run("qemu-nbd", "-r", "-B", "b0", "-k", str(tmp_path / "s"), img, check=False)
    assert r.returncode == 1 and "inconsistent" in r.stderr
    qemu_img("bitmap", "--remove", img, "b0")
    check_clean(img)
    r = run("qemu-io", "-f", "qcow2", "-c", "read -P 2 0 64k", "-c", "read -P 3 64k 64k",
            img)
    assert "Pattern verification failed" not in r.stdout
