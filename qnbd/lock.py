"""Image locks that QEMU understands (docs/DESIGN.md rule 11), so that qnbd and
qemu-img/qemu-io/qemu-nbd never both write one image.

QEMU's scheme (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes): each
block-layer permission bit i (include/block/block-common.h, QEMU 7.2: consistent read,
write, write unchanged, resize) has two lock bytes in the image file:
  - byte 100 + i: shared-locked by every user that *holds* permission i;
  - byte 200 + i: shared-locked by every user that *does not share* permission i.
Only shared locks are ever taken. An opener locks its bytes, then tests with an exclusive
probe: for each permission it holds, is byte 200 + i locked by anyone else (someone
refuses to share it)? For each permission it refuses to share, is byte 100 + i locked by
anyone else (someone holds it)? Either means the image is in use.

Which bytes each role takes was read off /proc/locks with QEMU 7.2 (a qcow2 file under a
format driver is a "metadata" child, block.c bdrv_default_perms_for_storage: writers add
resize, and nobody under qcow2 shares write or resize):
  qcow2 read-write   hold read, write, resize   unshare write, resize
  qcow2 read-only    hold read                  unshare write, resize
  raw (qemu-nbd)     hold read [, write]        unshare resize
  qcow2 data file    hold read [, write, resize] unshare resize  (external data file)
  -U (force share)   hold read                  unshare nothing
"""

import errno
import os

from . import fileio
from .errors import ImageError
from .fileio import File

CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
PERMISSIONS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE)
PERM_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write",
              WRITE_UNCHANGED: "write unchanged", RESIZE: "resize"}
PERM_LOCK_BASE = 100
SHARED_LOCK_BASE = 200


class ImageInUse(ImageError):
    """Another process holds a lock that conflicts with the requested access."""


def permissions(writable: bool, force_share: bool = False,
                metadata: bool = True, data_child: bool = False) -> tuple[int, int]:
    """(held, unshared) permission masks for an open, as QEMU computes them.
    `metadata`: the file holds format metadata (qcow2), not only guest data (raw);
    `data_child`: the external data file of a qcow2 image (resized with it, written by
    others too)."""
    if force_share and writable:
        raise ImageError("force-share (-U) can only be used with read-only images")
    held = CONSISTENT_READ
    if writable:
        held |= WRITE | RESIZE if metadata or data_child else WRITE
    if force_share:
        return held, 0
    return held, WRITE | RESIZE if metadata and not data_child else RESIZE


def lock_image(file: File, writable: bool, force_share: bool = False,
               metadata: bool = True, data_child: bool = False) -> None:
    """Take QEMU's lock bytes on `file` for this kind of open, or raise ImageInUse.
    The locks live as long as the file stays open; on failure the caller closes it."""
    _lock(file, *permissions(writable, force_share, metadata, data_child))


def create_locked(path: str) -> File:
    """Open `path` for a create that overwrites it, emptied only once locked as
    `qemu-img create` locks it (block/file-posix.c raw_co_create: hold write and resize,
    share everything but resize), so that an image in use is refused and left intact."""
    file = fileio.create_file(path)
    try:
        try:
            _lock(file, WRITE | RESIZE, RESIZE)
        except ImageInUse as e:
            raise ImageInUse(f"{e}; Is another process using the image [{path}]?") from None
        file.truncate(0)
    except OSError as e:
        file.close()
        raise ImageError(f"Could not create '{path}': {e.strerror}") from None
    except BaseException:
        file.close()
        raise
    return file


def _lock(file: File, held: int, unshared: int) -> None:
    try:
        for i, perm in enumerate(PERMISSIONS):
            if held & perm:
                file.lock_byte(PERM_LOCK_BASE + i)
            if unshared & perm:
                file.lock_byte(SHARED_LOCK_BASE + i)
        for i, perm in enumerate(PERMISSIONS):
            if held & perm and file.byte_locked_elsewhere(SHARED_LOCK_BASE + i):
                _in_use(file, f"failed to get '{PERM_NAMES[perm]}' lock")
            if unshared & perm and file.byte_locked_elsewhere(PERM_LOCK_BASE + i):
                _in_use(file, f"failed to get shared '{PERM_NAMES[perm]}' lock")
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            _in_use(file, "a lock byte is held exclusively")
        raise ImageError(f"could not lock '{file.path}': {e.strerror}") from None


def _in_use(file: File, detail: str):
    who = ", ".join(holders(file.path)) or "another process"
    raise ImageInUse(f"image '{file.path}' is in use by {who} ({detail})")


def holders(path: str) -> list[str]:
    """'name[pid]' of the other processes that have `path` open (best effort, for the
    message only: /proc/locks shows pid -1 for OFD locks, so look at open files)."""
    try:
        st = os.stat(path)
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        found.append(f"{f.read().strip()}[{pid}]")
                except OSError:
                    found.append(f"pid {pid}")
                break
    return found
