"""The format registry: every image format qnbd knows, by name, with what it can do
(probe, open, create, info, check). The CLI, the config file and `serve -f` read it;
adding a format is one entry here (docs/DESIGN.md, "Layers").

Probing follows qemu's block drivers' probe functions: a format is recognised by the
first bytes of the file. Formats qemu knows but qnbd has no driver for are recognised
too, so that their container bytes are never served as raw unless `-f raw` is given
(docs/DESIGN.md rule 14: a client could otherwise rewrite the container's header).
"""

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import fileio, protocols
from .block import parallels
from .block.chain import MAX_BACKING_DEPTH, BackingChain
from .block.raw import CREATE_OPTIONS as RAW_CREATE_OPTIONS, RawDevice, create_raw, raw_info
from .errors import ImageError
from .qcow2 import check as qcow2_check
from .qcow2 import create as qcow2_create
from .qcow2 import header as qcow2_header
from .qcow2 import info as qcow2_info
from .qcow2.image import Qcow2Image
from .qed import check as qed_check
from .qed import create as qed_create
from .qed import info as qed_info
from .qed.image import QedImage

log = logging.getLogger("qnbd.formats")
PROBE_BYTES = 512  # qemu's BLOCK_PROBE_BUF_SIZE
_U32 = struct.Struct(">I")
_U32_LE = struct.Struct("<I")


@dataclass(frozen=True)
class Format:
    name: str
    probe: Callable[[bytes], bool] | None = None  # first PROBE_BYTES of the file
    # open(path, read_only, open_backing, **options) -> BlockDevice; None: no driver
    open: Callable | None = None
    # create(path, size, open_backing=..., **options) -> virtual size
    create: Callable | None = None
    create_options: dict | None = None  # -o key -> (argument, parser), qnbd/block/options.py
    info: Callable | None = None  # info(path, file, stat) -> qemu-img info's dict
    check: Callable | None = None  # check(path, fix, force_share, progress) -> CheckResult
    # describe(size, options) -> qemu-img create's "fmt=... size=..." words, where the
    # format's differ from the generic ones (the CLI prints them)
    describe: Callable | None = None
    internal_snapshots: bool = False  # open() takes snapshot= (qemu-nbd -l)

    @property
    def has_driver(self) -> bool:
        return self.open is not None


def _magic(magic: bytes, at: int = 0) -> Callable[[bytes], bool]:
    return lambda head: head[at:at + len(magic)] == magic


def _qcow_version(accept: Callable[[int], bool]) -> Callable[[bytes], bool]:
    """qcow (version 1) and qcow2 (2 and later: qcow2_probe) share their magic."""
    return lambda head: head[:4] == qcow2_header.MAGIC and len(head) >= 8 \
        and accept(_U32.unpack_from(head, 4)[0])


def _open_qcow2(path, read_only, open_backing, **options):
    return Qcow2Image.open(path, read_only, open_backing=open_backing, **options)


def _open_qed(path, read_only, open_backing, data_file_path=None, **options):
    return QedImage.open(path, read_only, open_backing=open_backing, **options)


def _open_raw(path, read_only, open_backing, force_share=False, probed=None,
              **_cache_options):
    return RawDevice(path, read_only=read_only, force_share=force_share, probed=probed)


def _open_parallels(path, read_only, open_backing, force_share=False, **_cache_options):
    return parallels.ParallelsImage(path, read_only=read_only, force_share=force_share)


_REGISTRY = (
    Format("qcow2", _qcow_version(lambda v: v >= 2), _open_qcow2, qcow2_create.create,
           qcow2_create.CREATE_OPTIONS, qcow2_info.image_info, qcow2_check.check_image,
           internal_snapshots=True),
    Format("qed", _magic(b"QED\0"), _open_qed, qed_create.create, qed_create.CREATE_OPTIONS,
           qed_info.image_info, qed_check.check_image, qed_create.describe),
    Format("raw", None, _open_raw, create_raw, RAW_CREATE_OPTIONS, raw_info),
    # Known to qemu, no driver here: recognised so they are never exported as raw.
    Format("qcow", _qcow_version(lambda v: v == 1)),
    Format("vmdk", lambda head: head[:4] in (b"KDMV", b"COWD")
           or head.startswith(b"# Disk DescriptorFile")),
    Format("vdi", lambda head: len(head) >= 0x44
           and _U32_LE.unpack_from(head, 0x40)[0] == 0xBEDA107F),
    Format("vpc", _magic(b"conectix")),
    Format("vhdx", _magic(b"vhdxfile")),
    Format("parallels", parallels.probe, _open_parallels),
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
        log.warning("WARNING: Image format was not specified for '%s' and probing guessed "
                    "raw.\n         Automatically detecting the format is dangerous for raw "
                    "images, write operations on block 0 will be restricted.\n         "
                    "Specify the 'raw' format explicitly to remove the restrictions.", path)
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
