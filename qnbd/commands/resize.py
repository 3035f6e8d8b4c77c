"""`qnbd resize`: qemu-img resize for qcow2 and raw images. SIZE is absolute, or relative
with + or - (qemu-img.c, img_resize); shrinking needs --shrink and, unlike qemu-img, is
refused where it would cut off data (only an unallocated tail may go)."""

import argparse

from ..errors import QnbdError
from ..formats import open_image
from ..units import parse_size


def add_parser(subparsers):
    p = subparsers.add_parser(
        "resize", help="change an image's virtual size (like qemu-img resize)",
        description="Grow or shrink IMAGE to SIZE, or by +SIZE / -SIZE (k, M, G, T, P, E "
                    "suffixes). Give options before IMAGE: a negative SIZE is not an option.")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (probed if absent)")
    p.add_argument("--shrink", action="store_true",
                   help="allow a smaller size (only over an unallocated tail)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="IMAGE")
    # REMAINDER, as qemu-img takes SIZE out of argv by hand: "-1M" is a size, not an option.
    p.add_argument("size", nargs=argparse.REMAINDER, metavar="[+-]SIZE")
    return p


def run(args) -> int:
    words = args.size[1:] if args.size[:1] == ["--"] else args.size
    if len(words) != 1:
        raise QnbdError("expected IMAGE and one [+-]SIZE (options go before IMAGE)")
    text = words[0]
    sign = text[0] if text[:1] in ("+", "-") else ""
    try:
        amount = parse_size(text[len(sign):])
    except ValueError as e:
        raise QnbdError(str(e)) from None
    device = open_image(args.filename, args.fmt, read_only=False)
    try:
        current = device.size
        size = current + amount if sign == "+" else current - amount if sign == "-" \
            else amount
        if size < 0:
            raise QnbdError("New image size must be positive")
        if size < current and not args.shrink:
            raise QnbdError("Use the --shrink option to perform a shrink operation.")
        device.resize(size)
    finally:
        device.close()
    if not args.quiet:
        print("Image resized.")
    return 0
