"""`qnbd ctl PATH COMMAND ...`: talk to a running `qnbd serve --control PATH` (issue 15).

    qnbd ctl [--json] PATH exports | clients | metrics
    qnbd ctl PATH bitmap-add EXPORT NAME [-g SIZE] [--disabled]
    qnbd ctl PATH bitmap-remove|bitmap-clear|bitmap-enable|bitmap-disable EXPORT NAME
    qnbd ctl PATH bitmap-merge EXPORT NAME SOURCE [SOURCE ...]
    qnbd ctl PATH checkpoint EXPORT NAME [--bitmap PREV]
    qnbd ctl PATH release EXPORT@NAME

A refused request prints one line, `qnbd ctl: CODE: message`, and exits 1.
"""

import argparse
import datetime
import json

from ..control.client import request
from ..errors import QnbdError
from ..units import parse_size

_SIMPLE = ("exports", "clients", "metrics")
_BITMAP = ("bitmap-remove", "bitmap-clear", "bitmap-enable", "bitmap-disable")


def add_parser(sub):
    p = sub.add_parser("ctl", help="control a running qnbd serve --control PATH")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("path", metavar="PATH", help="the server's control socket")
    cmds = p.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    # --json after the command too (`qnbd ctl PATH exports --json`); SUPPRESS keeps a
    # --json given before it.
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="print the reply as JSON")
    cmds.add_parser = _with_parents(cmds.add_parser, json_flag)
    for name in _SIMPLE:
        cmds.add_parser(name, help=f"list the server's {name}")
    add = cmds.add_parser("bitmap-add", help="add a persistent bitmap to a live export")
    add.add_argument("export")
    add.add_argument("name")
    add.add_argument("-g", "--granularity", help="default: the cluster size, at least 4 KiB")
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    for name in _BITMAP:
        c = cmds.add_parser(name, help=f"{name.split('-')[1]} a bitmap of a live export")
        c.add_argument("export")
        c.add_argument("name")
    merge = cmds.add_parser("bitmap-merge", help="merge SOURCE bitmaps into NAME")
    merge.add_argument("export")
    merge.add_argument("name")
    merge.add_argument("sources", nargs="+", metavar="SOURCE")
    cp = cmds.add_parser("checkpoint", help="export EXPORT@NAME, the image as it is now, "
                         "read-only, and start bitmap NAME (where the image has bitmaps)")
    cp.add_argument("export")
    cp.add_argument("name")
    cp.add_argument("--bitmap", metavar="PREV", help="the previous checkpoint's bitmap: it "
                    "stops changing and EXPORT@NAME offers it as qemu:dirty-bitmap:PREV")
    rel = cmds.add_parser("release", help="drop a checkpoint's export EXPORT@NAME")
    rel.add_argument("export", metavar="EXPORT@NAME")
    return p


def _with_parents(add_parser, parent):
    def add(name, **kw):
        return add_parser(name, parents=[parent], **kw)
    return add


def run(args) -> int:
    command = args.ctl_command
    params = {}
    if command.startswith("bitmap-"):
        params = {"export": args.export, "name": args.name}
    if command == "bitmap-add":
        if args.granularity is not None:
            try:
                params["granularity"] = parse_size(args.granularity, "granularity")
            except ValueError as e:
                raise QnbdError(str(e)) from None
        if args.disabled:
            params["disabled"] = True
    elif command == "bitmap-merge":
        params["sources"] = args.sources
    elif command == "checkpoint":
        params = {"export": args.export, "name": args.name}
        if args.bitmap is not None:
            params["bitmap"] = args.bitmap
    elif command == "release":
        params = {"export": args.export}
    result = request(args.path, command, params)
    if args.json:
        print(json.dumps(result, indent=2))
    elif command == "exports":
        _print_exports(result)
    elif command == "clients":
        _print_clients(result)
    elif command == "metrics":
        print(json.dumps(result, indent=2))
    elif command == "checkpoint":
        print(result["export"])
    return 0


def _print_exports(exports) -> None:
    for e in exports:
        mode = "read-only" if e["read_only"] else "read-write"
        print(f"{e['name'] or '(default)'}: {e['image']} ({e['size']} bytes, {mode}, "
              f"{e['clients']} client(s))")
        if e.get("checkpoints"):
            print(f"    checkpoints: {', '.join(e['checkpoints'])}")
        for b in e["bitmaps"]:
            flags = [f for f, on in (("enabled", b["enabled"]), ("disabled", not b["enabled"]),
                                     ("inconsistent", not b["consistent"]),
                                     ("exported", b["exported"])) if on]
            print(f"    bitmap {b['name']}: granularity {b['granularity']}, "
                  f"{', '.join(flags)}")


def _print_clients(clients) -> None:
    for c in clients:
        since = datetime.datetime.fromtimestamp(c["since"], datetime.timezone.utc)
        print(f"{c['peer']}: export {c['export']!r}, since {since:%Y-%m-%dT%H:%M:%SZ}, "
              f"{c['bytes_in']} bytes in, {c['bytes_out']} bytes out")
