"""What `qemu-img info` reports about a QED image (qapi/block-core.json, ImageInfo; QED
has no format-specific part). Only the header is read. As QEMU 7.2 shows, NEED_CHECK is
not reported as the dirty flag (qed.c's get_info leaves is_dirty unset)."""

from ..block.chain import resolve_backing
from . import header as hdr


def image_info(path: str, file, st) -> dict:
    h = hdr.read(file, path)
    info = {}
    if h.backing_format:
        info["backing-filename-format"] = h.backing_format
    info.update({"virtual-size": h.image_size, "filename": path,
                 "cluster-size": h.cluster_size, "format": "qed",
                 "actual-size": st.st_blocks * 512})
    if h.backing_file is not None:
        info["full-backing-filename"] = resolve_backing(path, h.backing_file)
        info["backing-filename"] = h.backing_file
    info["dirty-flag"] = False
    return info
