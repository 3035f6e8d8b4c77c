"""Open an image file as a BlockDevice, probing its format like qemu does."""

from ..errors import ImageError
from .raw import RawDevice

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("qcow2", "raw")


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImageError(f"Could not open '{path}': {e.strerror}") from None
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


def open_image(path: str, fmt: str | None = None, read_only: bool = True, **options):
    """Open `path` as `fmt` (probed when None). Options go to the format's engine
    (for qcow2: l2_cache_bytes, refcount_cache_bytes, max_backing_depth)."""
    fmt = fmt or probe_format(path)
    if fmt == "qcow2":
        from ..qcow2.image import Qcow2Image
        return Qcow2Image.open(path, read_only=read_only, **options)
    if fmt == "raw":
        return RawDevice(path, read_only=read_only,
                         force_share=options.get("force_share", False))
    raise ImageError(f"Unknown image format '{fmt}' (supported: {', '.join(FORMATS)})")
