"""`qnbd map`: qemu-img map: where each run of an image's content comes from (which layer
of the backing chain, zero or data, and where it lies in which file), in qemu-img's text
and JSON layouts (qemu-img.c, img_map and dump_map_entry)."""

import sys

from ..block.status import MapEntry, chain_status
from ..errors import QnbdError
from ..formats import open_image
from ..qemu_version import at_least
from ..units import parse_size

GiB = 1 << 30


def add_parser(subparsers):
    p = subparsers.add_parser(
        "map", help="show where an image's data lies (like qemu-img map)",
        description="Dump the metadata of IMAGE and its backing chain: for each run, the "
                    "layer it comes from (depth), whether it reads as zeros or data, and "
                    "its offset in the file holding it. The image is only read.")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (probed if absent)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open even if another process holds the image")
    p.add_argument("-s", "--start-offset", type=_size, default=0, metavar="OFFSET")
    p.add_argument("-l", "--max-length", type=_size, metavar="LENGTH")
    p.add_argument("filename", metavar="IMAGE")
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise QnbdError(str(e)) from None


def run(args) -> int:
    device = open_image(args.filename, args.fmt, read_only=True,
                        force_share=args.force_share)
    try:
        end = device.size
        if args.max_length is not None:
            end = min(end, args.start_offset + args.max_length)
        write = _JsonWriter() if args.output == "json" else _HumanWriter()
        for entry in merged(device, args.start_offset, end, write.coalesce,
                            _reports_compressed()):
            write(entry)
        return write.close()
    finally:
        device.close()


def _reports_compressed() -> bool:
    """qemu-img 8.2 and later (commit "qemu-img: map: report compressed data blocks")
    print a "compressed" key in JSON and do not merge compressed runs with others."""
    return at_least(8, 2)


def merged(device, start: int, end: int, coalesce=None, compressed: bool = False):
    """Runs from `start` to `end`, adjacent runs that qemu-img map would merge merged
    (entry_mergeable); `coalesce(current, next)` may rewrite the next run first;
    `compressed`: runs stored compressed only merge with each other."""
    current = MapEntry(start, 0, 0, False, False, False, None, None)
    pos = start
    while pos < end:
        # qemu-img probes at most 1 GiB at a time; merging hides the cuts.
        for entry in chain_status(device, pos, min(GiB, end - pos)):
            pos += entry.length
            if coalesce is not None and current.length:
                entry = coalesce(current, entry)
            if _mergeable(current, entry, compressed):
                current = current._replace(length=current.length + entry.length)
            else:
                if current.length:
                    yield current
                current = entry
    if current.length or start >= end:
        yield current


def _mergeable(a: MapEntry, b: MapEntry, compressed: bool = False) -> bool:
    return (a.length > 0 and (not compressed or a.compressed == b.compressed) and (a.zero, a.data, a.depth, a.present, a.file)
            == (b.zero, b.data, b.depth, b.present, b.file)
            and (a.offset is None) == (b.offset is None)
            and (a.offset is None or a.offset + a.length == b.offset))


class _HumanWriter:
    """dump_map_entry, OFORMAT_HUMAN: only data runs are listed, with their host offset."""

    def __init__(self):
        print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        self.failed = False

    @staticmethod
    def coalesce(current: MapEntry, entry: MapEntry) -> MapEntry:
        # qemu-img: "This format ignores the distinction between 0, ZERO and ZERO|DATA",
        # so runs that are not listed merge with each other.
        if (not entry.data or entry.zero) and (not current.data or current.zero):
            return entry._replace(data=False, zero=True)
        return entry

    def __call__(self, e: MapEntry) -> None:
        if self.failed:
            return
        if e.data and e.offset is None:
            print("qnbd map: File contains external, encrypted or compressed clusters.",
                  file=sys.stderr)
            self.failed = True
        elif e.data and not e.zero:
            print(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.file}")

    def close(self) -> int:
        return 1 if self.failed else 0


def _hex(value: int) -> str:
    """printf's %#x: "0x" before the digits, except for zero."""
    return f"{value:#x}" if value else "0"


class _JsonWriter:
    """dump_map_entry, OFORMAT_JSON: one object a line, keys in qemu-img's order."""

    coalesce = None

    def __init__(self):
        self.lines = []
        self.compressed = _reports_compressed()

    def __call__(self, e: MapEntry) -> None:
        line = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
                f'"present": {_bool(e.present)}, "zero": {_bool(e.zero)}, '
                f'"data": {_bool(e.data)}')
        if self.compressed:
            line += f', "compressed": {_bool(e.compressed)}'
        if e.offset is not None:
            line += f', "offset": {e.offset}'
        self.lines.append(line + "}")

    def close(self) -> int:
        print("[" + ",\n".join(self.lines) + "]")
        return 0


def _bool(value: bool) -> str:
    return "true" if value else "false"
