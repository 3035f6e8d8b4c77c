"""`qnbd info`: describe an image like qemu-img info (same JSON keys, similar text)."""

import json
import math
import time

from ..formats import chain_info, image_info
from ..qemu_version import at_least


def add_parser(subparsers):
    p = subparsers.add_parser(
        "info", help="describe an image (like qemu-img info)",
        description="Show an image's format, sizes, qcow2 settings, backing file and "
                    "bitmaps. The image is only read.")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (probed if absent)")
    p.add_argument("--backing-chain", action="store_true",
                   help="also describe every backing file below the image")
    # qnbd info takes no lock at all, so there is nothing to force-share; accepted
    # for command lines written for qemu-img.
    p.add_argument("-U", "--force-share", action="store_true",
                   help="accepted for qemu-img compatibility (info never locks)")
    p.add_argument("filename", metavar="FILE")
    return p


def run(args) -> int:
    if args.backing_chain:
        infos = chain_info(args.filename, args.fmt)
        if args.output == "json":
            print(json.dumps(infos, indent=4))
        else:
            print("\n".join(human(info) for info in infos), end="")
    else:
        info = image_info(args.filename, args.fmt)
        print(json.dumps(info, indent=4) if args.output == "json" else human(info), end="")
        if args.output == "json":
            print()
    return 0


def size_to_str(value: int) -> str:
    """qemu's size_to_str (util/cutils.c): three significant digits in the largest
    binary unit that keeps the number below 1000."""
    exponent = math.frexp(value / (1000 / 1024))[1]
    unit = max(0, exponent - 1) // 10
    return f"{value / (1 << (unit * 10)):.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[unit]}B"


def human(info: dict) -> str:
    """qemu-img info's text layout (block/qapi.c, bdrv_image_info_dump)."""
    lines = [f"image: {info['filename']}",
             f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} "
             f"({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    if "snapshots" in info:
        lines += snapshot_list(info["snapshots"])
    if "format-specific" in info:
        lines.append("Format specific information:")
        _dump(info["format-specific"]["data"], 1, lines)
    return "\n".join(lines) + "\n"


def snapshot_list(snapshots: list[dict]) -> list[str]:
    """qemu's "Snapshot list:" table (block/qapi.c, bdrv_snapshot_dump): dates in local
    time, the VM clock as hours:minutes:seconds.milliseconds. qemu 9.0 (commit "qemu-img:
    Fix Column Width and Improve Formatting in snapshot list") renamed the "VM SIZE" and
    "VM CLOCK" columns, changed the widths, padded the hours to four digits and shows a
    missing icount as "--"; the installed qemu-img's layout is used."""
    new = at_least(9)
    if new:
        head = f"{'ID':<7} {'TAG':<16} {'VM_SIZE':>8} {'DATE':>19} {'VM_CLOCK':>15} {'ICOUNT':>10}"
    else:
        head = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    lines = ["Snapshot list:", head]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = (f"{secs // 3600:0{4 if new else 2}d}:{secs // 60 % 60:02d}:"
                 f"{secs % 60:02d}.{s['vm-clock-nsec'] // 10**6:03d}")
        icount = str(s["icount"]) if "icount" in s else "--" if new else ""
        size = size_to_str(s["vm-state-size"])
        if new:
            lines.append(f"{s['id']:<7} {s['name']:<16} {size:>8} {date:>19} {clock:>15}"
                         f" {icount:>10}")
        else:
            lines.append(f"{s['id']:<9} {s['name']:<16} {size:>8}"
                         f"{date:>20}{clock:>13}{icount:>11}")
    return lines


def _dump(value, depth: int, lines: list[str]) -> None:
    """qemu's dump_qdict/dump_qlist: nested values indented by four spaces a level,
    dashes in keys shown as spaces, list items as [index]."""
    pad = "    " * depth
    items = (value.items() if isinstance(value, dict)
             else ((f"[{i}]", v) for i, v in enumerate(value)))
    for key, v in items:
        key = key.replace("-", " ")
        if isinstance(v, (dict, list)):
            lines.append(f"{pad}{key}:")
            _dump(v, depth + 1, lines)
        elif isinstance(v, bool):
            lines.append(f"{pad}{key}: {'true' if v else 'false'}")
        else:
            lines.append(f"{pad}{key}: {v}")
