"""The QED header: its fields, feature bits and validation, and in-place updates of the
feature words.

Spec: qemu docs/interop/qed_spec.txt, "Header" (all fields little-endian). Parsing
validates every field later code relies on (as QEMU's bdrv_qed_do_open), so the rest of
the engine can trust a `Header`: the L1 table lies inside the file, after the header
clusters; tables and the image size fit the 2-level translation; the backing name lies
inside the header clusters.
"""

import struct

from ..block.storage import Barrier, Storage
from ..errors import ImageError, UnsupportedFeature, printable
from ..signatures import QED_MAGIC

MAGIC = int.from_bytes(QED_MAGIC, "little")  # the magic field is a little-endian uint32

# (name, struct code) in on-disk order, "Header". The backing name fields always take
# their space, whether QED_F_BACKING_FILE is set or not.
_FIELDS = (
    ("magic", "I"), ("cluster_size", "I"), ("table_size", "I"), ("header_size", "I"),
    ("features", "Q"), ("compat_features", "Q"), ("autoclear_features", "Q"),
    ("l1_table_offset", "Q"), ("image_size", "Q"),
    ("backing_filename_offset", "I"), ("backing_filename_size", "I"),
)
_STRUCT = struct.Struct("<" + "".join(code for _, code in _FIELDS))
HEADER_LENGTH = _STRUCT.size  # 64


def field_offset(name: str) -> int:
    """Byte offset of a header field, from the field table (in-place updates)."""
    pos = 0
    for field_name, code in _FIELDS:
        if field_name == name:
            return pos
        pos += struct.calcsize("<" + code)
    raise KeyError(name)


# "Feature bits"
F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
# "There are currently no defined compat_features or autoclear_features bits": every
# set autoclear bit is unknown and is cleared before the first write.
KNOWN_AUTOCLEAR = 0

MIN_CLUSTER_SIZE = 1 << 12
MAX_CLUSTER_SIZE = 1 << 26
MAX_TABLE_SIZE = 16
SECTOR = 512


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def max_image_size(cluster_size: int, table_size: int) -> int:
    """"Tables": image_size <= TABLE_NOFFSETS * TABLE_NOFFSETS * cluster_size."""
    entries = table_size * cluster_size // 8
    return entries * entries * cluster_size


def cluster_size_valid(n: int) -> bool:
    return _power_of_two(n) and MIN_CLUSTER_SIZE <= n <= MAX_CLUSTER_SIZE


def table_size_valid(n: int) -> bool:
    return _power_of_two(n) and n <= MAX_TABLE_SIZE


class Header:
    """The header's fields ("Header"). A plain class, not a dataclass: `qnbd check`
    imports this module, and the dataclasses import costs its start-up more than
    checking a sparse image (issue 17)."""

    def __init__(self, cluster_size: int, table_size: int, header_size: int, features: int,
                 compat_features: int, autoclear_features: int, l1_table_offset: int,
                 image_size: int, backing_filename_offset: int = 0,
                 backing_filename_size: int = 0, backing_file: str | None = None,
                 magic: int = MAGIC):
        self.cluster_size = cluster_size
        self.table_size = table_size
        self.header_size = header_size
        self.features = features
        self.compat_features = compat_features
        self.autoclear_features = autoclear_features
        self.l1_table_offset = l1_table_offset
        self.image_size = image_size
        self.backing_filename_offset = backing_filename_offset
        self.backing_filename_size = backing_filename_size
        self.backing_file = backing_file
        self.magic = magic

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def header_bytes(self) -> int:
        return self.header_size * self.cluster_size

    @property
    def need_check(self) -> bool:
        return bool(self.features & F_NEED_CHECK)

    @property
    def backing_format(self) -> str | None:
        """QED_F_BACKING_FORMAT_NO_PROBE: the backing file is raw, never probed."""
        if self.backing_file is not None and self.features & F_BACKING_FORMAT_NO_PROBE:
            return "raw"
        return None

    def encode(self) -> bytes:
        return _STRUCT.pack(*(getattr(self, name) for name, _ in _FIELDS))


