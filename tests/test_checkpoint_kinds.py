"""Checkpoints of every writable export kind (issue 15): qcow2 over a backing file, qcow2
with an external data file, QED, raw, and a `--snapshot` overlay. The view is checked
with qemu-img against the image as it was at the checkpoint, after writes, zero writes and
discards of the live export changed it; where the image keeps persistent bitmaps (qcow2)
the next checkpoint offers exactly what changed, elsewhere a checkpoint is a view only and
`--bitmap` is refused in one line (docs/DESIGN.md "Live changes and checkpoints")."""

import json

import pytest

from bitmaputil import expected_dirty
from ctlutil import ControlClient, control_path, ctl
from images import MiB
from nbdserver import connect, rss
from peers import check_clean, qemu_img, qemu_io, run
from writers import read_all

SIZE = 16 * MiB
G = 64 * 1024
# (offset, length) of the changes made after cp1: a write, a zero write, a discard, one
# over data that only the backing file or the first write holds.
CHANGES = [("write", 1 * MiB + 512, 300 * 1024), ("zero", 5 * MiB, 2 * MiB),
           ("trim", 9 * MiB, 1 * MiB), ("write", 12 * MiB - 4096, 8192)]


def make(tmp_path, kind) -> tuple[str, list[str], bool]:
    """(image, serve options, has persistent bitmaps) with data at 0..6M and 8..11M, some
    of it (for the backing kind) in the backing file only."""
    img = str(tmp_path / "disk")
    if kind == "backing":
        base = str(tmp_path / "base.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
        qemu_io(base, "qcow2", "write -P 0x5a 0 6M", "write -P 0x6b 8M 3M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", img)
        qemu_io(img, "qcow2", "write -P 0x11 2M 1M")
        return img, ["-f", "qcow2"], True
    fmt = {"data-file": "qcow2", "snapshot": "qcow2"}.get(kind, kind)
    opts = ["-o", f"data_file={tmp_path / 'data.raw'}"] if kind == "data-file" else []
    qemu_img("create", "-q", "-f", fmt, *opts, img, str(SIZE))
    qemu_io(img, fmt, "write -P 0x5a 0 6M", "write -P 0x6b 8M 3M")
    return img, ["-f", fmt] + (["-s"] if kind == "snapshot" else []), fmt == "qcow2" \
        and kind != "snapshot"


def dirty_map(uri, context) -> list[tuple[int, int]]:
    out = run("nbdinfo", "--json", f"--map={context}", uri).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


@pytest.mark.parametrize("kind", ["backing", "data-file", "qed", "raw", "snapshot"])
def test_checkpoint_view_of_every_writable_kind(tmp_path, serve, kind):
    img, opts, bitmaps = make(tmp_path, kind)
    path = control_path()
    server = serve(img, *opts, "-x", "disk", "-e", "0", "--discard", "unmap",
                   "--control", path)
    live = server.uri_for("disk")
    before = read_all(live)
    c = ControlClient(path)
    result = c.call("checkpoint", export="disk", name="cp1")["result"]
    assert result == {"export": "disk@cp1", "bitmap": "cp1" if bitmaps else None,
                      "previous": None}
    h = connect(live)
    for op, off, n in CHANGES:
        if op == "write":
            h.pwrite(bytes([0xc3]) * n, off)
        elif op == "zero":
            h.zero(n, off)
        else:
            h.trim(n, off)
    h.flush()
    after = read_all(live)
    assert after != before

    # The view, read by qemu-img as a backup tool would, is the image before the changes.
    (tmp_path / "before.raw").write_bytes(before)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri_for("disk@cp1"),
        str(tmp_path / "cp1.raw"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "before.raw"),
        str(tmp_path / "cp1.raw"))

    if bitmaps:
        assert c.call("checkpoint", export="disk", name="cp2",
                      bitmap="cp1")["result"]["bitmap"] == "cp2"
        changed = [(off, n) for _, off, n in CHANGES]
        assert dirty_map(server.uri_for("disk@cp2"), "qemu:dirty-bitmap:cp1") == \
            expected_dirty(changed, G, SIZE)
    else:
        r = ctl(path, "checkpoint", "disk", "cp2", "--bitmap", "cp1", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert r.stderr.startswith("qnbd ctl: not-supported: "), r.stderr
        r = c.call("checkpoint", export="disk", name="")
        assert r["error"] == {"code": "failed", "message": "a checkpoint needs a name"}
        assert [e["name"] for e in c.call("exports")["result"]] == ["disk", "disk@cp1"]
        assert c.call("checkpoint", export="disk", name="cp2")["result"]["bitmap"] is None
    assert read_all(server.uri_for("disk@cp2")) == after
    assert read_all(server.uri_for("disk@cp1")) == before   # still, under a second view
    for name in ("disk@cp1", "disk@cp2"):
        assert c.call("release", export=name)["ok"]
    c.close()
    h.pwrite(b"\xee" * 4096, 0)   # straight to the image again
    h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    if kind != "snapshot":
        final = bytearray(after)
        final[:4096] = b"\xee" * 4096
        (tmp_path / "final.raw").write_bytes(final)
        fmt = opts[1]
        run("qemu-img", "compare", "-f", fmt, "-F", "raw", img, str(tmp_path / "final.raw"))
        if fmt != "raw":
            check_clean(img)


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_view_of_a_huge_image_costs_memory_for_what_is_written(tmp_path, serve, snapshot):
    """8 TiB claimed (a sparse raw file): a flat map of its grains would be 128 MiB."""
    huge = 8 << 40
    img = str(tmp_path / "huge.raw")
    with open(img, "wb") as f:
        f.truncate(huge)
    path = control_path()
    server = serve(img, "-f", "raw", "-x", "disk", "-e", "0", "--control", path,
                   *(["-s"] if snapshot else []))
    c = ControlClient(path)
    before = rss(server.proc.pid)
    assert c.call("checkpoint", export="disk", name="cp1")["ok"]
    h = connect(server.uri_for("disk"))
    for off in (0, huge // 2 + 12345, huge - 4096):
        h.pwrite(b"\x5e" * 4096, off)
    view = connect(server.uri_for("disk@cp1"))
    for off in (0, huge // 2 + 12345, huge - 4096):
        assert h.pread(4096, off) == b"\x5e" * 4096
        assert view.pread(4096, off) == bytes(4096)
    assert rss(server.proc.pid) - before < 32 * MiB
    view.shutdown()
    h.shutdown()
    c.close()
