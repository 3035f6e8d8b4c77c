"""Create a raw image: a sparse file of the requested size (qemu-img create -f raw)."""

from .. import fileio
from ..errors import ImageError

SECTOR = 512  # qemu-img rounds the size up to whole sectors


def create_raw(path: str, size: int) -> int:
    """Create (or truncate) `path` as an all-zero sparse file; returns its size."""
    size = -(-size // SECTOR) * SECTOR
    f = fileio.create_file(path)
    try:
        f.truncate(size)
    except OSError as e:
        raise ImageError(f"Could not resize file: {e.strerror}") from None
    finally:
        f.close()
    return size
