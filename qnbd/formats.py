"""The format registry: every image format qnbd knows, by name, with what it can do
(probe, open, create, info, check). The CLI, the config file and `serve -f` read it;
adding a format is one entry here (docs/DESIGN.md, "Layers").

Probing follows qemu's block drivers' probe functions: a format is recognised by the
first bytes of the file. Formats qemu knows but qnbd has no driver for are recognised
too, so that their container bytes are never served as raw unless `-f raw` is given
(docs/DESIGN.md rule 14: a client could otherwise rewrite the container's header).
"""

import importlib
import os
import struct

from . import fileio, protocols
from .block.chain import MAX_BACKING_DEPTH, BackingChain
from .errors import ImageError
from .signatures import QCOW_MAGIC, QED_MAGIC, is_parallels

PROBE_BYTES = 512  # qemu's BLOCK_PROBE_BUF_SIZE
_U32 = struct.Struct(">I")
_U32_LE = struct.Struct("<I")
# A format's entry points, besides probe and open.
_ENTRY_POINTS = ("create", "create_options", "info", "check", "describe")


class Format:
    """One format. Its drivers' entry points are named "module:attribute" (modules under
    qnbd) and imported on first use, so that a command loads only the driver it runs:
    importing every driver (parallels' hashlib and OpenSSL, QED, the NBD client) costs
    more than a whole `qnbd check` of a sparse 1 TiB image (issue 17).

    probe(head): whether the first PROBE_BYTES of a file are this format's;
    open(path, read_only, open_backing, **options) -> BlockDevice, None: no driver;
    create(path, size, open_backing=..., **options) -> virtual size;
    create_options: -o key -> (argument, parser), qnbd/block/options.py;
    info(path, file, stat) -> qemu-img info's dict;
    check(path, fix, force_share, progress) -> CheckResult;
    describe(size, options) -> qemu-img create's "fmt=... size=..." words, where the
    format's differ from the generic ones (the CLI prints them);
    internal_snapshots: open() takes snapshot= (qemu-nbd -l)."""

    def __init__(self, name: str, probe=None, open=None, internal_snapshots=False,
                 **entry_points: str):
        self.name = name
        self.probe = probe
        self.open = open
        self.internal_snapshots = internal_snapshots
        self._entry_points = entry_points

    @property
    def has_driver(self) -> bool:
        return self.open is not None

    def __getattr__(self, name: str):
        if name not in _ENTRY_POINTS:
            raise AttributeError(name)
        where = self._entry_points.get(name)
        value = None
        if where is not None:
            module, attribute = where.split(":")
            value = getattr(importlib.import_module(module, __package__), attribute)
        setattr(self, name, value)  # found once; __getattr__ is not asked again
        return value


def _magic(magic: bytes, at: int = 0):
    return lambda head: head[at:at + len(magic)] == magic


def _qcow_version(accept):
    """qcow (version 1) and qcow2 (2 and later: qcow2_probe) share their magic."""
    return lambda head: head[:4] == QCOW_MAGIC and len(head) >= 8 \
        and accept(_U32.unpack_from(head, 4)[0])


# The open functions adapt the backing chain's call to each driver, imported then.
def _open_qcow2(path, read_only, open_backing, **options):
    from .qcow2.image import Qcow2Image
    return Qcow2Image.open(path, read_only, open_backing=open_backing, **options)


def _open_qed(path, read_only, open_backing, data_file_path=None, **options):
    from .qed.image import QedImage
    return QedImage.open(path, read_only, open_backing=open_backing, **options)


def _open_raw(path, read_only, open_backing, force_share=False, probed=None,
              **_cache_options):
    from .block.raw import RawDevice
    return RawDevice(path, read_only=read_only, force_share=force_share, probed=probed)


def _open_parallels(path, read_only, open_backing, force_share=False, **_cache_options):
    from .block.parallels import ParallelsImage
    return ParallelsImage(path, read_only=read_only, force_share=force_share)


_REGISTRY = (
    Format("qcow2", _qcow_version(lambda v: v >= 2), _open_qcow2, internal_snapshots=True,
           create=".qcow2.create:create", create_options=".qcow2.create:CREATE_OPTIONS",
           info=".qcow2.info:image_info", check=".qcow2.check:check_image"),
    Format("qed", _magic(QED_MAGIC), _open_qed,
           create=".qed.create:create", create_options=".qed.create:CREATE_OPTIONS",
           info=".qed.info:image_info", check=".qed.check:check_image",
           describe=".qed.create:describe"),
    Format("raw", None, _open_raw, create=".block.raw:create_raw",
           create_options=".block.raw:CREATE_OPTIONS", info=".block.raw:raw_info"),
    # Known to qemu, no driver here: recognised so they are never exported as raw.
    Format("qcow", _qcow_version(lambda v: v == 1)),
    Format("vmdk", lambda head: head[:4] in (b"KDMV", b"COWD")
           or head.startswith(b"# Disk DescriptorFile")),
    Format("vdi", lambda head: len(head) >= 0x44
           and _U32_LE.unpack_from(head, 0x40)[0] == 0xBEDA107F),
    Format("vpc", _magic(b"conectix")),
    Format("vhdx", _magic(b"vhdxfile")),
    Format("parallels", is_parallels, _open_parallels),
    Format("luks", _magic(b"LUKS\xba\xbe")),
    Format("bochs", _magic(b"Bochs Virtual HD Image")),
    Format("cloop", _magic(b"#!/bin/sh\n#V2.0 Format\n")),
)
FORMATS: dict[str, Format] = {f.name: f for f in _REGISTRY}
DRIVERS = tuple(f.name for f in _REGISTRY if f.has_driver)


