"""The qcow2 header, its header extensions and the feature bits.

Spec: qemu docs/interop/qcow2.rst, sections "Header", "Additional fields",
"Header extensions" and "Feature name table". Parsing validates every field that later
code relies on, so the rest of the engine can trust a `Header`.
"""

import struct

from ..errors import ImageError, UnsupportedFeature, printable
from ..signatures import QCOW_MAGIC

MAGIC = QCOW_MAGIC

# (name, struct code) in on-disk order. The v2 header is the first 72 bytes; v3 adds the
# feature bitmaps, refcount_order and header_length (104 bytes), then optional fields.
_V2_FIELDS = (
    ("magic", "4s"), ("version", "I"), ("backing_file_offset", "Q"),
    ("backing_file_size", "I"), ("cluster_bits", "I"), ("size", "Q"),
    ("crypt_method", "I"), ("l1_size", "I"), ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"), ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"), ("snapshots_offset", "Q"),
)
_V3_FIELDS = (
    ("incompatible_features", "Q"), ("compatible_features", "Q"),
    ("autoclear_features", "Q"), ("refcount_order", "I"), ("header_length", "I"),
)
_V2 = struct.Struct(">" + "".join(code for _, code in _V2_FIELDS))
_V3 = struct.Struct(">" + "".join(code for _, code in _V2_FIELDS + _V3_FIELDS))
V2_HEADER_LENGTH = _V2.size  # 72
V3_HEADER_LENGTH = _V3.size  # 104


def field_offset(name: str) -> int:
    """Byte offset of a header field, from the field table above (for in-place updates
    of one field, e.g. the feature bits)."""
    pos = 0
    for field_name, code in _V2_FIELDS + _V3_FIELDS:
        if field_name == name:
            return pos
        pos += struct.calcsize(">" + code)
    raise KeyError(name)


COMPRESSION_TYPE_OFFSET = 104  # "Additional fields": one byte, padded to 112
V3_HEADER_LENGTH_WITH_COMPRESSION = 112

# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
# Compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Feature-name table entries as qemu writes them: (type, bit, name).
FEATURE_INCOMPATIBLE, FEATURE_COMPATIBLE, FEATURE_AUTOCLEAR = 0, 1, 2
KNOWN_FEATURE_NAMES = (
    (FEATURE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)
# Incompatible bits this engine implements; any other set bit refuses the open (rule 1).
SUPPORTED_INCOMPATIBLE = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION
                          | INCOMPAT_DATA_FILE | INCOMPAT_EXTL2)
# Autoclear bits whose meaning this engine keeps true while writing (bitmaps.py keeps the
# bitmaps consistent); any other set bit is cleared before the first write (rule 1).
MAINTAINED_AUTOCLEAR = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW  # writer.py keeps it

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_EXT_HEADER = struct.Struct(">II")
_FEATURE_ENTRY = struct.Struct(">BB46s")

COMPRESSION_DEFLATE, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}

MIN_CLUSTER_BITS = 9
MIN_EXTENDED_CLUSTER_BITS = 14  # qcow2.rst, cluster_bits: "with Extended L2 Entries"
MAX_CLUSTER_BITS = 21  # 2 MiB, qemu's implementation limit
MAX_BACKING_FILE_NAME = 1023
MAX_L1_BYTES = 32 << 20  # qemu's limit on the L1 table
MAX_REFTABLE_BYTES = 8 << 20  # qemu's limit on the refcount table
MAX_SNAPSHOTS = 65536


