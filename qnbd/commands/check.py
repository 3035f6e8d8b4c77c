"""`qnbd check`: qemu-img check for qcow2 images: same options, output and exit codes
(0 clean, 1 check not completed, 2 corruptions, 3 leaks only)."""

import json
import sys

from ..qcow2.check import FIX_ALL, FIX_LEAKS, check_image

_FIX_MODES = {"leaks": FIX_LEAKS, "all": FIX_ALL}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "check", help="check (and repair) a qcow2 image (like qemu-img check)",
        description="Walk every reference in a qcow2 image, compare with the stored "
                    "refcounts and COPIED flags, and with -r repair what was found.")
    p.add_argument("-f", dest="fmt", choices=("qcow2",), default="qcow2",
                   help="image format (only qcow2 can be checked)")
    p.add_argument("-r", dest="repair", choices=tuple(_FIX_MODES),
                   help="repair leaks only, or all inconsistencies")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open even if another process holds the image (read-only)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on stdout")
    p.add_argument("filename", metavar="IMAGE")
    return p


def run(args) -> int:
    fix = _FIX_MODES.get(args.repair, 0)
    result = check_image(args.filename, fix, force_share=args.force_share,
                         progress=args.output == "human" and not args.quiet)
    for message in result.messages:
        print(message, file=sys.stderr)
    if result.check_errors:
        print("qnbd check: Check failed", file=sys.stderr)
        return 1
    if args.quiet:
        return result.exit_code
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=4))
        return result.exit_code
    if result.leaks_fixed or result.corruptions_fixed:
        print("The following inconsistencies were found and repaired:\n\n"
              f"    {result.leaks_fixed} leaked clusters\n"
              f"    {result.corruptions_fixed} corruptions\n\n"
              "Double checking the fixed image now...")
    print(result.human(), end="")
    return result.exit_code
