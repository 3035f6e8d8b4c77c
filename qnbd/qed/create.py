"""Create an empty QED image, laid out as qemu-img lays it out (block/qed.c,
bdrv_qed_co_create): the header in cluster 0 with the backing file name right after it,
the L1 table (table_size clusters, all unallocated) from cluster 1; the file ends where
the L1 table ends. qed_spec.txt, "Header" and "Tables".
"""

from .. import fileio
from ..block.chain import backing_size
from ..block.options import parse_int, parse_size_option, parse_text
from ..errors import ImageError
from . import header as hdr

DEFAULT_CLUSTER_SIZE = 64 * 1024
DEFAULT_TABLE_SIZE = 4
# qemu-img create -o keys -> (create() argument, value parser)
CREATE_OPTIONS = {
    "size": ("size", parse_size_option),
    "backing_file": ("backing_file", parse_text),
    "backing_fmt": ("backing_fmt", parse_text),
    "cluster_size": ("cluster_size", parse_size_option),
    "table_size": ("table_size", parse_int),
}


def create(path: str, size: int | None = None, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
           table_size: int = DEFAULT_TABLE_SIZE, backing_file: str | None = None,
           backing_fmt: str | None = None, open_backing=None) -> int:
    """Write a new empty QED image at `path` (an existing file is overwritten). Without
    `size`, the backing file's size, opened with open_backing(path, fmt) (skipped when
    that is None: qemu-img create -u). Returns the virtual size; ImageError otherwise."""
    if not hdr.cluster_size_valid(cluster_size):
        raise ImageError(f"QED cluster size must be within range [{hdr.MIN_CLUSTER_SIZE}, "
                         f"{hdr.MAX_CLUSTER_SIZE}] and power of 2")
    if not hdr.table_size_valid(table_size):
        raise ImageError(f"QED table size must be within range [1, {hdr.MAX_TABLE_SIZE}] "
                         "and power of 2")
    if backing_fmt and not backing_file:
        raise ImageError("Backing format cannot be used without backing file")
    features = 0
    name = b""
    if backing_file is not None:
        if not backing_file:
            raise ImageError("Expected backing file name, got empty string")
        name = backing_file.encode()
        if hdr.HEADER_LENGTH + len(name) > cluster_size:
            raise ImageError("Backing file name too long for the header cluster")
        base_size = backing_size(path, backing_file, backing_fmt, open_backing)
        size = base_size if size is None else size
        features |= hdr.F_BACKING_FILE
        if backing_fmt == "raw":  # the only format QED records: never probe it
            features |= hdr.F_BACKING_FORMAT_NO_PROBE
    if size is None:
        raise ImageError("Image creation needs a size parameter")
    size = -(-size // hdr.SECTOR) * hdr.SECTOR
    # qemu computes the limit in 64 bits and it wraps for large clusters (to 0 for
    # 64 MiB ones): an image qemu would then refuse to open is refused here too.
    limit = hdr.max_image_size(cluster_size, table_size) & (1 << 64) - 1
    if size > limit:
        raise ImageError("QED image size must be a non-zero multiple of cluster size and "
                         f"less than {limit} bytes")
    h = hdr.Header(cluster_size=cluster_size, table_size=table_size, header_size=1,
                   features=features, compat_features=0, autoclear_features=0,
                   l1_table_offset=cluster_size, image_size=size,
                   backing_filename_offset=hdr.HEADER_LENGTH if name else 0,
                   backing_filename_size=len(name))
    f = fileio.create_file(path)
    try:
        f.pwrite(h.encode() + name, 0)
        f.truncate(cluster_size + h.table_bytes)  # the L1 table: zeros, left sparse
        f.fsync()
    except OSError as e:
        raise ImageError(f"Could not write '{path}': {e.strerror}") from None
    finally:
        f.close()
    return size




def describe(size: int, options: dict) -> str:
    """qemu-img create's "Formatting" line: cluster_size always (its default is in
    qemu's option list), table_size only when given."""
    described = {"size": size, **{k: options[k] for k in ("backing_file", "backing_fmt")
                                  if options.get(k) is not None},
                 "cluster_size": options.get("cluster_size", DEFAULT_CLUSTER_SIZE)}
    if "table_size" in options:
        described["table_size"] = options["table_size"]
    return "fmt=qed " + " ".join(f"{k}={v}" for k, v in described.items())