def parse(raw: bytes, file_size: int, path: str = "") -> Header:
    """Validate the header at the start of a file of `file_size` bytes. The backing
    name is read separately (read_backing_name), since it may lie beyond `raw`."""
    if len(raw) < HEADER_LENGTH:
        raise ImageError(f"'{path}' is too short to be a QED image")
    values = dict(zip((name for name, _ in _FIELDS), _STRUCT.unpack_from(raw)))
    if values["magic"] != MAGIC:
        raise ImageError(f"'{path}' is not in QED format (bad magic)")
    h = Header(**values)
    unknown = h.features & ~KNOWN_FEATURES
    if unknown:
        raise UnsupportedFeature(f"'{path}' uses unsupported QED features 0x{unknown:x}")
    if not cluster_size_valid(h.cluster_size):
        raise ImageError(f"'{path}': QED cluster size {h.cluster_size} is not a power of "
                         f"two in [{MIN_CLUSTER_SIZE}, {MAX_CLUSTER_SIZE}]")
    if not table_size_valid(h.table_size):
        raise ImageError(f"'{path}': QED table size {h.table_size} is not a power of two "
                         f"in [1, {MAX_TABLE_SIZE}]")
    if h.header_size == 0 or h.header_bytes > 0xFFFFFFFF:
        raise ImageError(f"'{path}': QED header size {h.header_size} clusters is invalid")
    if h.image_size % SECTOR or h.image_size > max_image_size(h.cluster_size, h.table_size):
        raise ImageError(f"'{path}': QED image size {h.image_size} is not a multiple of "
                         f"{SECTOR} or too large for the table geometry")
    # The allocation end: a trailing partial cluster is not part of the image ("Normally
    # the file size will be a multiple of the cluster size...").
    end = file_size - file_size % h.cluster_size
    if not table_offset_valid(h, h.l1_table_offset, end):
        raise ImageError(f"'{path}': QED L1 table offset 0x{h.l1_table_offset:x} is "
                         "invalid or the table is past the end of the file")
    if h.features & F_BACKING_FILE:
        if h.backing_filename_offset + h.backing_filename_size > h.header_bytes:
            raise ImageError(f"'{path}': the QED backing file name lies outside the header")
        if h.backing_filename_size == 0:
            raise ImageError(f"'{path}': the QED backing file name is empty")
    return h


def cluster_offset_valid(h: Header, offset: int, end: int) -> bool:
    """"Consistency checking", invariant 2: aligned, after the header, inside the file
    (`end`: the allocation end, a multiple of the cluster size)."""
    return offset % h.cluster_size == 0 and h.header_bytes <= offset < end


def table_offset_valid(h: Header, offset: int, end: int) -> bool:
    """Invariant 3: a whole table fits before the end of the file."""
    return cluster_offset_valid(h, offset, end) and offset + h.table_bytes <= end


def read(storage: Storage, path: str = "") -> Header:
    """The validated header of an image, with its backing file name."""
    size = storage.size()
    h = parse(storage.pread(HEADER_LENGTH, 0), size, path or storage.path)
    if h.features & F_BACKING_FILE:
        raw = storage.pread(h.backing_filename_size, h.backing_filename_offset)
        if len(raw) != h.backing_filename_size:
            raise ImageError(f"'{path or storage.path}': the QED backing file name is past "
                             "the end of the file")
        try:
            h.backing_file = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ImageError(f"'{path or storage.path}': the QED backing file name "
                             f"'{printable(raw.decode('latin-1'))}' is not UTF-8") from None
        if "\0" in h.backing_file:
            raise ImageError(f"'{path or storage.path}': the QED backing file name "
                             "contains a NUL byte")
    return h


_FEATURES = field_offset("features")
_AUTOCLEAR = field_offset("autoclear_features")
_U64 = struct.Struct("<Q")


def write_features(storage: Storage, h: Header, features: int, barrier: Barrier | None):
    """Store the `features` word in place; synced with `barrier` unless None (a cleared
    NEED_CHECK needs no sync of its own: lost, it only costs a check)."""
    h.features = features
    storage.pwrite(_U64.pack(features), _FEATURES)
    if barrier is not None:
        storage.sync(barrier)


def clear_autoclear(storage: Storage, h: Header) -> None:
    """"Feature bits": unknown autoclear bits are cleared (durably) before the image is
    written, so a later program that knows them sees that an older one wrote here."""
    h.autoclear_features &= KNOWN_AUTOCLEAR
    storage.pwrite(_U64.pack(h.autoclear_features), _AUTOCLEAR)
    storage.sync(Barrier.HEADER)