class Header:
    """The header's fields (qcow2.rst, "Header"), its extensions and feature names. A
    plain class, not a dataclass: `qnbd check` imports this module, and the dataclasses
    import costs its start-up more than checking a sparse image (issue 17)."""

    def __init__(self, version: int, cluster_bits: int, size: int, l1_size: int,
                 l1_table_offset: int, refcount_table_offset: int,
                 refcount_table_clusters: int, nb_snapshots: int = 0,
                 snapshots_offset: int = 0, crypt_method: int = 0,
                 incompatible_features: int = 0, compatible_features: int = 0,
                 autoclear_features: int = 0, refcount_order: int = 4,
                 header_length: int = V3_HEADER_LENGTH,
                 compression_type: int = COMPRESSION_DEFLATE, extra_fields: bytes = b"",
                 backing_file: str | None = None, backing_format: str | None = None,
                 other_extensions: list[tuple[int, bytes]] | None = None,
                 feature_names: dict[tuple[int, int], str] | None = None):
        self.version = version
        self.cluster_bits = cluster_bits
        self.size = size
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.crypt_method = crypt_method
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        # Bytes of the header beyond the fields above (unknown newer fields): verbatim.
        self.extra_fields = extra_fields
        self.backing_file = backing_file
        self.backing_format = backing_format
        # Extensions other than backing format and feature table, in file order: verbatim.
        self.other_extensions = other_extensions if other_extensions is not None else []
        self.feature_names = feature_names if feature_names is not None else {}

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def external_data(self) -> bool:
        """Guest data lives in an external data file (qcow2.rst, incompatible bit 2)."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def extended_l2(self) -> bool:
        """128-bit L2 entries with subclusters (qcow2.rst, incompatible bit 4)."""
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Entries in one L2 table: one cluster of 8-byte, or 16-byte extended, entries."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def data_file_raw(self) -> bool:
        """The data file alone is a valid raw image (autoclear bit 1)."""
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def data_file(self) -> str | None:
        """The external data file's name from its header extension, if any."""
        raw = self.extension(EXT_DATA_FILE)
        return None if raw is None else _decode_name(raw, "data file")

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    def extension(self, ext_type: int) -> bytes | None:
        for t, data in self.other_extensions:
            if t == ext_type:
                return data
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or add, or with None remove) a kept extension, keeping file order."""
        kept = [(t, d) for t, d in self.other_extensions if t != ext_type]
        if data is not None:
            at = next((i for i, (t, _) in enumerate(self.other_extensions) if t == ext_type),
                      len(kept))
            kept.insert(at, (ext_type, data))
        self.other_extensions = kept

    def feature_name(self, kind: int, bit: int) -> str:
        """The feature's name for messages: from the image's feature-name table (made
        printable, since it is untrusted input), else the known name, else "bit N"."""
        name = self.feature_names.get((kind, bit)) or dict(
            ((k, b), n) for k, b, n in KNOWN_FEATURE_NAMES).get((kind, bit), f"bit {bit}")
        return printable(name)

    # -- serialisation ---------------------------------------------------------------

    def encode(self, cluster_size: int | None = None) -> bytes:
        """The header cluster's meaningful bytes: header, extensions, end marker and the
        backing file name after them. Raises ImageError if it does not fit the cluster."""
        backing = (self.backing_file or "").encode()
        exts = []
        if self.backing_format:
            exts.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        # qemu (block/qcow2.c, qcow2_update_header) writes the feature-name table only for
        # clusters above 4 KiB: in smaller ones it would leave no room for a backing name.
        if self.version >= 3 and (cluster_size or self.cluster_size) > 4096:
            names = {(k, b): n for k, b, n in KNOWN_FEATURE_NAMES} | self.feature_names
            exts.append((EXT_FEATURE_TABLE, b"".join(
                _FEATURE_ENTRY.pack(k, b, n.encode()) for (k, b), n in sorted(names.items()))))
        exts.extend(self.other_extensions)
        ext_bytes = b"".join(_EXT_HEADER.pack(t, len(d)) + d + bytes(-len(d) % 8)
                             for t, d in exts) + _EXT_HEADER.pack(EXT_END, 0)
        head_length = V2_HEADER_LENGTH if self.version == 2 else self.header_length
        values = {name: getattr(self, name, 0) for name, _ in _V2_FIELDS[1:] + _V3_FIELDS}
        values.update(magic=MAGIC, backing_file_size=len(backing),
                      backing_file_offset=head_length + len(ext_bytes) if backing else 0)
        if self.version == 2:
            head = _V2.pack(*(values[n] for n, _ in _V2_FIELDS))
        else:
            known = _V3.pack(*(values[n] for n, _ in _V2_FIELDS + _V3_FIELDS))
            if head_length > COMPRESSION_TYPE_OFFSET:
                known += bytes([self.compression_type])
                known += bytes(V3_HEADER_LENGTH_WITH_COMPRESSION - len(known))
            head = (known + self.extra_fields)[:head_length]
            head += bytes(head_length - len(head))
        out = head + ext_bytes + backing
        if len(out) > (cluster_size or self.cluster_size):
            raise ImageError("header, extensions and backing file name do not fit in the "
                             "first cluster")
        return out


def read(file) -> Header:
    """Parse and validate the header of an open image file (a fileio.File)."""
    file_size = file.size()
    return parse(file.pread(min(file_size, 1 << MAX_CLUSTER_BITS), 0), file_size)


def _parse_fields(data: bytes) -> dict:
    version = struct.unpack_from(">I", data, 4)[0]
    fields = _V2_FIELDS if version == 2 else _V2_FIELDS + _V3_FIELDS
    layout = _V2 if version == 2 else _V3
    if len(data) < layout.size:
        raise ImageError(f"image is too short for a version {version} header")
    return dict(zip((n for n, _ in fields), layout.unpack_from(data)))


def parse(data: bytes, file_size: int) -> Header:
    """Parse and validate the header cluster(s) `data` of a file of `file_size` bytes."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ImageError("not a qcow2 image (bad magic)")
    version = struct.unpack_from(">I", data, 4)[0]
    if version not in (2, 3):
        raise UnsupportedFeature(f"unsupported qcow2 version {version}")
    f = _parse_fields(data)
    f.pop("magic")
    if version == 2:
        f.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                 refcount_order=4, header_length=V2_HEADER_LENGTH)
    cb = f["cluster_bits"]
    if not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster size 2^{cb} is out of range (512 B to 2 MiB)")
    cs = 1 << cb
    hl = f["header_length"]
    if version == 3 and (hl < V3_HEADER_LENGTH or hl % 8 or hl > cs):
        raise ImageError(f"header_length {hl} is invalid")
    if len(data) < hl:
        raise ImageError("image is too short for its header")
    if f["refcount_order"] > 6:
        raise ImageError(f"refcount_order {f['refcount_order']} is invalid (at most 6)")
    compression_type = COMPRESSION_DEFLATE
    if version == 3 and hl > COMPRESSION_TYPE_OFFSET:
        compression_type = data[COMPRESSION_TYPE_OFFSET]
    extra = data[V3_HEADER_LENGTH_WITH_COMPRESSION:hl] if hl > 112 else b""
    header = Header(compression_type=compression_type, extra_fields=extra,
                    **{k: v for k, v in f.items()
                       if k not in ("backing_file_offset", "backing_file_size")})
    _parse_extensions(header, data, hl if version == 3 else V2_HEADER_LENGTH,
                      f["backing_file_offset"] or cs)
    _parse_backing_name(header, data, f["backing_file_offset"], f["backing_file_size"])
    _check_features(header)
    _check_layout(header, file_size)
    return header


