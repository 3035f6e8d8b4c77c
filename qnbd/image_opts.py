"""Images given as block options rather than a file name: qemu-nbd --image-opts
(`driver=qcow2,file.filename=disk.qcow2,...`, QemuOpts syntax) and `json:{...}` file names
(qemu's json: pseudo-protocol, usable with or without --image-opts). qemu's block layer
reads them as a tree of nodes; qnbd opens a file in one format, so the options it takes
are those of that shape (qemu's BlockdevOptions, qapi/block-core.json):

    driver              qcow2 | raw | parallels | file (the file itself, as raw) |
                        null-co (with size and read-zeroes: qnbd/block/null.py)
    file, file.filename the image file (file.driver must be `file`); `filename` with
                        driver=file
    read-only           on | off
    offset, size        driver=raw only: a window of the file (BlockdevOptionsRaw)
    discard, detect-zeroes, cache.direct, cache.no-flush, node-name, auto-read-only,
    file.aio, file.locking, force-share   as for the command line; node names are
                        accepted and unused

Anything else is refused by name, in qemu's words, rather than ignored.
"""

import json
from dataclasses import dataclass, field

from .errors import QnbdError
from .objects import parse_opts
from .units import parse_size

_IGNORED = {"node-name", "auto-read-only", "file.aio", "file.node-name", "cache.direct",
            "file.locking", "force-share", "file.auto-read-only"}
_TRUE, _FALSE = ("on", "yes", "true", True), ("off", "no", "false", False)


@dataclass
class ImageSpec:
    """What qnbd needs from block options: the file, its format, and policy options."""
    image: str
    format: str | None = None
    read_only: bool | None = None
    offset: int = 0
    size: int | None = None
    discard: str | None = None
    detect_zeroes: str | None = None
    unsafe: bool = False              # cache.no-flush=on: flushes are not passed down
    options: dict = field(default_factory=dict)  # the driver's own (null-co: size, ...)


def is_json(name: str) -> bool:
    return name.startswith("json:")


def parse(text: str, image_opts: bool) -> ImageSpec:
    """`text` is the FILE argument: options with --image-opts, else a json: file name."""
    if is_json(text):
        try:
            doc = json.loads(text[len("json:"):])
        except ValueError as e:
            raise QnbdError(f"'{text}': Could not parse the JSON options: {e}") from None
        if not isinstance(doc, dict):
            raise QnbdError(f"'{text}': Invalid JSON object given")
        opts = _flatten(doc)
    else:
        opts = parse_opts(text)
        if "qom-type" in opts:  # the first element had no "=": qemu's implied "file"
            opts["file"] = opts.pop("qom-type")
    if not image_opts and not is_json(text):
        raise QnbdError(f"'{text}' is not a json: file name")
    return _spec(text, opts)


def _flatten(doc: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _spec(text: str, opts: dict) -> ImageSpec:
    def fail(why: str):
        raise QnbdError(f"Failed to open '{text}': {why}")

    opts = dict(opts)
    driver = opts.pop("driver", None)
    if driver is None:
        fail("Parameter 'driver' is missing")
    if driver not in ("qcow2", "raw", "parallels", "file", "null-co"):
        fail(f"Unknown driver '{driver}'" if driver else "Parameter 'driver' is missing")
    if driver == "null-co":
        return _null(opts, fail)
    if driver == "file":
        image = opts.pop("filename", None)
        fmt = "raw"
    else:
        fmt = driver
        image = opts.pop("file.filename", None) or opts.pop("file", None)
        inner = opts.pop("file.driver", "file")
        if inner != "file":
            fail(f"Block protocol '{inner}' is not supported (only 'file')")
    if not isinstance(image, str) or not image:
        fail("A block device must be specified for \"file\"" if driver != "file"
             else "The 'file' block driver requires a file name")
    spec = ImageSpec(image=image, format=fmt)
    for key in ("offset", "size"):
        if key in opts:
            if driver != "raw":
                fail(f"Block format '{driver}' does not support the option '{key}'")
            setattr(spec, key, _number(opts.pop(key), key, fail))
    if "read-only" in opts:
        spec.read_only = _flag(opts.pop("read-only"), "read-only", fail)
    if "cache.no-flush" in opts:
        spec.unsafe = _flag(opts.pop("cache.no-flush"), "cache.no-flush", fail)
    spec.discard = opts.pop("discard", None)
    spec.detect_zeroes = opts.pop("detect-zeroes", None)
    if spec.discard == "off":   # qemu's synonyms (bdrv_parse_discard_flags)
        spec.discard = "ignore"
    if spec.discard == "on":
        spec.discard = "unmap"
    for key in list(opts):
        if key in _IGNORED:
            opts.pop(key)
    if opts:
        fail(f"Block format '{fmt if driver != 'file' else 'file'}' does not support "
             f"the option '{next(iter(opts))}'")
    return spec


def _null(opts: dict, fail) -> ImageSpec:
    spec = ImageSpec(image="null-co://", format="raw")
    if "size" in opts:
        spec.options["size"] = _number(opts.pop("size"), "size", fail)
    if "read-zeroes" in opts:
        spec.options["read_zeroes"] = _flag(opts.pop("read-zeroes"), "read-zeroes", fail)
    for key in opts:
        if key not in _IGNORED:
            fail(f"Block protocol 'null-co' does not support the option '{key}'")
    return spec


def _number(value, key: str, fail) -> int:
    """A size option: a number, or text with qemu's suffixes (qnbd/units.py)."""
    try:
        number = parse_size(value) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        fail(f"Parameter '{key}' expects a non-negative number below 2^64")
    return number


def _flag(value, key: str, fail) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    fail(f"Parameter '{key}' expects 'on' or 'off'")
