"""The control socket (issue 15): `qnbd serve --control PATH` and `qnbd ctl`.

Bitmaps changed on a live export must mean to qemu, after a clean stop, what they mean to
us (qemu-img info, qemu-nbd -B reading the stored bits), and rule 9 (docs/DESIGN.md) must
hold meanwhile: in use on disk while open, cleared by the clean close.
"""

import os
import stat

import pytest


from bitmaputil import expected_dirty, info_bitmaps, qemu_dirty_map, qnbd
from ctlutil import ControlClient, control_path, ctl, ctl_json
from images import MiB
from nbdserver import Server, connect, run_serve, short_tmpdir, wait_for_socket
from peers import check_clean, qemu_img

SIZE = 16 * MiB


def qcow2(tmp_path, name="disk.qcow2", *bitmaps):
    img = str(tmp_path / name)
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    for b in bitmaps:
        qemu_img("bitmap", "--add", "-g", "64K", img, b)
    return img


def flags(image) -> dict[str, list[str]]:
    return {b["name"]: sorted(b["flags"]) for b in info_bitmaps(image, force=True)}


def stop_clean(server):
    code, err = server.stop()
    assert code == 0, err


def test_socket_is_private_and_refuses_bad_requests_line_by_line(tmp_path, serve):
    img = qcow2(tmp_path)
    path = control_path()
    server = serve(img, "-x", "disk", "--control", path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    c = ControlClient(path)
    bad = [(b"not json\n", "bad-json"),
           (b"[1, 2]\n", "bad-request"),
           (b'{"command": "frobnicate"}\n', "unknown-command"),
           (b'{"command": "exports", "args": {"x": 1}}\n', "bad-request"),
           (b'{"command": "bitmap-add", "args": {"export": "disk"}}\n', "bad-request"),
           (b'{"command": "bitmap-add", "args": {"export": "disk", "name": "b", '
            b'"granularity": true}}\n', "bad-request"),
           (b'{"command": "bitmap-clear", "args": {"export": "nope", "name": "b"}, '
            b'"id": 42}\n', "unknown-export"),
           (b"\xff\xfe\n", "bad-json"),
           (b"{" * 100_000 + b"\n", "line-too-long")]
    for raw, code in bad:
        c.send(raw)
        reply = c.line()
        assert reply["ok"] is False and reply["error"]["code"] == code, (raw[:40], reply)
        assert "\n" not in reply["error"]["message"]
    assert reply_id(c, b'{"command": "bitmap-clear", "args": {"export": "nope", '
                       b'"name": "b"}, "id": 42}\n') == 42
    # The same connection, and the server, go on.
    assert c.call("exports")["result"][0]["name"] == "disk"
    h = connect(server.uri_for("disk"))
    h.pwrite(b"x" * 512, 0)
    assert h.pread(512, 0) == b"x" * 512
    h.shutdown()
    c.close()
    stop_clean(server)
    assert not os.path.exists(path)   # removed on exit, as the NBD socket


def reply_id(c, raw):
    c.send(raw)
    return c.line()["id"]


def test_ctl_errors_are_one_line_with_exit_1(tmp_path, serve):
    img = qcow2(tmp_path, "d.qcow2", "b0")
    path = control_path()
    serve(img, "-x", "disk", "-r", "--control", path)
    for args, code in ((("bitmap-add", "nope", "x"), "unknown-export"),
                       (("bitmap-add", "disk", "x"), "not-supported")):
        r = ctl(path, *args, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"qnbd ctl: {code}: "), r.stderr
    r = ctl(str(tmp_path / "no-such-socket"), "exports", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_live_bitmap_operations_are_stored_on_clean_close(tmp_path, serve):
    img = qcow2(tmp_path, "disk.qcow2", "old", "gone")
    path = control_path()
    server = serve(img, "-x", "disk", "--control", path)
    # Rule 9: what was loaded is in use on disk while the export is open.
    assert flags(img) == {"old": ["auto", "in-use"], "gone": ["auto", "in-use"]}
    h = connect(server.uri_for("disk"))
    h.pwrite(b"a" * 4096, 1 * MiB)                       # old only
    ctl(path, "bitmap-add", "disk", "new", "-g", "128k")
    ctl(path, "bitmap-add", "disk", "off", "--disabled")
    ctl(path, "bitmap-add", "disk", "merged", "--disabled")
    h.pwrite(b"b" * 100, 5 * MiB + 10)                   # old, new
    ctl(path, "bitmap-disable", "disk", "new")
    h.pwrite(b"c" * 100, 9 * MiB)                        # old
    ctl(path, "bitmap-clear", "disk", "old")
    h.pwrite(b"d" * 70000, 12 * MiB - 5)                 # old (after the clear)
    ctl(path, "bitmap-enable", "disk", "new")
    h.zero(4096, 14 * MiB)                               # old, new
    ctl(path, "bitmap-remove", "disk", "gone")
    ctl(path, "bitmap-merge", "disk", "merged", "new", "old")
    info = ctl_json(path, "exports")[0]
    assert {b["name"]: b["enabled"] for b in info["bitmaps"]} == \
        {"old": True, "new": True, "off": False, "merged": False}
    h.flush()
    h.shutdown()
    stop_clean(server)

    assert flags(img) == {"old": ["auto"], "new": ["auto"], "off": [], "merged": []}
    assert {b["name"]: b["granularity"] for b in info_bitmaps(img)} == \
        {"old": 65536, "new": 131072, "off": 65536, "merged": 65536}
    old = [(12 * MiB - 5, 70000), (14 * MiB, 4096)]
    new = [(5 * MiB + 10, 100), (14 * MiB, 4096)]
    assert qemu_dirty_map(img, "old") == expected_dirty(old, 65536, SIZE)
    assert qemu_dirty_map(img, "new") == expected_dirty(new, 131072, SIZE)
    assert qemu_dirty_map(img, "off") == []
    # A merge sets a target granule wherever a source granule overlaps it.
    assert qemu_dirty_map(img, "merged") == expected_dirty(
        expected_dirty(new, 131072, SIZE) + old, 65536, SIZE)
    check_clean(img)


def test_exported_bitmap_is_busy(tmp_path, serve):
    img = qcow2(tmp_path, "disk.qcow2", "b0")
    path = control_path()
    server = serve(img, "-B", "b0", "--control", path)
    for op in ("bitmap-remove", "bitmap-clear", "bitmap-disable"):
        r = ctl(path, op, "", "b0", check=False)
        assert r.returncode == 1 and r.stderr.startswith("qnbd ctl: busy: "), r.stderr
    info = ctl_json(path, "exports")[0]
    assert info["bitmaps"] == [{"name": "b0", "granularity": 65536, "enabled": True,
                                "consistent": True, "exported": True}]
    stop_clean(server)
    assert flags(img) == {"b0": ["auto"]}


def test_raw_and_inconsistent_bitmaps_are_refused(tmp_path, serve):
    raw = str(tmp_path / "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    path = control_path()
    serve(raw, "-f", "raw", "--control", path)
    r = ctl(path, "bitmap-add", "", "b", check=False)
    assert r.returncode == 1 and r.stderr.startswith("qnbd ctl: not-supported: ")
    r = ctl(path, "bitmap-merge", "", "b", "x", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_clients_report_peer_export_and_bytes(tmp_path, serve):
    img = qcow2(tmp_path)
    path = control_path()
    server = serve(img, "-x", "disk", "-e", "2", "--control", path)
    assert ctl_json(path, "clients") == []
    h = connect(server.uri_for("disk"))
    h.pwrite(b"z" * 131072, 0)
    h.pread(131072, 0)   # data, not holes: every byte is sent
    clients = ctl_json(path, "clients")
    assert len(clients) == 1
    c = clients[0]
    assert c["export"] == "disk"
    assert c["bytes_in"] >= 131072 and c["bytes_out"] >= 131072
    text = ctl(path, "clients").stdout
    assert "export 'disk'" in text and f"{c['bytes_in']} bytes in" in text
    h.shutdown()


def test_config_file_control_key(tmp_path):
    img = qcow2(tmp_path, "disk.qcow2", "b0")
    d = short_tmpdir()
    sock, path = os.path.join(d, "nbd.sock"), os.path.join(d, "ctl")
    conf = tmp_path / "q.toml"
    conf.write_text(f'control = "{path}"\n[[listen]]\nunix = "{sock}"\n'
                    f'[[export]]\nname = "a"\nimage = "{img}"\n')
    server = Server(["--config", str(conf)], sock)
    try:
        wait_for_socket(sock, server.proc)
        ctl(path, "bitmap-add", "a", "b1")
        assert [b["name"] for b in ctl_json(path, "exports")[0]["bitmaps"]] == ["b0", "b1"]
    finally:
        stop_clean(server)
    assert flags(img) == {"b0": ["auto"], "b1": ["auto"]}
    assert qnbd("check", img).returncode == 0


def test_control_mode_from_the_command_line_and_the_config_file(tmp_path, serve):
    img = qcow2(tmp_path)
    path = control_path()
    serve(img, "-x", "disk", "--control", path, "--control-mode", "0660")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert ctl_json(path, "exports")[0]["name"] == "disk"
    d = short_tmpdir()
    sock, path2 = os.path.join(d, "nbd.sock"), os.path.join(d, "ctl")
    conf = tmp_path / "q.toml"
    other = qcow2(tmp_path, "b.qcow2")   # disk.qcow2 is locked by the first server
    conf.write_text(f'[server]\ncontrol = "{path2}"\ncontrol_mode = "640"\n'
                    f'[[listen]]\nunix = "{sock}"\n[[export]]\nimage = "{other}"\n')
    server = Server(["--config", str(conf)], sock)
    try:
        wait_for_socket(sock, server.proc)
        assert ctl_json(path2, "exports")[0]["clients"] == 0
        assert stat.S_IMODE(os.stat(path2).st_mode) == 0o640
    finally:
        stop_clean(server)


@pytest.mark.parametrize("mode", ["abc", "0999", "1777", "0400", "", "06600"])
def test_bad_control_mode_is_one_line(tmp_path, mode):
    path = control_path()
    r = run_serve("--control", path, "--control-mode", mode, "null-co://")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--control-mode" in r.stderr and not os.path.exists(path)
    conf = tmp_path / "q.toml"
    conf.write_text(f'control = "{path}"\ncontrol_mode = "{mode}"\n'
                    '[[export]]\nimage = "null-co://"\n')
    r = run_serve("--config", str(conf))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "control_mode" in r.stderr and not os.path.exists(path)


def test_control_mode_without_a_control_socket_is_refused(tmp_path):
    r = run_serve("--control-mode", "0660", "null-co://")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--control-mode needs --control" in r.stderr
