"""Create a raw image: a sparse file of the requested size (qemu-img create -f raw)."""

import os

from .. import fileio
from ..errors import ImageError

SECTOR = 512  # qemu-img rounds the size up to whole sectors


def create_raw(path: str, size: int) -> int:
    """Create (or truncate) `path` as an all-zero sparse file; returns its size."""
    size = -(-size // SECTOR) * SECTOR
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ImageError(f"Could not create '{path}': {e.strerror}") from None
    f = fileio.File(path, fd, writable=True)
    try:
        f.truncate(size)
    except OSError as e:
        raise ImageError(f"Could not resize file: {e.strerror}") from None
    finally:
        f.close()
    return size
