"""Run `qnbd` commands for tests and compare with qemu-img.

`qnbd()` calls the real command-line entry point (argument parsing, error reporting) in
this process, because a fresh interpreter costs ~0.4 s and the matrices run it often;
`qnbd_subprocess()` runs the installed console script, for the exit-code and
no-traceback checks that only a separate process shows.
"""

import contextlib
import io
import json
import os
import pty
import subprocess
import sys

from qnbd import cli

from peers import run


def qnbd(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def qnbd_ok(*args) -> str:
    rc, out, err = qnbd(*args)
    assert rc == 0, err
    return out


def qnbd_subprocess(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qnbd.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def qnbd_on_terminal(*args) -> tuple[int, bytes]:
    """Run the CLI with its stderr on a pseudo-terminal (where progress is drawn): its
    exit code and what it wrote there."""
    leader, follower = pty.openpty()
    p = subprocess.run([sys.executable, "-m", "qnbd.cli", *map(str, args)],
                       stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    try:
        while chunk := os.read(leader, 4096):
            shown += chunk
    except OSError:  # EIO once the writer side is gone
        pass
    finally:
        os.close(leader)
    return p.returncode, shown




# qemu-img 8.0 and later also describe each image's protocol node (the `file` child: its
# length and disk usage), as "children" in JSON and "Child node '/file':" sections in text.
# qnbd opens files directly and has no node graph, so comparisons with qemu-img's answer
# leave those parts out, whichever qemu is installed.

def qemu_img_info(path, *extra, cwd=None):
    p = run("qemu-img", "info", "--output=json", *extra, path, cwd=cwd, check=False)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    for image in info if isinstance(info, list) else [info]:
        image.pop("children", None)
    return info


def qemu_img_info_text(path, *extra, cwd=None) -> str:
    p = run("qemu-img", "info", *extra, path, cwd=cwd)
    assert p.returncode == 0, p.stderr
    lines, in_child = [], False
    for line in p.stdout.splitlines(keepends=True):
        if line.startswith("Child node '"):
            in_child = True
        elif in_child and not line.startswith(" "):
            in_child = False
        if not in_child:
            lines.append(line)
    return "".join(lines)


def qemu_img_check(path) -> subprocess.CompletedProcess:
    return run("qemu-img", "check", path, check=False)
