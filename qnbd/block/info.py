"""What `qemu-img info` reports about an image, as the same JSON-shaped dict.

Keys and their meaning follow qemu's ImageInfo (qapi/block-core.json): sizes in bytes,
"actual-size" is the space the file takes on disk, "full-backing-filename" is the backing
name resolved against the image's directory as qemu does (path_combine). Images are only
read, through the header and the bitmap directory: no table is loaded and no backing file
is opened except to follow the chain.
"""

import os

from .. import fileio
from ..errors import ImageError
from ..qcow2 import bitmaps as bm
from ..qcow2 import header as hdr
from .open import FORMATS, probe_format

MAX_CHAIN_LENGTH = 64


def image_info(path: str, fmt: str | None = None) -> dict:
    fmt = fmt or probe_format(path)
    if fmt not in FORMATS:
        raise ImageError(f"Unknown image format '{fmt}' (supported: {', '.join(FORMATS)})")
    file = fileio.open_file(path, writable=False)
    try:
        st = os.fstat(file.fd)
        if fmt == "raw":
            return {"virtual-size": st.st_size, "filename": path, "format": "raw",
                    "actual-size": st.st_blocks * 512, "dirty-flag": False}
        return _qcow2_info(path, file, st)
    finally:
        file.close()


def _qcow2_info(path: str, file, st) -> dict:
    file_size = st.st_size
    h = hdr.read(file)
    data = {"compat": "0.10" if h.version == 2 else "1.1",
            "compression-type": hdr.COMPRESSION_NAMES[h.compression_type]}
    if h.version >= 3:
        data["lazy-refcounts"] = h.lazy_refcounts
        ext = h.extension(hdr.EXT_BITMAPS)
        # qcow2.rst: with the autoclear bit clear the extension is stale; qemu lists none.
        if ext is not None and h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            data["bitmaps"] = [
                {"flags": _bitmap_flags(e), "name": e.name, "granularity": e.granularity}
                for e in bm.read_directory(file, ext, h.size, h.cluster_size, file_size)]
    data["refcount-bits"] = h.refcount_bits
    if h.version >= 3:
        data["corrupt"] = h.corrupt
        data["extended-l2"] = False  # refused by header.parse when set
    info = {}
    if h.backing_format:
        info["backing-filename-format"] = h.backing_format
    info.update({"virtual-size": h.size, "filename": path, "cluster-size": h.cluster_size,
                 "format": "qcow2", "actual-size": st.st_blocks * 512,
                 "format-specific": {"type": "qcow2", "data": data}})
    if h.backing_file is not None:
        info["full-backing-filename"] = hdr.resolve_backing(path, h.backing_file)
        info["backing-filename"] = h.backing_file
    info["dirty-flag"] = h.dirty
    return info


def _bitmap_flags(entry: bm.DirectoryEntry) -> list[str]:
    # qemu's order (block/qcow2-bitmap.c, get_bitmap_info_flags)
    return ["in-use"] * entry.in_use + ["auto"] * entry.auto


def chain_info(path: str, fmt: str | None = None) -> list[dict]:
    """image_info of `path` and of each backing file below it, top first."""
    chain = [image_info(path, fmt)]
    seen = {os.path.realpath(path)}
    while "full-backing-filename" in chain[-1]:
        backing = chain[-1]["full-backing-filename"]
        if os.path.realpath(backing) in seen:
            raise ImageError(f"Backing file '{backing}' creates an infinite loop")
        if len(chain) >= MAX_CHAIN_LENGTH:
            raise ImageError(f"backing chain of '{path}' is longer than {MAX_CHAIN_LENGTH}")
        seen.add(os.path.realpath(backing))
        chain.append(image_info(backing, chain[-1].get("backing-filename-format")))
    return chain