def get(name: str) -> Format:
    """The format called `name`, with a driver; one-line errors otherwise."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ImageError(f"Unknown image format '{name}' (supported: {', '.join(DRIVERS)})")
    if not fmt.has_driver:
        raise ImageError(f"Image format '{name}' is not supported (supported: "
                         f"{', '.join(DRIVERS)})")
    return fmt


def probe(path: str) -> str:
    """The format of the file at `path`, by its first bytes as qemu probes; raw when no
    format recognises them."""
    try:
        with open(path, "rb") as f:
            head = f.read(PROBE_BYTES)
    except OSError as e:
        raise ImageError(f"Could not open '{path}': {e.strerror}") from None
    return _probe_head(path, head)


def _still_raw(head: bytes) -> bool:
    """Whether a first sector probes as raw (for writes to a probed raw image)."""
    return not any(fmt.probe is not None and fmt.probe(head) for fmt in _REGISTRY)


def _probe_head(path: str, head: bytes) -> str:
    for fmt in _REGISTRY:
        if fmt.probe is not None and fmt.probe(head):
            if not fmt.has_driver:
                raise ImageError(f"'{path}' is a {fmt.name} image, a format qnbd cannot "
                                 "open (give -f raw to use its bytes as they are)")
            return fmt.name
    return "raw"


def open_image(path: str, fmt: str | None = None, read_only: bool = True, *,
               backing_policy: str = "any", max_backing_depth: int = MAX_BACKING_DEPTH,
               **options):
    """Open `path` as `fmt` (probed when None) with its backing chain. Options go to the
    format's driver (qcow2: l2_cache_bytes, refcount_cache_bytes; qed: l2_cache_bytes;
    all: force_share; snapshot: an internal snapshot of the top image, loaded read-only,
    for the formats that have them)."""
    chain = BackingChain(_open_one, backing_policy, max_backing_depth)
    return chain.open(path, fmt, read_only, **options)


def _open_one(path: str, fmt: str | None, read_only: bool, open_backing, snapshot=None,
              **options):
    path = protocols.file_path(path)
    if protocols.protocol_of(path):
        _no_snapshots(snapshot, "raw")
        device = _open_protocol(path, fmt, read_only, **options)
    else:
        name = fmt or probe(path)
        if get(name).internal_snapshots:
            options["snapshot"] = snapshot
        else:
            _no_snapshots(snapshot, name)
        if fmt is None and name == "raw":  # a probed raw image is guarded (block/raw.py)
            options["probed"] = _still_raw
        device = get(name).open(path, read_only, open_backing, **options)
    if fmt is None and not read_only and getattr(device, "request_alignment", 1) > 1:
        # qemu's words (block/raw-format.c, raw_open) for a writable probed raw image.
        # logging is imported here, not by every command that probes (issue 17).
        import logging
        logging.getLogger("qnbd.formats").warning(
            "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, "
            "write operations on block 0 will be restricted.\n         Specify the 'raw' "
            "format explicitly to remove the restrictions.", path)
    return device


def _no_snapshots(snapshot: str | None, fmt: str) -> None:
    if snapshot is not None:
        raise ImageError(f"Failed to load snapshot: the {fmt} format has no internal "
                         "snapshots")


def _open_protocol(path: str, fmt: str | None, read_only: bool, **options):
    """Raw data over a protocol (qnbd/protocols.py); a probed one must look like raw."""
    if fmt not in (None, "raw"):
        raise ImageError(f"'{path}': the {fmt} format over the "
                         f"'{protocols.protocol_of(path)}' protocol is not supported")
    device = protocols.open_protocol(path, read_only, probed=fmt is None, **options)
    if fmt is None:
        found = _probe_head(path, device.read(0, min(PROBE_BYTES, device.size)))
        if found != "raw":
            device.close()
            raise ImageError(f"'{path}' holds a {found} image: qnbd reads only raw data "
                             "over a protocol")
    return device


def create_image(fmt: str, path: str, size: int | None, options: dict,
                 open_backing_file: bool = True) -> int:
    """Create an image; the backing file (if any) is opened to check it and learn its
    size unless `open_backing_file` is False (qemu-img create -u)."""
    driver = FORMATS.get(fmt)
    if driver is None or driver.create is None:
        creatable = ", ".join(f.name for f in _REGISTRY if f.create is not None)
        raise ImageError(f"Unknown file format '{fmt}' (supported: {creatable})")
    if options.get("backing_file") is not None and open_backing_file:
        options = dict(options, open_backing=lambda p, f: open_image(p, f, read_only=True))
    return driver.create(path, size, **options)


def image_info(path: str, fmt: str | None = None) -> dict:
    """qemu-img info's dict for one image (no lock is taken, nothing is written)."""
    driver = get(fmt or probe(path))
    file = fileio.open_file(path, writable=False)
    try:
        return driver.info(path, file, os.fstat(file.fd))
    finally:
        file.close()


def chain_info(path: str, fmt: str | None = None) -> list[dict]:
    """image_info of `path` and of each backing file below it, top first."""
    chain = [image_info(path, fmt)]
    seen = {os.path.realpath(path)}
    while "full-backing-filename" in chain[-1]:
        backing = chain[-1]["full-backing-filename"]
        if os.path.realpath(backing) in seen:
            raise ImageError(f"Backing file '{backing}' creates an infinite loop")
        if len(chain) > MAX_BACKING_DEPTH:
            raise ImageError(f"backing chain of '{path}' is deeper than {MAX_BACKING_DEPTH}")
        seen.add(os.path.realpath(backing))
        chain.append(image_info(backing, chain[-1].get("backing-filename-format")))
    return chain