def _parse_extensions(header: Header, data: bytes, start: int, end: int) -> None:
    pos = start
    end = min(end, len(data), header.cluster_size)
    seen = set()
    while True:
        if pos + _EXT_HEADER.size > end:
            raise ImageError("header extension area runs past the end of the first cluster")
        ext_type, length = _EXT_HEADER.unpack_from(data, pos)
        pos += _EXT_HEADER.size
        if ext_type == EXT_END:
            return
        if pos + length > end:
            raise ImageError(f"header extension 0x{ext_type:08x} is longer than the space "
                             "left in the first cluster")
        payload = data[pos:pos + length]
        pos += length + (-length % 8)
        if ext_type in seen and ext_type in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE,
                                             EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE):
            raise ImageError(f"header extension 0x{ext_type:08x} appears twice")
        seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            header.backing_format = _decode_name(payload, "backing format")
        elif ext_type == EXT_FEATURE_TABLE:
            for off in range(0, len(payload) - _FEATURE_ENTRY.size + 1, _FEATURE_ENTRY.size):
                kind, bit, name = _FEATURE_ENTRY.unpack_from(payload, off)
                header.feature_names[(kind, bit)] = name.split(b"\0", 1)[0].decode(
                    "utf-8", "replace")
        else:
            header.other_extensions.append((ext_type, payload))


