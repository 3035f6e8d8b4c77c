"""`qnbd convert`: qemu-img convert between the formats of the registry, sparse, with
compressed qcow2 output (-c), a backing file for the target (-B), into an existing
target (-n) and a progress bar (-p). The copy itself is qnbd/block/copy.py."""

import os
import sys

from .. import formats
from ..block.copy import DEFAULT_SPARSE, CopyPlan, broken_bitmaps, copy, copy_bitmaps
from ..block.options import parse_options
from ..errors import QnbdError, printable
from ..units import parse_size
from .progress import ProgressBar


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="copy an image into another, maybe of another format "
                        "(like qemu-img convert)",
        description="Copy SOURCE (with its backing chain) into TARGET. Zero runs are "
                    "neither read nor written, so the target is sparse.")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="source format (probed if absent)")
    p.add_argument("-O", dest="out_fmt", metavar="FMT",
                   help="target format: qcow2 or raw (default raw; with -n probed)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="target format options, as for qnbd create")
    p.add_argument("-B", dest="backing", metavar="BACKING",
                   help="the target gets this backing file and only what the source's "
                        "top image holds is copied; BACKING must read as the source's "
                        "backing file does")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of BACKING")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the target's clusters (qcow2)")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="do not create TARGET: write into the existing image")
    p.add_argument("-S", dest="sparse", metavar="SIZE",
                   help="zero runs of this size in data are not written (default 4k; "
                        "0: write everything)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="copy this internal snapshot of SOURCE: snapshot.id=ID,"
                        "snapshot.name=NAME (either or both), or an id or name")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the persistent bitmaps too (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: leave out inconsistent bitmaps instead of failing")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the source even if another process holds it")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    return p


def run(args) -> int:
    out_fmt = args.out_fmt or (formats.probe(args.target) if args.no_create else "raw")
    if args.compress and out_fmt != "qcow2":
        raise QnbdError(f"Compression not supported for file format '{out_fmt}'")
    options = {} if args.no_create else _target_options(args, out_fmt)
    # -o backing_file=… means -B (qemu-img convert reads it from the options too).
    backing = options.get("backing_file", args.backing)
    plan = CopyPlan(zero_init=not args.no_create and backing is None,
                    target_has_backing=backing is not None,
                    sparse=_sparse(args.sparse), compress=args.compress)
    if all(map(os.path.exists, (args.source, args.target))) and \
            os.path.samefile(args.source, args.target):
        # Even with -U, where no lock would stop the target's creation.
        raise QnbdError(f"'{args.target}' is both the source and the target")
    src = formats.open_image(args.source, args.fmt, read_only=True,
                             force_share=args.force_share, snapshot=args.snapshot)
    try:
        skip = _check_bitmaps(args, src, out_fmt) if args.bitmaps else []
        if not args.no_create:
            formats.create_image(out_fmt, args.target, src.size, options)
        dst = formats.open_image(args.target, out_fmt, read_only=False)
        try:
            if dst.size < src.size:
                raise QnbdError(f"target '{args.target}' is smaller than the source "
                                f"({dst.size} < {src.size} bytes)")
            progress = ProgressBar(enabled=args.progress and not args.quiet, min_total=1)
            try:
                copy(src, dst, plan, progress)
            finally:
                progress.done()
            if args.bitmaps:
                copy_bitmaps(src, dst, skip)
        finally:
            dst.close()
    finally:
        src.close()
    return 0


def _check_bitmaps(args, src, out_fmt: str) -> list[str]:
    """qemu-img convert's checks before --bitmaps copies anything (convert_check_bitmaps);
    returns the inconsistent bitmaps to leave out (--skip-broken-bitmaps)."""
    if getattr(src, "bitmaps", None) is None:
        raise QnbdError("Source lacks bitmap support")
    if out_fmt != "qcow2":
        raise QnbdError(f"Format driver '{out_fmt}' does not support bitmaps")
    broken = broken_bitmaps(src)
    if broken and not args.skip_broken_bitmaps:
        raise QnbdError(f"Cannot copy inconsistent bitmap '{printable(broken[0])}' (try "
                        "--skip-broken-bitmaps, or remove it with qnbd bitmap --remove)")
    for name in broken:
        print(f"qnbd convert: warning: Skipping inconsistent bitmap '{printable(name)}'",
              file=sys.stderr)
    return broken


def _sparse(text: str | None) -> int:
    if text is None:
        return DEFAULT_SPARSE
    try:
        value = parse_size(text, what="buffer size for sparse output")
    except ValueError as e:
        raise QnbdError(str(e)) from None
    if value % 512:  # qemu-img: -S counts whole sectors
        raise QnbdError("-S takes a multiple of 512 bytes")
    return value


def _target_options(args, out_fmt: str) -> dict:
    """The new target's creation options: -o, then -B and -F."""
    driver = formats.FORMATS.get(out_fmt)
    options = parse_options(out_fmt, driver and driver.create_options or {}, args.options)
    if args.backing is not None:
        options["backing_file"] = args.backing
    if args.backing_fmt is not None:
        options["backing_fmt"] = args.backing_fmt
    return options
