"""`qnbd snapshot -l`: list an image's internal snapshots as qemu-img snapshot -l does
(qemu-img.c, dump_snapshots). Creating, applying and deleting snapshots are not
implemented yet: those options are refused by name, never ignored."""

import argparse

from ..errors import QnbdError
from ..formats import image_info
from .info import snapshot_list


def add_parser(subparsers):
    p = subparsers.add_parser(
        "snapshot", help="list internal snapshots (like qemu-img snapshot -l)",
        description="List the internal snapshots of a qcow2 image. The image is only read.")
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    for flag in ("-c", "-a", "-d"):
        p.add_argument(flag, dest=f"unsupported_{flag[1]}", metavar="SNAPSHOT",
                       help=argparse.SUPPRESS)
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (probed if absent)")
    # Listing takes no lock (as qnbd info), so there is nothing to force-share.
    p.add_argument("-U", "--force-share", action="store_true",
                   help="accepted for qemu-img compatibility (listing never locks)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="FILE")
    return p


def run(args) -> int:
    for flag in "cad":
        if getattr(args, f"unsupported_{flag}") is not None:
            raise QnbdError(f"snapshot -{flag} is not supported yet (only -l)")
    if not args.list:
        raise QnbdError("expected -l (list the snapshots)")
    snapshots = image_info(args.filename, args.fmt).get("snapshots")
    # qemu-img prints nothing for an image without snapshots, or a format without any.
    if snapshots and not args.quiet:
        print("\n".join(snapshot_list(snapshots)))
    return 0