def _decode_name(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{what} name is not valid UTF-8") from None


def _parse_backing_name(header: Header, data: bytes, offset: int, size: int) -> None:
    if not offset:
        return
    if size > MAX_BACKING_FILE_NAME:
        raise ImageError(f"backing file name is {size} bytes long (at most "
                         f"{MAX_BACKING_FILE_NAME})")
    if offset + size > min(len(data), header.cluster_size):
        raise ImageError("backing file name lies outside the first cluster")
    raw = data[offset:offset + size]
    if b"\0" in raw:  # no file name can contain one; the OS calls would reject it
        raise ImageError("backing file name contains a NUL byte")
    header.backing_file = _decode_name(raw, "backing file")


def _check_features(h: Header) -> None:
    unknown = h.incompatible_features & ~SUPPORTED_INCOMPATIBLE
    if unknown:
        names = [h.feature_name(FEATURE_INCOMPATIBLE, bit)
                 for bit in range(64) if unknown >> bit & 1]
        raise UnsupportedFeature("Unsupported qcow2 feature(s): " + ", ".join(names))
    if h.crypt_method:
        raise UnsupportedFeature("encrypted images are not supported")
    compression_bit = bool(h.incompatible_features & INCOMPAT_COMPRESSION)
    if compression_bit != (h.compression_type != COMPRESSION_DEFLATE):
        raise ImageError("compression type field and compression type bit disagree")
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeature(f"unknown compression type {h.compression_type}")
    # qcow2.rst, incompatible bit 2 and autoclear bit 1.
    if h.data_file_raw and not h.external_data:
        raise ImageError("the raw external data bit is set without an external data file")
    if h.external_data and h.nb_snapshots:
        raise ImageError("internal snapshots are not supported with an external data file")
    if h.data_file_raw and h.backing_file is not None:
        raise ImageError("a backing file cannot be used with a raw external data file")
    if h.data_file is not None and ("\0" in h.data_file or not h.data_file):
        raise ImageError("data file name is empty or contains a NUL byte")


def _check_table(name: str, offset: int, length: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise ImageError(f"{name} offset 0x{offset:x} is not aligned to a cluster")
    if offset >= file_size:
        raise ImageError(f"{name} offset 0x{offset:x} is past the end of the file")
    if offset + length > file_size:  # the offset is fine: say so (issue 16)
        raise ImageError(f"{name} (0x{offset:x}, {length} bytes) runs past the end of the "
                         f"file ({file_size} bytes)")


def _check_layout(h: Header, file_size: int) -> None:
    cs = h.cluster_size
    if h.size >= 1 << 63:
        raise ImageError(f"virtual size {h.size} is too large")
    # Every virtual cluster needs an L1 entry (qcow2.rst, "Cluster mapping").
    if h.extended_l2 and h.cluster_bits < MIN_EXTENDED_CLUSTER_BITS:
        raise ImageError(f"extended L2 entries need clusters of at least "
                         f"{1 << MIN_EXTENDED_CLUSTER_BITS} bytes (cluster size {cs})")
    needed_l1 = -(-h.size // (cs * h.l2_entries))
    if h.l1_size < needed_l1:
        raise ImageError(f"l1_size {h.l1_size} is too small for a virtual size of {h.size}")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"l1_size {h.l1_size} is too large")
    if h.l1_size:
        _check_table("l1_table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0:
        raise ImageError("refcount table is empty")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageError(f"refcount_table_clusters {h.refcount_table_clusters} is too large")
    _check_table("refcount_table", h.refcount_table_offset, h.refcount_table_clusters * cs,
                 cs, file_size)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError(f"nb_snapshots {h.nb_snapshots} is too large")
    if h.nb_snapshots:
        _check_table("snapshots", h.snapshots_offset, 40 * h.nb_snapshots, cs, file_size)
