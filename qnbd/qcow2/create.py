"""Create an empty qcow2 image, laid out the way qemu-img lays it out.

qemu-img (block/qcow2.c, qcow2_co_create) writes the header in cluster 0, a one-cluster
refcount table in cluster 1 and a refcount block in cluster 2, then allocates the L1
table for the virtual size right after them. The file ends where the L1 table ends (its
last cluster is not padded). We lay out the same clusters in the same order and, when one
refcount block or one refcount-table cluster is not enough to describe all of them (small
clusters, narrow refcounts, big L1 tables), we give the table and the blocks as many
clusters as they need, found by a fixed point, instead of qemu's piecemeal growth.
For those small shapes the result is byte-identical to qemu-img's output.

Spec: qemu docs/interop/qcow2.rst, "Header", "Host cluster management", "Cluster mapping".
"""

from array import array

from ..block.chain import backing_size, resolve_backing
from ..block.raw import create_sparse
from ..block.options import parse_bool, parse_int, parse_size_option, parse_text
from ..errors import ImageError
from ..lock import create_locked
from . import header as hdr
from .entries import encode_table
from .refcount import SubByteBlock, WordBlock

# compat option -> header version (qemu accepts both spellings)
VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
COMPRESSION_TYPES = {name: code for code, name in hdr.COMPRESSION_NAMES.items()}
SECTOR = 512  # qemu-img rounds the virtual size up to whole sectors
# qemu-img create -o keys -> (create() argument, value parser)
CREATE_OPTIONS = {
    "size": ("size", parse_size_option),
    "compat": ("compat", parse_text),
    "cluster_size": ("cluster_size", parse_size_option),
    "refcount_bits": ("refcount_bits", parse_int),
    "lazy_refcounts": ("lazy_refcounts", parse_bool),
    "backing_file": ("backing_file", parse_text),
    "backing_fmt": ("backing_fmt", parse_text),
    "compression_type": ("compression_type", parse_text),
    "data_file": ("data_file", parse_text),
    "data_file_raw": ("data_file_raw", parse_bool),
    "extended_l2": ("extended_l2", parse_bool),
}


def create(path: str, size: int | None = None, *, compat: str = "1.1",
           cluster_size: int = 65536, refcount_bits: int = 16,
           lazy_refcounts: bool = False, backing_file: str | None = None,
           backing_fmt: str | None = None, compression_type: str = "zlib",
           data_file: str | None = None, data_file_raw: bool = False,
           extended_l2: bool = False, open_backing=None) -> int:
    """Write a new empty qcow2 image at `path` (an existing file is overwritten, as with
    qemu-img). `size` may be None with a backing file: the backing file's size is used.
    The backing file name is stored as given; it is opened (relative names against the
    new image's directory) with `open_backing(path, fmt)` to check it and to learn its
    size, unless that is None (qemu-img create -u). Returns the virtual size. Raises
    ImageError with a one-line reason."""
    header = new_header(size, compat=compat, cluster_size=cluster_size,
                        refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts,
                        backing_file=backing_file, backing_fmt=backing_fmt,
                        compression_type=compression_type,
                        backing_size=backing_size(path, backing_file, backing_fmt,
                                                   open_backing),
                        data_file=data_file, data_file_raw=data_file_raw,
                        extended_l2=extended_l2)
    if data_file is not None:
        # qemu-img creates the data file as a raw image of the virtual size; its name
        # is resolved against the new image's directory, as qnbd opens it (rule 13).
        create_sparse(resolve_backing(path, data_file), header.size)
    _write(path, header)
    return header.size


