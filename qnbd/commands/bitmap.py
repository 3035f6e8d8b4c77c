"""`qnbd bitmap`: persistent bitmap operations, as `qemu-img bitmap`.

    qnbd bitmap (--add [-g G] [--disable] | --remove | --clear | --enable | --disable |
                 --merge SOURCE [-b SOURCE_FILE [-F FMT]]) ... [-f qcow2] IMAGE BITMAP

Several operations may be given; they are applied in command-line order, and the image is
stored once at the end (qemu-img does the same).
"""

import argparse

from ..formats import open_image, probe
from ..errors import ImageError
from ..units import parse_size


class _Operation(argparse.Action):
    """Records operations in the order they appear on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.operations = (namespace.operations or []) + [(self.dest, values)]


def add_parser(sub):
    p = sub.add_parser("bitmap", help="add, remove, clear, enable, disable or merge bitmaps")
    for name in ("add", "remove", "clear", "enable", "disable"):
        p.add_argument(f"--{name}", dest=name, nargs=0, action=_Operation,
                       help=f"{name} the bitmap")
    p.add_argument("--merge", dest="merge", metavar="SOURCE", action=_Operation,
                   help="merge the dirty bits of bitmap SOURCE into BITMAP")
    p.add_argument("-g", "--granularity", help="granularity for --add (default: the "
                   "cluster size, at least 4 KiB)")
    p.add_argument("-b", dest="source_file", help="image holding the --merge source bitmap")
    p.add_argument("-F", dest="source_format", help="format of the -b image")
    p.add_argument("-f", dest="format", help="image format (qcow2)")
    p.add_argument("image")
    p.add_argument("bitmap")
    p.set_defaults(operations=None)
    return p


def run(args) -> int:
    if not args.operations:
        raise ImageError("need at least one of --add, --remove, --clear, --enable, "
                         "--disable or --merge")
    ops = [op for op, _ in args.operations]
    if args.granularity and "add" not in ops:
        raise ImageError("granularity only makes sense with --add")
    if args.source_file and "merge" not in ops:
        raise ImageError("-b only makes sense with --merge")
    granularity = None
    if args.granularity:
        try:
            granularity = parse_size(args.granularity, "granularity")
        except ValueError as e:
            raise ImageError(str(e)) from None
    fmt = args.format or probe(args.image)
    if fmt != "qcow2":
        raise ImageError(f"bitmaps need a qcow2 image, not {fmt}")
    image = open_image(args.image, "qcow2", read_only=False)
    try:
        bitmaps = image.bitmaps
        for op, value in args.operations:
            if op == "add":
                bitmaps.add(args.bitmap, granularity)
            elif op == "remove":
                bitmaps.remove(args.bitmap)
            elif op == "clear":
                bitmaps.clear(args.bitmap)
            elif op in ("enable", "disable"):
                bitmaps.set_enabled(args.bitmap, op == "enable")
            elif op == "merge":
                _merge(bitmaps, args, value)
    finally:
        image.close()
    return 0


def _merge(bitmaps, args, source_name: str) -> None:
    if not args.source_file:
        bitmaps.merge(args.bitmap, bitmaps.get(source_name))
        return
    source = open_image(args.source_file, args.source_format, read_only=True)
    try:
        if not hasattr(source, "bitmaps"):
            raise ImageError(f"'{args.source_file}' holds no bitmaps")
        bitmaps.merge(args.bitmap, source.bitmaps.get(source_name))
    finally:
        source.close()
