"""Images qemu-nbd opens besides files of qcow2 and raw (issue 13, item 6): null-co://,
parallels images (read-only) and backing files named by NBD URIs, served by qemu-nbd and by
qnbd and compared as a client sees them; what qnbd cannot open fails at once in one line."""

import json
import os
import socket
import subprocess

import pytest

from nbdserver import make_raw, run_serve, short_tmpdir
from peers import both, run

MiB = 1 << 20


def seen(running, *, content=True) -> dict:
    """What a client learns of the default export: size, minimum block size, the
    allocation map (nbdinfo's text) and, optionally, the bytes."""
    uri = f"nbd+unix:///?socket={running.sock}"
    info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    out = {"size": info["export-size"], "min": info["block_size_minimum"],
           "map": run("nbdinfo", "--map", uri).stdout}
    if content:
        out["data"] = subprocess.run(["nbdcopy", uri, "-"], capture_output=True).stdout
    return out


@pytest.mark.parametrize("image", [
    ["null-co://"], ["-r", "null-co://"],
    ["--image-opts", "driver=null-co,size=1M,read-zeroes=on"],
    ['json:{"driver": "null-co", "size": 65536}'],
], ids=lambda a: " ".join(a))
def test_null_co_as_qemu_nbd(servers, image):
    """Reads are not compared: qemu leaves them undefined without read-zeroes=on."""
    answers = []
    for program in ("qemu-nbd", "qnbd"):
        running = servers(program, *image)
        answers.append(seen(running, content=False))
        uri = f"nbd+unix:///?socket={running.sock}"
        wrote = run("qemu-io", "-f", "raw", "-c", "write -P 5 0 4k", uri, check=False).returncode
        answers[-1]["warned"] = "probing guessed raw" in running.stop()
        answers[-1]["wrote"] = wrote
    assert answers[0] == answers[1]


@pytest.fixture
def parallels_image(tmp_path):
    img = tmp_path / "disk.parallels"
    run("qemu-img", "create", "-q", "-f", "parallels", img, "8M")
    run("qemu-io", "-f", "parallels", "-c", "write -P 9 1M 64k", "-c", "write -P 8 5M 1k",
        "-c", "write -P 7 8064k 128k", img)
    return str(img)


@pytest.mark.parametrize("args", [["-r", "-f", "parallels"], ["-r"], ["-s"]])
def test_parallels_as_qemu_nbd(servers, parallels_image, args):
    answers = [seen(servers(program, *args, parallels_image))
               for program in ("qemu-nbd", "qnbd")]
    assert answers[0] == answers[1]
    converted = parallels_image + ".raw"
    run("qemu-img", "convert", "-f", "parallels", "-O", "raw", parallels_image, converted)
    with open(converted, "rb") as f:
        assert answers[1]["data"] == f.read()


def test_parallels_writable_refused_in_one_line(parallels_image):
    """qemu-nbd would serve it read-write; qnbd says in one line that it does not."""
    ours = run_serve("-k", os.path.join(short_tmpdir(), "s"), parallels_image)
    assert ours.returncode == 1
    assert ours.stderr.count("\n") == 1 and "read-only" in ours.stderr, ours.stderr


@pytest.fixture
def nbd_backed(servers, tmp_path):
    """A raw base served by qemu-nbd, and qcow2 images whose backing file is its URI."""
    base = make_raw(tmp_path / "base.raw", MiB, os.urandom(MiB))
    backing = servers("qemu-nbd", "-r", "-e", "0", "-f", "raw", base)
    uri = f"nbd+unix:///?socket={backing.sock}"

    def top(name: str) -> str:
        path = tmp_path / name
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", path, "1M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 64k 64k", path)
        return str(path)
    return top


@pytest.mark.parametrize("args", [["-r"], ["-A"]])
def test_nbd_uri_backing_as_qemu_nbd(servers, nbd_backed, args):
    answers = [seen(servers(program, "-e", "0", *args, nbd_backed(f"{program}.qcow2")))
               for program in ("qemu-nbd", "qnbd")]
    assert answers[0] == answers[1]


def test_nbd_uri_backing_policy_and_unreachable(nbd_backed, tmp_path):
    top = nbd_backed("top.qcow2")
    sock = os.path.join(short_tmpdir(), "s")
    _, ours = both("-k", sock, "--backing-policy", "same-dir", top)
    assert ours.returncode == 1 and "not allowed by the backing policy" in ours.stderr
    gone = tmp_path / "gone.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
        f"nbd+unix:///?socket={tmp_path}/none.sock", "-F", "raw", gone, "1M")
    qemu, ours = both("-k", sock, gone)
    assert qemu.returncode == ours.returncode == 1
    assert ours.stderr.count("\n") == 1, ours.stderr


@pytest.mark.parametrize("image", ["foo://bar", "ssh://host/x"])
def test_unknown_protocols_fail_in_one_line(image):
    qemu, ours = both("-k", os.path.join(short_tmpdir(), "s"), image)
    assert qemu.returncode == ours.returncode == 1
    assert ours.stderr.count("\n") == 1 and "Traceback" not in ours.stderr


def test_nbd_uri_that_never_answers_fails(monkeypatch):
    """A server that accepts and says nothing fails the open after a deadline."""
    from qnbd.block import nbd_client
    from qnbd.errors import ImageError
    monkeypatch.setattr(nbd_client, "CONNECT_TIMEOUT", 0.5)
    path = os.path.join(short_tmpdir(), "mute.sock")
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(path)
        mute.listen()
        with pytest.raises(ImageError, match="no NBD handshake within 0.5 s"):
            nbd_client.NbdDevice(f"nbd+unix:///?socket={path}")
