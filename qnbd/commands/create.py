"""`qnbd create`: make a new empty image, with qemu-img create's options and meaning."""

from .. import formats
from ..block.options import parse_options, parse_size_option
from ..errors import QnbdError
from ..units import parse_size


def add_parser(subparsers):
    p = subparsers.add_parser(
        "create", help="create a new empty image (like qemu-img create)",
        description="Create a new empty image. SIZE takes k, M, G, T, P or E suffixes "
                    "(powers of 1024). An existing FILE is overwritten.")
    p.add_argument("-f", dest="fmt", default="raw", metavar="FMT",
                   help="image format: qcow2, qed or raw (default raw, as qemu-img)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated format options: compat=0.10|1.1, cluster_size=N, "
                        "refcount_bits=N, lazy_refcounts=on|off, backing_file=F, "
                        "backing_fmt=F, compression_type=zlib|zstd; qed: cluster_size=N, "
                        "table_size=N, backing_file=F, backing_fmt=F")
    p.add_argument("-b", dest="backing_file", metavar="BACKING", help="backing file")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="backing file format")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("size", metavar="SIZE", nargs="?")
    return p


def run(args) -> int:
    driver = formats.FORMATS.get(args.fmt)
    known = {"size": ("size", parse_size_option), **(driver and driver.create_options or {})}
    kwargs = parse_options(args.fmt, known, args.options)
    if args.size is not None:
        try:
            kwargs["size"] = parse_size(args.size)
        except ValueError as e:
            raise QnbdError(str(e)) from None
    if args.backing_file is not None:
        kwargs["backing_file"] = args.backing_file
    if args.backing_fmt is not None:
        kwargs["backing_fmt"] = args.backing_fmt
    requested = kwargs.pop("size", None)
    size = formats.create_image(args.fmt, args.filename, requested, kwargs,
                                open_backing_file=not args.unsafe)
    _report(args, _describe(driver, args.fmt, size, kwargs, requested))
    return 0


def _describe(driver, fmt: str, size: int, options: dict, requested: int | None) -> str:
    """qemu-img create's "Formatting" line: the format's options with their defaults
    (a format's own `describe` gets the size as given, before rounding)."""
    if driver.describe is not None:
        return driver.describe(size if requested is None else requested, options)
    if fmt != "qcow2":
        return f"fmt={fmt} size={size}"
    onoff = {True: "on", False: "off"}
    described = {"cluster_size": options.get("cluster_size", 65536),
                 "extended_l2": onoff[bool(options.get("extended_l2"))],
                 "compression_type": options.get("compression_type", "zlib"), "size": size}
    # Then what was given, in the order of qemu's qcow2 option list, then the defaults.
    for key in ("compat", "backing_file", "backing_fmt", "data_file", "data_file_raw"):
        if key in options:
            value = options[key]
            described[key] = onoff[value] if isinstance(value, bool) else value
    described["lazy_refcounts"] = onoff[bool(options.get("lazy_refcounts"))]
    described["refcount_bits"] = options.get("refcount_bits", 16)
    return "fmt=qcow2 " + " ".join(f"{k}={v}" for k, v in described.items())


def _report(args, description: str) -> None:
    if not args.quiet:
        print(f"Formatting '{args.filename}', {description}")
