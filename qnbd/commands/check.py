"""`qnbd check`: qemu-img check: same options, output and exit codes (0 clean, 1 check
not completed, 2 corruptions, 3 leaks only, 63 the format cannot be checked), and the
text, JSON and progress it shows."""

import sys

from .. import formats
from ..block.check_result import FIX_ALL, FIX_LEAKS, CheckResult
from .progress import ProgressBar

EXIT_NOT_SUPPORTED = 63  # qemu-img check on a format without checks

_FIX_MODES = {"leaks": FIX_LEAKS, "all": FIX_ALL}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "check", help="check (and repair) a qcow2 or qed image (like qemu-img check)",
        description="Walk every reference in a qcow2 or qed image (qcow2: compare with "
                    "the stored refcounts and COPIED flags), and with -r repair what was "
                    "found.")
    p.add_argument("-f", dest="fmt", metavar="FMT",
                   help="image format (probed if absent; qcow2 and qed can be checked)")
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
    fmt = args.fmt or formats.probe(args.filename)
    driver = formats.get(fmt)
    if driver.check is None:
        print("qnbd check: This image format does not support checks", file=sys.stderr)
        return EXIT_NOT_SUPPORTED
    progress = ProgressBar(enabled=args.output == "human" and not args.quiet)
    try:
        result = driver.check(args.filename, fix, force_share=args.force_share,
                              progress=progress)
    finally:
        progress.done()
    for message in result.messages:
        print(message, file=sys.stderr)
    if result.check_errors:
        print("qnbd check: Check failed", file=sys.stderr)
        return 1
    if args.quiet:
        return result.exit_code
    if args.output == "json":
        import json  # only for this output: start-up counts in a quick check (issue 17)
        print(json.dumps(to_json(result), indent=4))
        return result.exit_code
    if result.leaks_fixed or result.corruptions_fixed:
        print("The following inconsistencies were found and repaired:\n\n"
              f"    {result.leaks_fixed} leaked clusters\n"
              f"    {result.corruptions_fixed} corruptions\n\n"
              "Double checking the fixed image now...")
    print(human(result), end="")
    return result.exit_code


def to_json(result: CheckResult) -> dict:
    """qemu-img check --output=json: counters that are zero are left out (except
    check-errors), in the order qemu 7.2 prints them."""
    order = ("image-end-offset", "compressed-clusters", "total-clusters",
             "corruptions", "corruptions-fixed", "check-errors", "leaks", "leaks-fixed",
             "allocated-clusters", "filename", "format", "fragmented-clusters")
    out = {}
    for key in order:
        value = getattr(result, key.replace("-", "_"))
        if value or key in ("check-errors", "filename", "format"):
            out[key] = value
    return out


def human(result: CheckResult) -> str:
    """qemu-img check's text (qemu-img.c, dump_human_image_check)."""
    lines = []
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    if result.corruptions:
        lines += ["", f"{result.corruptions} errors were found on the image.",
                  "Data may be corrupted, or further writes to the image may corrupt it."]
    if result.leaks:
        lines += ["", f"{result.leaks} leaked clusters were found on the image.",
                  "This means waste of disk space, but no harm to data."]
    if result.check_errors:
        lines += ["", f"{result.check_errors} internal errors have occurred during the "
                  "check."]
    if result.total_clusters and result.allocated_clusters:
        a = result.allocated_clusters
        lines.append(f"{a}/{result.total_clusters} = {a * 100 / result.total_clusters:.2f}% "
                     f"allocated, {result.fragmented_clusters * 100 / a:.2f}% fragmented, "
                     f"{result.compressed_clusters * 100 / a:.2f}% compressed clusters")
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines) + "\n"
