"""Persistent bitmap operations on a live read-write export (`bitmap-add`, ...), as
`qemu-img bitmap` does them on a closed image and qemu's block-dirty-bitmap-* QMP commands
on an open one.

They change the open image's PersistentBitmaps (qnbd/qcow2/bitmap_lifecycle.py) on the
event loop, between two requests, so no write is half-marked. Durability is rule 9's
(docs/DESIGN.md): the bitmaps loaded at open stay in_use on disk while the export is open;
what these commands change (a new bitmap, a removal, cleared or merged bits, the enabled
flag) is stored by the clean close, as qemu stores persistent bitmaps on close. A crash
before it leaves the bitmaps in_use on disk: inconsistent, only removable, never exported
as if exact.

A bitmap exported with -B is busy, as in qemu (BDRV_BITMAP_BUSY): it is not removed,
cleared, merged into, enabled or disabled under its readers.
"""

from ..block.cbw import PointInTime
from ..errors import QnbdError, printable
from .protocol import BUSY, FAILED, NOT_SUPPORTED, ControlError


def writable(export) -> None:
    """Refuse a live change to a read-only export: nothing in it changes."""
    if export.read_only:
        raise ControlError(NOT_SUPPORTED, f"export {export.name!r} is read-only")


def persistent(export):
    """The PersistentBitmaps of a live export's image, or a refusal naming why not."""
    writable(export)
    bitmaps = image_bitmaps(export)
    if bitmaps is None:
        raise ControlError(NOT_SUPPORTED, f"export {export.name!r} has no persistent "
                           "bitmaps (qcow2 images have them, not through --offset or "
                           "--snapshot)")
    return bitmaps


def image_bitmaps(export):
    """The PersistentBitmaps its writes mark, or None (raw, QED, a window, an overlay)."""
    return getattr(export.device, "bitmaps", None)


def busy_names(catalog, bitmaps) -> set[str]:
    """Bitmaps of an image offered as qemu:dirty-bitmap by any export: the export itself
    (-B) or a checkpoint's view of it (the same DirtyBitmap objects)."""
    offered = {id(b) for e in catalog.exports for b in e.bitmaps}
    return {name for name, b in bitmaps.loaded.items() if id(b) in offered}


def describe(export) -> list[dict]:
    """The image's bitmaps as `exports` lists them (no bits are read)."""
    image = getattr(export.device, "base", export.device)
    bitmaps = getattr(image, "bitmaps", None)
    if bitmaps is None:
        return []
    exported = {b.name for b in export.bitmaps}  # by this export (-B)
    if isinstance(export.device, PointInTime):
        # A checkpoint's view: only the bitmap it offers is its business.
        return [{"name": b.name, "granularity": b.granularity, "enabled": b.entry.auto,
                 "consistent": True, "exported": True} for b in export.bitmaps]
    return [{"name": e.name, "granularity": e.granularity, "enabled": e.auto,
             "consistent": e.name in bitmaps.loaded, "exported": e.name in exported}
            for e in bitmaps.describe()]


def run(catalog, export, command: str, args: dict) -> dict:
    bitmaps = persistent(export)
    name = args["name"]
    if command != "bitmap-add" and name in busy_names(catalog, bitmaps):
        raise ControlError(BUSY, f"bitmap {printable(name)!r} is exported "
                           f"(qemu:dirty-bitmap:{printable(name)}) and cannot be changed")
    try:
        if command == "bitmap-add":
            bitmaps.add(name, args.get("granularity"), bool(args.get("disabled")))
        elif command == "bitmap-remove":
            bitmaps.remove(name)
        elif command == "bitmap-clear":
            bitmaps.clear(name)
        elif command in ("bitmap-enable", "bitmap-disable"):
            bitmaps.set_enabled(name, command == "bitmap-enable")
        elif command == "bitmap-merge":
            # Every source is found before the first merge: a bad name changes nothing.
            sources = [bitmaps.get(s) for s in args["sources"]]
            for source in sources:
                bitmaps.merge(name, source)
    except QnbdError as e:
        raise ControlError(FAILED, str(e)) from None
    return {"export": export.name, "bitmap": name}