def new_header(size: int | None, *, compat: str, cluster_size: int, refcount_bits: int,
               lazy_refcounts: bool, backing_file: str | None, backing_fmt: str | None,
               compression_type: str, backing_size: int | None = None,
               data_file: str | None = None, data_file_raw: bool = False,
               extended_l2: bool = False) -> hdr.Header:
    """Validate the options and return the header of the new image, with its layout."""
    version = VERSIONS.get(compat)
    if version is None:
        raise ImageError(f"Invalid compat version '{compat}' (use 0.10 or 1.1)")
    if (cluster_size & (cluster_size - 1)
            or not 1 << hdr.MIN_CLUSTER_BITS <= cluster_size <= 1 << hdr.MAX_CLUSTER_BITS):
        raise ImageError("Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise ImageError("Refcount width must be a power of two and may not exceed 64 bits")
    if compression_type not in COMPRESSION_TYPES:
        raise ImageError(f"Unknown compression type '{compression_type}' (use "
                         f"{' or '.join(COMPRESSION_TYPES)})")
    # Version 2 has no refcount_order field, no feature bits and no compression type
    # field: 16-bit refcounts, eager refcounts and deflate are implied (qcow2.rst, "Header").
    if version == 2:
        if refcount_bits != 16:
            raise ImageError("Different refcount widths than 16 bits require "
                             "compatibility level 1.1 or above (use compat=1.1)")
        if lazy_refcounts:
            raise ImageError("Lazy refcounts only supported with compatibility level 1.1 "
                             "and above (use compat=1.1)")
        if compression_type != "zlib":
            raise ImageError("Non-zlib compression type is only supported with "
                             "compatibility level 1.1 and above (use compat=1.1)")
    if extended_l2 and version == 2:
        raise ImageError("Extended L2 entries are only supported with compatibility level "
                         "1.1 and above (use version=v3 or greater)")
    if extended_l2 and cluster_size < 1 << hdr.MIN_EXTENDED_CLUSTER_BITS:
        raise ImageError("Extended L2 entries are only supported with cluster sizes of at "
                         f"least {1 << hdr.MIN_EXTENDED_CLUSTER_BITS} bytes")
    if backing_fmt and not backing_file:
        raise ImageError("Backing format cannot be used without backing file")
    if data_file is not None and version == 2:
        raise ImageError("External data files are only supported with compatibility level "
                         "1.1 and above (use version=v3 or greater)")
    if data_file_raw and data_file is None:
        raise ImageError("data-file-raw requires data-file")
    if data_file_raw and backing_file is not None:
        raise ImageError("Backing file and data-file-raw cannot be used at the same time")
    if backing_file is not None:
        if not backing_file:
            raise ImageError("Backing file name is empty")
        if len(backing_file.encode()) > hdr.MAX_BACKING_FILE_NAME:
            raise ImageError("Backing file name too long (at most "
                             f"{hdr.MAX_BACKING_FILE_NAME} bytes)")
    if size is None:
        size = backing_size
    if size is None:
        raise ImageError("Image creation needs a size parameter")
    size = -(-size // SECTOR) * SECTOR
    if size < 0 or size >= 1 << 63:
        raise ImageError(f"Invalid image size {size}")

    cluster_bits = cluster_size.bit_length() - 1
    # One L1 entry per L2 table, one L2 table per cluster_size/8 guest clusters (/16
    # with extended L2 entries).
    l1_size = -(-size // (cluster_size * (cluster_size // (16 if extended_l2 else 8))))
    if l1_size * 8 > hdr.MAX_L1_BYTES:
        raise ImageError("The image size is too large for file format 'qcow2' "
                         "(try using a larger cluster size)")
    reftable_clusters, refblocks = _refcount_layout(cluster_size, refcount_bits, l1_size)
    l1_offset = (1 + reftable_clusters + refblocks) * cluster_size if l1_size else 0
    compression = COMPRESSION_TYPES[compression_type]
    header = hdr.Header(
        version=version, cluster_bits=cluster_bits, size=size,
        l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=cluster_size, refcount_table_clusters=reftable_clusters,
        refcount_order=refcount_bits.bit_length() - 1,
        compatible_features=hdr.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        incompatible_features=((hdr.INCOMPAT_COMPRESSION
                                if compression != hdr.COMPRESSION_DEFLATE else 0)
                               | (hdr.INCOMPAT_EXTL2 if extended_l2 else 0)),
        # qemu writes v3 headers with the compression type field (header_length 112).
        header_length=(hdr.V3_HEADER_LENGTH_WITH_COMPRESSION if version == 3
                       else hdr.V2_HEADER_LENGTH),
        compression_type=compression,
        backing_file=backing_file, backing_format=backing_fmt)
    if data_file is not None:
        header.incompatible_features |= hdr.INCOMPAT_DATA_FILE
        header.set_extension(hdr.EXT_DATA_FILE, data_file.encode())
        if data_file_raw:
            header.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW
    header.encode()  # fail now, with one line, if the header does not fit cluster 0
    return header


def _refcount_layout(cluster_size: int, refcount_bits: int, l1_size: int):
    """(refcount table clusters, refcount blocks) needed so that the blocks describe
    every cluster of the new file: the header, the table, the blocks themselves and the
    L1 table. Each term only grows, so iterating to a fixed point terminates."""
    per_block = cluster_size * 8 // refcount_bits
    l1_clusters = -(-l1_size * 8 // cluster_size)
    table, blocks = 1, 1
    while True:
        clusters = 1 + table + blocks + l1_clusters
        need_blocks = -(-clusters // per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if (need_table, need_blocks) == (table, blocks):
            break
        table, blocks = max(table, need_table), max(blocks, need_blocks)
    if table * cluster_size > hdr.MAX_REFTABLE_BYTES:
        raise ImageError("The image size is too large for file format 'qcow2' "
                         "(try using a larger cluster size)")
    return table, blocks






def _write(path: str, h: hdr.Header) -> None:
    cs = h.cluster_size
    table, blocks = _refcount_layout(cs, h.refcount_bits, h.l1_size)
    first_block = 1 + table
    used = first_block + blocks + -(-h.l1_size * 8 // cs)  # every cluster of the file
    per_block = cs * 8 // h.refcount_bits
    block_class = WordBlock if h.refcount_bits >= 8 else SubByteBlock
    refblocks = []
    for b in range(blocks):
        block = block_class(bytes(cs), h.refcount_bits)
        for i in range(min(per_block, used - b * per_block)):
            block.set(i, 1)
        refblocks.append(block.encode())
    reftable = array("Q", ((first_block + b) * cs for b in range(blocks)))
    end = h.l1_table_offset + h.l1_size * 8 if h.l1_size else (first_block + blocks) * cs

    f = create_locked(path)
    try:
        f.pwrite(h.encode(), 0)
        f.pwrite(encode_table(reftable), h.refcount_table_offset)
        f.pwrite(b"".join(refblocks), first_block * cs)
        f.truncate(end)  # the L1 table: all entries zero (unallocated), left sparse
        f.fsync()
    except OSError as e:
        raise ImageError(f"Could not write '{path}': {e.strerror}") from None
    finally:
        f.close()
