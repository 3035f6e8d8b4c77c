"""What `qemu-img info` reports about a qcow2 image (qapi/block-core.json, ImageInfo and
ImageInfoSpecificQCow2). Only the header and the bitmap directory are read."""

from ..block.chain import resolve_backing
from . import bitmap_format as bm
from . import header as hdr
from . import snapshots as snap


def image_info(path: str, file, st) -> dict:
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
    if h.external_data:
        if h.data_file is not None:
            data["data-file"] = h.data_file
        data["data-file-raw"] = h.data_file_raw
    if h.version >= 3:
        data["corrupt"] = h.corrupt
        data["extended-l2"] = h.extended_l2
    info = {}
    if h.nb_snapshots:
        snapshots, _ = snap.read_table(file, h.snapshots_offset, h.nb_snapshots,
                                       h.cluster_size, file_size)
        info["snapshots"] = [_snapshot_info(s) for s in snapshots]
    if h.backing_format:
        info["backing-filename-format"] = h.backing_format
    info.update({"virtual-size": h.size, "filename": path, "cluster-size": h.cluster_size,
                 "format": "qcow2", "actual-size": st.st_blocks * 512,
                 "format-specific": {"type": "qcow2", "data": data}})
    if h.backing_file is not None:
        info["full-backing-filename"] = resolve_backing(path, h.backing_file)
        info["backing-filename"] = h.backing_file
    info["dirty-flag"] = h.dirty
    return info


def _bitmap_flags(entry: bm.DirectoryEntry) -> list[str]:
    # qemu's order (block/qcow2-bitmap.c, get_bitmap_info_flags)
    return ["in-use"] * entry.in_use + ["auto"] * entry.auto


def _snapshot_info(s: snap.Snapshot) -> dict:
    """qapi SnapshotInfo, as bdrv_query_snapshot_info_list fills it: the VM clock split
    into seconds and nanoseconds, icount only when recorded."""
    out = {"icount": s.icount} if s.icount != -1 else {}
    out.update({"vm-clock-nsec": s.vm_clock_nsec % 10**9, "name": s.name,
                "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                "vm-clock-sec": s.vm_clock_nsec // 10**9, "id": s.id,
                "vm-state-size": s.vm_state_size})
    return out
