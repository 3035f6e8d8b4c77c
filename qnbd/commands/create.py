"""`qnbd create`: make a new empty image, with qemu-img create's options and meaning."""

from ..block.create import create_raw
from ..errors import QnbdError
from ..qcow2.create import create as create_qcow2
from ..units import parse_size

FORMATS = ("qcow2", "raw")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "create", help="create a new empty image (like qemu-img create)",
        description="Create a new empty image. SIZE takes k, M, G, T, P or E suffixes "
                    "(powers of 1024). An existing FILE is overwritten.")
    p.add_argument("-f", dest="fmt", default="raw", metavar="FMT",
                   help="image format: qcow2 or raw (default raw, as qemu-img)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated format options: compat=0.10|1.1, cluster_size=N, "
                        "refcount_bits=N, lazy_refcounts=on|off, backing_file=F, "
                        "backing_fmt=F, compression_type=zlib|zstd")
    p.add_argument("-b", dest="backing_file", metavar="BACKING", help="backing file")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="backing file format")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("size", metavar="SIZE", nargs="?")
    return p


def _bool(name: str, value: str) -> bool:
    # QemuOpts booleans (qapi_bool_parse)
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QnbdError(f"Parameter '{name}' expects 'on' or 'off'")


def _int(name: str, value: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise QnbdError(f"Parameter '{name}' expects a number") from None


def _size(name: str, value: str) -> int:
    try:
        return parse_size(value, what=f"value for '{name}'")
    except ValueError as e:
        raise QnbdError(str(e)) from None


def _text(name: str, value: str) -> str:
    return value


# Accepted -o keys per format -> (create() argument, value parser)
OPTIONS = {
    "qcow2": {
        "size": ("size", _size),
        "compat": ("compat", _text),
        "cluster_size": ("cluster_size", _size),
        "refcount_bits": ("refcount_bits", _int),
        "lazy_refcounts": ("lazy_refcounts", _bool),
        "backing_file": ("backing_file", _text),
        "backing_fmt": ("backing_fmt", _text),
        "compression_type": ("compression_type", _text),
    },
    "raw": {"size": ("size", _size)},
}


def split_options(text: str) -> list[tuple[str, str]]:
    """QemuOpts syntax: key=value pairs separated by commas; ",," is a literal comma; a
    bare key means key=on."""
    pairs, item, i = [], [], 0
    while i <= len(text):
        if i == len(text) or (text[i] == "," and text[i + 1:i + 2] != ","):
            part = "".join(item)
            if part:
                key, sep, value = part.partition("=")
                pairs.append((key, value if sep else "on"))
            item = []
            i += 1
        elif text[i] == ",":  # ",,"
            item.append(",")
            i += 2
        else:
            item.append(text[i])
            i += 1
    return pairs


def parse_options(fmt: str, strings: list[str]) -> dict:
    known = OPTIONS[fmt]
    kwargs = {}
    for text in strings:
        for key, value in split_options(text):
            if key not in known:
                raise QnbdError(f"Invalid parameter '{key}' for format '{fmt}' "
                                f"(known: {', '.join(known)})")
            arg, parse = known[key]
            kwargs[arg] = parse(key, value)
    return kwargs


def run(args) -> int:
    if args.fmt not in FORMATS:
        raise QnbdError(f"Unknown file format '{args.fmt}' (supported: {', '.join(FORMATS)})")
    kwargs = parse_options(args.fmt, args.options)
    if args.size is not None:
        try:
            kwargs["size"] = parse_size(args.size)
        except ValueError as e:
            raise QnbdError(str(e)) from None
    if args.backing_file is not None:
        kwargs["backing_file"] = args.backing_file
    if args.backing_fmt is not None:
        kwargs["backing_fmt"] = args.backing_fmt
    if args.fmt == "raw":
        if "backing_file" in kwargs or "backing_fmt" in kwargs:
            raise QnbdError("Backing file not supported for file format 'raw'")
        if "size" not in kwargs:
            raise QnbdError("Image creation needs a size parameter")
        size = create_raw(args.filename, kwargs["size"])
        _report(args, f"fmt=raw size={size}")
        return 0
    size = create_qcow2(args.filename, kwargs.pop("size", None),
                        check_backing=not args.unsafe, **kwargs)
    described = {"cluster_size": 65536, "compression_type": "zlib", "size": size,
                 **kwargs, "lazy_refcounts": "on" if kwargs.get("lazy_refcounts") else "off"}
    _report(args, "fmt=qcow2 " + " ".join(f"{k}={v}" for k, v in described.items()))
    return 0


def _report(args, description: str) -> None:
    if not args.quiet:
        print(f"Formatting '{args.filename}', {description}")
