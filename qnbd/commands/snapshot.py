"""`qnbd snapshot`: qemu-img snapshot for qcow2 images (qemu-img.c, img_snapshot).

    -l NAME   list the snapshots (the image is only read)
    -c NAME   create a snapshot of the active layer (names need not be unique)
    -a NAME   apply: the snapshot with that id, else that name, becomes the active layer
    -d NAME   delete the first snapshot with that name

Failures are reported in qemu-img's words (strerror of the driver's errno), one line,
exit code 1; the engine work is qnbd/qcow2/snapshot_update.py. Unlike qemu-img, a change
that walks many L2 tables (a big image) shows its progress on a terminal (not with -q).
"""

import os
import time

from ..errors import QnbdError
from ..formats import image_info, open_image
from ..qemu_version import at_least
from .info import snapshot_list
from .progress import ProgressBar

NAME_BYTES = 255  # qemu-img copies a name into QEMUSnapshotInfo.name[256] (pstrcpy)
# Steps are L2 tables walked (a 64 KiB-cluster table maps 512 MiB; each change walks the
# tables two to four times): below this, a change is quick and prints nothing.
PROGRESS_MIN_STEPS = 256


def add_parser(subparsers):
    p = subparsers.add_parser(
        "snapshot", help="list, create, apply or delete internal snapshots (like "
                         "qemu-img snapshot)",
        description="List, create, apply or delete the internal snapshots of a qcow2 "
                    "image. Listing only reads the image; the others write it, locked "
                    "as qemu-img locks it.")
    actions = (("-l", "list", "list the snapshots"),
               ("-c", "create", "create snapshot NAME"),
               ("-a", "apply", "apply snapshot NAME (an id, else a name)"),
               ("-d", "delete", "delete the snapshot named NAME"))
    for flag, dest, text in actions:
        if dest == "list":
            p.add_argument(flag, dest="actions", action="append_const", const=(dest, None),
                           help=text)
        else:
            p.add_argument(flag, dest="actions", metavar="NAME", help=text,
                           type=lambda v, d=dest: (d, v), action="append")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (probed if absent)")
    # Listing takes no lock (as qnbd info), so there is nothing to force-share; the
    # changes take the write lock, and qemu-img refuses -U with them.
    p.add_argument("-U", "--force-share", action="store_true",
                   help="accepted with -l for qemu-img compatibility; refused with "
                        "-c/-a/-d, as qemu-img refuses it")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="FILE")
    return p


def run(args) -> int:
    actions = args.actions or []
    if len(actions) > 1:
        raise QnbdError("Cannot mix '-l', '-a', '-c', '-d'")
    if not actions:
        return 0  # qemu-img snapshot without an action does nothing
    action, name = actions[0]
    if action == "list":
        snapshots = image_info(args.filename, args.fmt).get("snapshots")
        # qemu-img prints nothing for an image without snapshots, or a format without any.
        if snapshots and not args.quiet:
            print("\n".join(snapshot_list(snapshots)))
        return 0
    if args.force_share:
        raise QnbdError(f"Could not open '{args.filename}': force-share=on can only be "
                        "used with read-only images")
    image = open_image(args.filename, args.fmt, read_only=False)
    progress = ProgressBar(enabled=not args.quiet, min_total=PROGRESS_MIN_STEPS)
    try:
        _change(image, action, name, progress)
        progress.done()
    finally:
        image.close()
    return 0


def _change(image, action: str, name: str, progress: ProgressBar) -> None:
    prefix = f"Could not {action} snapshot '{name}': "
    has_snapshots = hasattr(image, "snapshot_create")  # the format has them (qcow2)
    supported = has_snapshots and image.data_storage is image.storage
    if action == "delete":
        # qemu-img looks the name up in the list first (bdrv_snapshot_find, names
        # only); a format without snapshots, or a data file image, lists none.
        victim = next((s for s in image.snapshots if s.name == name), None) \
            if supported else None
        if victim is None:
            raise QnbdError(prefix + "snapshot not found")
    if not has_snapshots and action == "apply":
        # bdrv_snapshot_goto, for a driver with nothing to fall back on.
        raise QnbdError(prefix + "Block driver does not support snapshots")
    if not supported:
        raise QnbdError(prefix + _driver_error(action, 95))  # ENOTSUP
    try:
        if action == "create":
            image.snapshot_create(os.fsencode(name)[:NAME_BYTES], _now_ns(), progress)
        elif action == "apply":
            image.snapshot_apply(name, progress)
        else:
            image.snapshot_delete(victim, progress)
    except QnbdError as e:
        if getattr(e, "verbatim", True) or not hasattr(e, "errno"):
            raise QnbdError(prefix + str(e)) from None
        raise QnbdError(prefix + _driver_error(action, e.errno)) from None


def _driver_error(action: str, code: int) -> str:
    """How qemu-img words a driver's errno: -c prints it as "-N (text)" before qemu 8.2
    (commit "qemu-img: omit errno value in error message"); -a goes through
    bdrv_snapshot_goto's "Failed to load snapshot"."""
    text = os.strerror(code)
    if action == "create":
        return text if at_least(8, 2) else f"-{code} ({text})"
    if action == "apply":
        return f"Failed to load snapshot: {text}"
    return text


def _now_ns() -> int:
    """qemu-img dates a snapshot with the wall clock in microseconds."""
    return time.time_ns() // 1000 * 1000
