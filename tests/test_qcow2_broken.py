"""Broken images: the engine refuses them with a one-line project error, or copes.

Issue 2, "Broken images": every header field and table location is validated before use;
a broken image raises a QnbdError with a one-line reason (never IndexError, struct.error,
a giant allocation or a hang), and the file is left as it was. Images start valid (made by
qemu-img / qemu-io) and are damaged here with `struct` at the offsets of qcow2.rst.

The one change the engine may make to a damaged file is DESIGN.md rule 7: an inconsistency
met at run time in a read-write session sets the corrupt bit (header bytes 72-79), and
nothing else is written.
"""

import errno
import gzip
import os
import resource
import shutil
import signal
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qnbd.errors import IOFailure, QnbdError
from qnbd.formats import open_image
from qnbd.block.bitmap_data import DirtyBitmap
from qnbd.qcow2.bitmap_format import bitmap_bytes

from peers import qemu_img, qemu_io
from qcow2util import COPIED, EXT_BITMAPS, bitmap_locations, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, feature_entry, patch_bytes, patch_fields, patch_u64, qemu_info, qemu_says_corrupt, read_extensions, read_field, read_u64, truncate, write_extensions

SIZE = 4 << 20
READ_CHUNK = 1 << 20
READ_LIMIT = 64 << 20  # beyond this, the middle of a (fuzzed) huge image is not read


# -- base images ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    qemu_img("create", "-f", "qcow2", str(d / "v3.qcow2"), str(SIZE))
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), str(SIZE))
    qemu_img("create", "-f", "qcow2", str(d / "data.qcow2"), str(SIZE))
    qemu_io(str(d / "data.qcow2"), "qcow2", "write -P 1 0 1M")
    # Extended L2 entries, same layout: subclusters written, zeroed, partly allocated.
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", str(d / "data-extl2.qcow2"),
             str(SIZE))
    qemu_io(str(d / "data-extl2.qcow2"), "qcow2", "write -P 1 0 1M", "write -z 6144 4096",
            "write -P 2 2M 3000")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(d / "data2.qcow2"), str(SIZE))
    qemu_io(str(d / "data2.qcow2"), "qcow2", "write -P 1 0 1M")
    qemu_img("create", "-f", "qcow2", str(d / "base.qcow2"), str(SIZE))
    qemu_io(str(d / "base.qcow2"), "qcow2", "write -P 2 0 2M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(d / "overlay.qcow2"))
    return d


@pytest.fixture
def copy(bases, tmp_path):
    """copy("v3") -> path of a private copy of a base image (backing files come along)."""
    def make(name: str):
        if name == "overlay":
            shutil.copy(bases / "base.qcow2", tmp_path / "base.qcow2")
        dst = tmp_path / f"{name}.qcow2"
        shutil.copy(bases / f"{name}.qcow2", dst)
        return dst
    return make


# -- the property every case checks ----------------------------------------------------

class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def alarm(_signum, _frame):
        raise Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# Opening and reading a 4 MiB test image needs a few MiB; a table or bitmap sized by what a
# damaged field claims needs far more (issue 16.3: 2 GiB for four bitmaps).
MEMORY_BUDGET = 512 << 20


@contextmanager
def memory_limit(budget: int = MEMORY_BUDGET):
    """RLIMIT_AS lowered to what the process maps now plus `budget`: an allocation driven
    by the file's contents raises MemoryError (and fails the test) instead of passing
    unnoticed on a machine with memory to spare or overcommit. Only the soft limit moves,
    so it is restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + budget if hard == resource.RLIM_INFINITY else min(mapped + budget, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    except MemoryError:
        raise AssertionError(f"more than {budget >> 20} MiB allocated for a damaged image "
                             "(sized by what the file claims?)") from None
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def read_all(img) -> None:
    """Every byte (up to READ_LIMIT and the last chunk) and every loaded bitmap's extents,
    as a client of `qnbd serve -B` would read them."""
    size = img.size
    offsets = range(0, min(size, READ_LIMIT), READ_CHUNK)
    for offset in offsets:
        img.read(offset, min(READ_CHUNK, size - offset))
    if size > READ_LIMIT:
        img.read(size - READ_CHUNK, READ_CHUNK)
    for bitmap in img.bitmaps.loaded.values():
        bitmap.extents(0, min(size, READ_LIMIT))


def masked_allowed_changes(data: bytes) -> bytes:
    """The file with what a read-write session may change in a damaged image cleared:
    the corrupt bit (rule 7) and the in_use flags of the bitmap directory (rule 9: set
    on a read-write open; after a failure they stay set, and the bitmaps untrusted)."""
    if len(data) < 104 or data[4:8] != b"\0\0\0\3":
        return data
    out = bytearray(data)
    incompat = struct.unpack_from(">Q", data, 72)[0] & ~INCOMPAT_CORRUPT
    struct.pack_into(">Q", out, 72, incompat)
    pos = struct.unpack_from(">I", data, 100)[0]   # header_length: extensions follow
    while 0 < pos and pos + 8 <= min(len(data), 1 << 16):
        ext_type, length = struct.unpack_from(">II", data, pos)
        if ext_type == 0:
            break
        if ext_type == EXT_BITMAPS and length >= 24 and pos + 32 <= len(data):
            nb, _, size, offset = struct.unpack_from(">IIQQ", data, pos + 8)
            entry = offset
            for _ in range(min(nb, 64)):
                if entry + 24 > min(len(data), offset + size):
                    break
                flags, _, _, name_size, extra = struct.unpack_from(">IBBHI", data, entry + 12)
                struct.pack_into(">I", out, entry + 12, flags & ~1)
                end = entry + 24 + extra + name_size
                entry = end + (-end % 8)
                out[end:entry] = bytes(len(out[end:entry]))  # padding, rewritten as zeros
        pos += 8 + length + (-length % 8)
    return bytes(out)


def try_open_and_read(path, read_only: bool, timeout: float = 10):
    """Open, read everything and close; returns None on success or the QnbdError raised.
    Any other exception (or a hang) fails the test. When it fails, the file must be
    unchanged but for what masked_allowed_changes clears (read-write sessions only)."""
    before = path.read_bytes()
    error = stage = None
    img = None
    with memory_limit():
        try:
            with time_limit(timeout):
                stage = "open"
                img = open_image(str(path), "qcow2", read_only=read_only)
                stage = "read"
                read_all(img)
        except QnbdError as e:
            error = e
        finally:
            if img is not None:
                try:
                    img.close()
                except QnbdError as e:  # e.g. storing bitmaps into a damaged image
                    error, stage = error or e, stage if error else "close"
    if error is None:
        return None
    message = str(error)
    assert message and message.isprintable(), repr(message)  # one line, no control chars
    after = path.read_bytes()
    if read_only or stage == "open":
        assert after == before, f"{stage} failed ({message}) but the file changed"
    elif stage == "read" and after[4:8] == b"\0\0\0\3" and \
            not struct.unpack_from(">Q", after, 72)[0] & INCOMPAT_CORRUPT:
        # A data error (a damaged compressed cluster) fails the read without making the
        # image corrupt; the session then closes cleanly and stores its bitmaps (rule 9),
        # so the file may change, but must still open.
        open_image(str(path), "qcow2", read_only=True).close()
    else:
        assert masked_allowed_changes(after) == masked_allowed_changes(before), \
            f"{stage} failed ({message}) and more than the corrupt bit and in_use changed"
    if stage == "read":
        assert isinstance(error, IOFailure) and error.errno == errno.EIO, repr(error)
    return error


def expect_error(path, fragment: str, read_only=(True, False)):
    for ro in read_only:
        error = try_open_and_read(path, ro)
        mode = "read-only" if ro else "read-write"
        assert error is not None, f"{mode} open of a broken image succeeded"
        assert fragment.lower() in str(error).lower(), f"{mode}: {error}"


def expect_ok(path, read_only=(True, False)):
    for ro in read_only:
        error = try_open_and_read(path, ro)
        assert error is None, f"{'read-only' if ro else 'read-write'}: {error}"


# -- header fields -----------------------------------------------------------------------

BOTH = ["v3", "v2"]

FIELD_CASES = [
    # (id, fields to patch, expected fragment of the one-line error)
    ("bad-magic", dict(magic=b"QFI\xfa"), "bad magic"),
    ("version-1", dict(version=1), "version 1"),
    ("version-4", dict(version=4), "version 4"),
    ("version-huge", dict(version=0xFFFFFFFF), "version 4294967295"),
    ("cluster-bits-8", dict(cluster_bits=8), "cluster size"),
    ("cluster-bits-22", dict(cluster_bits=22), "cluster size"),
    ("cluster-bits-63", dict(cluster_bits=63), "cluster size"),
    ("cluster-bits-huge", dict(cluster_bits=0xFFFFFFFF), "cluster size"),
    ("size-2^63", dict(size=1 << 63), "virtual size"),
    ("size-max", dict(size=(1 << 64) - 1), "virtual size"),
    ("l1-too-small", dict(size=1 << 40), "l1_size"),
    ("l1-size-0", dict(l1_size=0), "l1_size"),
    ("l1-enormous", dict(l1_size=1 << 31), "l1_size"),
    ("l1-size-max", dict(l1_size=0xFFFFFFFF), "l1_size"),
    ("l1-unaligned", dict(l1_table_offset=0x30008), "l1_table offset 0x30008 is not aligned"),
    ("l1-past-eof", dict(l1_table_offset=0x10000000000),
     "l1_table offset 0x10000000000 is past the end of the file"),
    ("l1-offset-max", dict(l1_table_offset=(1 << 64) - (1 << 16)), "l1_table offset"),
    ("reftable-unaligned", dict(refcount_table_offset=0x10200), "refcount_table offset"),
    ("reftable-past-eof", dict(refcount_table_offset=0x10000000000),
     "refcount_table offset 0x10000000000 is past the end of the file"),
    ("reftable-clusters-0", dict(refcount_table_clusters=0), "refcount table"),
    ("reftable-clusters-huge", dict(refcount_table_clusters=0xFFFFFFFF),
     "refcount_table_clusters"),
    ("reftable-clusters-past-eof", dict(refcount_table_clusters=100),
     "refcount_table (0x10000, 6553600 bytes) runs past the end of the file"),
    ("nb-snapshots-huge", dict(nb_snapshots=0xFFFFFFFF, snapshots_offset=0x10000),
     "nb_snapshots"),
    ("snapshots-past-eof", dict(nb_snapshots=1, snapshots_offset=0x10000000000),
     "snapshots offset 0x10000000000 is past the end of the file"),
    # Issue 16: the offset is inside the file, the table is not; the error said the
    # offset was past the end.
    ("snapshots-table-past-eof", dict(nb_snapshots=60000, snapshots_offset=0x10000),
     "snapshots (0x10000, 2400000 bytes) runs past the end of the file"),
    ("snapshots-unaligned", dict(nb_snapshots=1, snapshots_offset=0x10008), "snapshots"),
    ("crypt-aes", dict(crypt_method=1), "encrypted images are not supported"),
    ("crypt-luks", dict(crypt_method=2), "encrypted images are not supported"),
    ("crypt-unknown", dict(crypt_method=77), "encrypted images are not supported"),
    ("backing-name-past-cluster", dict(backing_file_offset=0x20000, backing_file_size=10),
     "backing file name"),
    ("backing-name-too-long", dict(backing_file_offset=0x200, backing_file_size=1024),
     "backing file name"),
    ("backing-name-offset-max", dict(backing_file_offset=(1 << 64) - 1, backing_file_size=1),
     "backing file name"),
]


@pytest.mark.parametrize("base", BOTH)
@pytest.mark.parametrize("case", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_bad_header_field(copy, base, case):
    _id, fields, fragment = case
    path = copy(base)
    patch_fields(path, **fields)
    expect_error(path, fragment)


V3_FIELD_CASES = [
    ("header-length-unaligned", dict(header_length=108), "header_length 108"),
    ("header-length-small", dict(header_length=96), "header_length 96"),
    ("header-length-0", dict(header_length=0), "header_length 0"),
    ("header-length-past-cluster", dict(header_length=0x10008), "header_length 65544"),
    ("header-length-max", dict(header_length=0xFFFFFFF8), "header_length"),
    ("refcount-order-7", dict(refcount_order=7), "refcount_order 7"),
    ("refcount-order-huge", dict(refcount_order=0xFFFFFFFF), "refcount_order"),
    ("incompat-bit-10-unnamed", dict(incompatible_features=1 << 10),
     "Unsupported qcow2 feature(s): bit 10"),
    ("incompat-bit-63", dict(incompatible_features=1 << 63), "bit 63"),
    # The data file bit without the extension naming the file: nothing to open.
    ("external-data-file", dict(incompatible_features=INCOMPAT_DATA_FILE),
     "uses an external data file but does not name it"),
    # Subclusters of 256 bytes: qcow2.rst wants 16 KiB clusters with extended L2 entries.
    ("extended-l2-8k-clusters", dict(incompatible_features=INCOMPAT_EXTL2, cluster_bits=13),
     "extended L2 entries need clusters of at least 16384 bytes"),
    ("compression-bit-type-0", dict(incompatible_features=INCOMPAT_COMPRESSION),
     "compression type"),
    ("compression-type-no-bit", dict(compression_type=1), "compression type"),
    ("compression-type-unknown", dict(incompatible_features=INCOMPAT_COMPRESSION,
                                      compression_type=9), "compression type 9"),
]


@pytest.mark.parametrize("case", V3_FIELD_CASES, ids=[c[0] for c in V3_FIELD_CASES])
def test_bad_v3_header_field(copy, case):
    _id, fields, fragment = case
    path = copy("v3")
    patch_fields(path, **fields)
    expect_error(path, fragment)


def test_compression_type_without_the_field(copy):
    """header_length 104 has no compression_type byte: the bit alone is inconsistent."""
    path = copy("v3")
    patch_fields(path, header_length=104, incompatible_features=INCOMPAT_COMPRESSION)
    exts = read_extensions(path)
    patch_bytes(path, 104, bytes(16))
    write_extensions(path, exts)
    expect_error(path, "compression type")


def test_unknown_incompatible_bit_named_by_feature_table(copy):
    path = copy("v3")
    exts = read_extensions(path)
    exts = [(t, d + feature_entry(0, 10, "frobnicated clusters") if t == EXT_FEATURE_TABLE
             else d) for t, d in exts]
    write_extensions(path, exts)
    patch_fields(path, incompatible_features=1 << 10)
    expect_error(path, "Unsupported qcow2 feature(s): frobnicated clusters")


def test_feature_name_with_control_characters_stays_one_line(copy):
    path = copy("v3")
    exts = [(EXT_FEATURE_TABLE, feature_entry(0, 12, "evil\nname\r\x1b[2J"))]
    write_extensions(path, exts)
    patch_fields(path, incompatible_features=1 << 12)
    expect_error(path, "Unsupported qcow2 feature(s): evil")


def test_corrupt_bit(copy):
    path = copy("data")
    patch_fields(path, incompatible_features=INCOMPAT_CORRUPT)
    expect_ok(path, read_only=[True])
    expect_error(path, "corrupt", read_only=[False])


def test_dirty_bit(copy):
    """Rule 6: read-only opens of a dirty image need no repair; a read-write open checks
    and repairs it first (here there is nothing to repair) and clears the bit."""
    path = copy("data")
    patch_fields(path, incompatible_features=INCOMPAT_DIRTY)
    expect_ok(path, read_only=[True])
    open_image(path, "qcow2", read_only=False).close()
    assert qemu_info(path)["dirty-flag"] is False


def test_dirty_bit_with_broken_refcounts_is_repaired_on_open(copy):
    """A lazy-refcounts crash leaves refcounts too low: the read-write open rebuilds them
    so that the next allocation cannot reuse a cluster in use."""
    path = copy("data")
    patch_fields(path, incompatible_features=INCOMPAT_DIRTY)
    block = read_u64(path, read_field(path, "refcount_table_offset"))
    patch_bytes(path, block, bytes(1 << read_field(path, "cluster_bits")))  # all lost
    dev = open_image(path, "qcow2", read_only=False)
    try:
        dev.write(8 << 20, b"n" * 65536)  # must not land on a cluster in use
    finally:
        dev.close()
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 1 0 1M", path],
                       capture_output=True, text=True)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


def test_dirty_image_with_damaged_tables_is_refused_untouched(copy):
    """Rule 6: the repair on open fixes what a crash inside the dirty bit leaves (refcounts,
    COPIED flags), not damaged tables. An extended-L2 image whose header lost the EXTL2
    bit reads its bitmap words as L2 entries: the read-write open is refused in one line
    with not a byte written (before, it "fixed" some entries, then failed anyway)."""
    path = copy("data-extl2")
    patch_fields(path, incompatible_features=INCOMPAT_DIRTY)
    expect_error(path, "tables are damaged", read_only=[False])  # checks: file unchanged
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr   # what qemu sees: corruptions, still


def test_unknown_compatible_and_autoclear_bits_are_accepted(copy):
    path = copy("data")
    patch_fields(path, compatible_features=1 << 40, autoclear_features=1 << 40)
    expect_ok(path)


# -- header extensions ---------------------------------------------------------------------

@pytest.mark.parametrize("base", BOTH)
def test_extension_longer_than_cluster(copy, base):
    path = copy(base)
    write_extensions(path, [(0x12345678, b"")])
    start = 112 if base == "v3" else 72
    patch_bytes(path, start + 4, struct.pack(">I", 0x20000))
    expect_error(path, "header extension")


@pytest.mark.parametrize("base", BOTH)
def test_extension_length_max(copy, base):
    path = copy(base)
    start = 112 if base == "v3" else 72
    patch_bytes(path, start, struct.pack(">II", EXT_FEATURE_TABLE, 0xFFFFFFFF))
    expect_error(path, "header extension")


def test_extensions_without_end_marker(copy):
    path = copy("v3")
    with open(path, "r+b") as f:  # fill the whole first cluster with tiny extensions
        f.seek(112)
        f.write(struct.pack(">II", 0x1234, 0) * ((0x10000 - 112) // 8))
    expect_error(path, "header extension")


def test_duplicate_backing_format_extension(copy):
    path = copy("overlay")
    exts = read_extensions(path)
    name_offset = read_field(path, "backing_file_offset")
    name = path.read_bytes()[name_offset:name_offset + read_field(path, "backing_file_size")]
    end = write_extensions(path, exts + [(0xE2792ACA, b"raw")])
    patch_bytes(path, end, name)
    patch_fields(path, backing_file_offset=end)
    expect_error(path, "appears twice")


# -- backing files ---------------------------------------------------------------------------

def test_backing_file_ok(copy):
    expect_ok(copy("overlay"))


def test_backing_file_missing(copy):
    path = copy("overlay")
    os.unlink(path.parent / "base.qcow2")
    expect_error(path, "base.qcow2")


def test_backing_file_broken(copy):
    path = copy("overlay")
    patch_fields(path.parent / "base.qcow2", cluster_bits=30)
    expect_error(path, "backing file")


def test_backing_format_unknown(copy):
    path = copy("overlay")
    exts = [(t, b"vmdk" if t == 0xE2792ACA else d) for t, d in read_extensions(path)]
    name_offset = read_field(path, "backing_file_offset")
    name = path.read_bytes()[name_offset:name_offset + read_field(path, "backing_file_size")]
    end = write_extensions(path, exts)
    patch_bytes(path, end, name)
    patch_fields(path, backing_file_offset=end)
    expect_error(path, "vmdk")


def test_backing_name_with_newline_stays_one_line(copy):
    path = copy("overlay")
    offset = read_field(path, "backing_file_offset")
    patch_bytes(path, offset, b"no\nsuch\rfile")
    patch_fields(path, backing_file_size=12)
    expect_error(path, "backing file")


def test_backing_loop(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a), "1M")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", str(b), "1M")
    expect_error(a, "loop")
    expect_error(b, "loop")


def test_backing_self_loop(tmp_path):
    a = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", str(a), "1M")
    expect_error(a, "loop")


def test_backing_chain_too_deep(tmp_path):
    qemu_img("create", "-f", "qcow2", str(tmp_path / "img0.qcow2"), "1M")
    for i in range(1, 20):
        qemu_img("create", "-f", "qcow2", "-u", "-b", f"img{i - 1}.qcow2", "-F", "qcow2",
                 str(tmp_path / f"img{i}.qcow2"), "1M")
    expect_ok(tmp_path / "img8.qcow2")
    expect_error(tmp_path / "img19.qcow2", "deeper than")


# -- truncated files ----------------------------------------------------------------------------

@pytest.mark.parametrize("base", BOTH)
@pytest.mark.parametrize("length", [0, 3, 50, 100, 0x200, 0x10000, 0x10000 + 0x8000,
                                    0x30004])
def test_truncated(copy, base, length):
    """Cut in the header, in the extensions, in the refcount table, in the L1 table."""
    path = copy(base)
    truncate(path, length)
    expect_error(path, "")


@pytest.mark.parametrize("base", ["data", "data2"])
@pytest.mark.parametrize("length", [0x40000, 0x48000, 0x50000, 0x90000])
def test_truncated_after_tables(copy, base, length):
    """Cut in or before the L2 table (read fails with EIO), or in the data (reads zeros)."""
    path = copy(base)
    truncate(path, length)
    for ro in (True, False):
        error = try_open_and_read(path, ro)
        if length <= 0x40000 + 0x8000:
            assert isinstance(error, IOFailure), error
        else:
            assert error is None, error


# -- damaged tables: reads fail with EIO, writes set the corrupt bit ------------------------------

L1 = 0x30000   # qemu-img's layout for these images: header, reftable, refblock, L1, L2, data
L2 = 0x40000
REFBLOCK = 0x20000


def check_write_sets_corrupt(path, offset=0, length=0x10000):
    before = path.read_bytes()
    img = open_image(str(path), "qcow2", read_only=False)
    try:
        with pytest.raises(IOFailure) as info:
            img.write(offset, b"\x07" * length)
        assert info.value.errno == errno.EIO
        assert "\n" not in str(info.value)
        with pytest.raises(IOFailure):  # no more writes once corrupt
            img.write(offset, b"\x07" * length)
        with pytest.raises(IOFailure):  # nor metadata write-back
            img.flush()
    finally:
        img.close()
    after = path.read_bytes()
    assert read_field(path, "incompatible_features") & INCOMPAT_CORRUPT
    assert qemu_says_corrupt(path)
    # Nothing but the corrupt bit was written.
    assert masked_allowed_changes(after) == masked_allowed_changes(before)
    expect_error(path, "corrupt", read_only=[False])


@pytest.mark.parametrize("entry", [COPIED | 0x10000000000, COPIED | 0x41000, 0x10000000000])
def test_l1_entry_past_eof_or_unaligned(copy, entry):
    path = copy("data")
    patch_u64(path, L1, entry)
    expect_error(path, "L2 table offset", read_only=[True])
    check_write_sets_corrupt(path)


def test_l1_entry_past_eof_read_write_read(copy):
    """A read-write session that meets the damage while reading marks the image corrupt."""
    path = copy("data")
    patch_u64(path, L1, COPIED | 0x10000000000)
    expect_error(path, "L2 table offset", read_only=[False])
    assert qemu_says_corrupt(path)


@pytest.mark.parametrize("base", ["data", "data2"])
def test_l2_entry_unaligned(copy, base):
    path = copy(base)
    host = read_u64(path, L2)
    patch_u64(path, L2, host + 0x200)  # COPIED kept
    expect_error(path, "unaligned", read_only=[True])
    if base == "data":
        check_write_sets_corrupt(path)
    else:  # v2 has no corrupt bit, but the write must still fail and write nothing
        before = path.read_bytes()
        img = open_image(str(path), "qcow2", read_only=False)
        with pytest.raises(IOFailure):
            img.write(0, b"\x07" * 0x10000)
        img.close()
        assert path.read_bytes() == before


def test_l2_entry_unaligned_zero_and_discard(copy):
    """Zeroing or discarding through a bad entry must not free the wrong clusters."""
    for op in ("write_zeroes", "discard"):
        path = copy("data")
        host = read_u64(path, L2)
        patch_u64(path, L2, host + 0x200)
        before = path.read_bytes()
        img = open_image(str(path), "qcow2", read_only=False)
        try:
            try:
                getattr(img, op)(0, 0x10000)
                img.flush()
            except IOFailure:
                pass
        finally:
            img.close()
        after = path.read_bytes()
        assert masked_allowed_changes(after) == masked_allowed_changes(before), op
        assert qemu_says_corrupt(path), op


def test_l2_entry_past_eof_reads_zeros(copy):
    """Data past the end of the file reads as zeros (qemu does the same)."""
    path = copy("data")
    patch_u64(path, L2, COPIED | 0x10000000000)
    expect_ok(path)


def test_l2_compressed_entry_garbage(copy):
    path = copy("data")
    patch_u64(path, L2, (1 << 62) | (3 << 54) | 0x51234)  # points into plain data
    expect_error(path, "compressed cluster", read_only=[True])


def test_refcount_block_says_l1_is_free(copy):
    """Allocation of a new L2 table would land on the L1 table: refused, corrupt."""
    path = copy("v3")
    patch_bytes(path, REFBLOCK + 2 * (L1 >> 16), b"\0\0")  # 16-bit refcount of L1 -> 0
    check_write_sets_corrupt(path)


def test_refcount_block_says_l2_is_free(copy):
    """A new data cluster would land on the L2 table: refused, corrupt."""
    path = copy("data")
    patch_bytes(path, REFBLOCK + 2 * (L2 >> 16), b"\0\0")
    check_write_sets_corrupt(path, offset=2 << 20)


@pytest.mark.parametrize("target", [0x10000, REFBLOCK, L1, L2])
def test_l2_entry_points_at_metadata(copy, target):
    """Writing in place through a COPIED entry that points at metadata: refused, corrupt."""
    path = copy("data")
    patch_u64(path, L2, COPIED | target)
    check_write_sets_corrupt(path)


def test_reftable_entry_past_eof(copy):
    path = copy("v3")
    patch_u64(path, 0x10000, 0x10000000000)
    expect_ok(path, read_only=[True])  # reads do not need refcounts
    check_write_sets_corrupt(path)


# -- fuzzing -----------------------------------------------------------------------------------------

FUZZ_REGIONS = {  # (start, length) of the areas damaged at random
    "header": (0, 512),
    "reftable": (0x10000, 64),
    "refblock": (REFBLOCK, 64),
    "l1": (L1, 8),
    "l2": (L2, 256),
}


@pytest.fixture(scope="module")
def fuzz_bases(bases):
    return {name: (bases / f"{name}.qcow2").read_bytes()
            for name in ("data", "data2", "data-extl2")}


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(["data", "data2", "data-extl2"]),
       edits=st.lists(st.tuples(st.sampled_from(sorted(FUZZ_REGIONS)),
                                st.integers(0, 511),
                                st.one_of(st.binary(min_size=1, max_size=8),
                                          st.sampled_from([b"\xff" * 8, b"\0" * 8,
                                                           b"\x80", b"\x7f", b"\x01"]))),
                      min_size=1, max_size=4),
       read_only=st.booleans())
def test_fuzz_open_and_read(fuzz_bases, tmp_path, base, edits, read_only):
    data = bytearray(fuzz_bases[base])
    for region, pos, payload in edits:
        start, length = FUZZ_REGIONS[region]
        offset = start + pos % length
        data[offset:offset + len(payload)] = payload
    path = tmp_path / "fuzz.qcow2"
    path.write_bytes(data)
    try_open_and_read(path, read_only)


def test_fuzz_property_fails_on_allocations_sized_by_the_file(tmp_path, monkeypatch):
    """The property the fuzzers check includes memory: were bitmaps loaded whole again (as
    before issue 16.3: four bitmaps of a 2 TiB disk at granularity 512 are 2 GiB), the
    open would fail the test instead of passing on a machine with memory to spare."""
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "2T")
    for i in range(4):
        qemu_img("bitmap", "--add", "-g", "512", str(path), f"b{i}")
    assert try_open_and_read(path, read_only=True) is None  # paged: well within budget
    paged_init = DirtyBitmap.__init__

    def eager_init(self, entry, disk_size, *args, **kwargs):
        paged_init(self, entry, disk_size, *args, **kwargs)
        self.bits = bytearray(bitmap_bytes(disk_size, entry.granularity))  # the old load

    monkeypatch.setattr(DirtyBitmap, "__init__", eager_init)
    with pytest.raises(AssertionError, match="MiB allocated for a damaged image"):
        try_open_and_read(path, read_only=True)


@pytest.mark.parametrize("target", [0x10000, L1])
def test_l1_entry_points_at_other_metadata(copy, target):
    """An "L2 table" that is really the refcount table or the L1 table itself must not be
    written back over it: the write is refused and the image marked corrupt."""
    path = copy("data")
    patch_u64(path, L1, COPIED | target)
    check_write_sets_corrupt(path, offset=0x20000)


def test_reftable_entry_unaligned(copy):
    path = copy("v3")
    patch_u64(path, 0x10000, 0x20200)
    expect_ok(path, read_only=[True])
    check_write_sets_corrupt(path)


@pytest.fixture
def snap(copy):
    path = copy("data")
    qemu_img("snapshot", "-c", "s1", str(path))
    return path, read_field(path, "snapshots_offset")


def test_snapshot_ok(snap):
    expect_ok(snap[0])


@pytest.mark.parametrize("field,offset,value,fragment", [
    ("l1_offset", 0, struct.pack(">Q", 0x10000000000), "snapshot 0 L1 table"),
    ("l1_offset-unaligned", 0, struct.pack(">Q", 0x30008), "snapshot 0 L1 table"),
    ("l1_size", 8, struct.pack(">I", 0xFFFFFFFF), "snapshot 0 L1 table"),
    ("extra_data_size", 36, struct.pack(">I", 0xFFFFFFFF), "extra data"),
    ("name-lengths", 12, struct.pack(">HH", 0xFFFF, 0xFFFF), "snapshot table entry 0"),
])
def test_snapshot_table_damaged(snap, field, offset, value, fragment):
    path, table = snap
    patch_bytes(path, table + offset, value)
    expect_error(path, fragment)


def test_snapshot_count_too_large(snap):
    path, _table = snap
    patch_fields(path, nb_snapshots=60000)
    expect_error(path, "snapshot")


@pytest.mark.parametrize("table", [0, 0x20000])
def test_snapshot_table_on_other_metadata(copy, table):
    path = copy("data")
    patch_fields(path, nb_snapshots=1, snapshots_offset=table)
    expect_error(path, "snapshot")


def _field_value(name: str):
    from qcow2util import HEADER_FIELDS
    code = HEADER_FIELDS[name][1]
    if code == ">4s":
        return st.binary(min_size=4, max_size=4)
    top = (1 << (8 * struct.calcsize(code))) - 1
    interesting = [0, 1, 2, 3, 4, 7, 8, 9, 16, 21, 22, 63, 64, 104, 112, 0x200, 0x10000,
                   0x20000, 0x30000, 0x40000, 0x150000, 1 << 31, 1 << 32, 1 << 40, 1 << 63]
    return st.one_of(st.integers(0, top),
                     st.sampled_from([v for v in interesting if v <= top] + [top]))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(["data", "data2", "data-extl2"]),
       fields=st.lists(st.sampled_from(["magic", "version", "backing_file_offset",
                                        "backing_file_size", "cluster_bits", "size",
                                        "crypt_method", "l1_size", "l1_table_offset",
                                        "refcount_table_offset", "refcount_table_clusters",
                                        "nb_snapshots", "snapshots_offset",
                                        "incompatible_features", "compatible_features",
                                        "autoclear_features", "refcount_order",
                                        "header_length", "compression_type"])
                       .flatmap(lambda n: st.tuples(st.just(n), _field_value(n))),
                       min_size=1, max_size=3),
       read_only=st.booleans())
def test_fuzz_header_fields(fuzz_bases, tmp_path, base, fields, read_only):
    path = tmp_path / "fuzz.qcow2"
    path.write_bytes(fuzz_bases[base])
    patch_fields(path, **dict(fields))
    try_open_and_read(path, read_only)


def test_backing_name_with_nul(copy):
    path = copy("v3")
    patch_fields(path, backing_file_offset=512, backing_file_size=1)  # bytes there are 0
    expect_error(path, "NUL")


# -- bitmaps (qcow2.rst "Bitmaps extension"): directory, tables and data of qemu's bitmaps --


@pytest.fixture(scope="module")
def bitmap_base(bases):
    """An image with two auto bitmaps (64 KiB and 4 KiB granularity) that have recorded a
    1 MiB write, so each has a directory entry, a table and data clusters."""
    path = bases / "bitmaps.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), str(SIZE))
    qemu_img("bitmap", "--add", str(path), "b0")
    qemu_img("bitmap", "--add", "-g", "4096", str(path), "b1")
    qemu_io(str(path), "qcow2", "write -P 1 0 1M")
    return path.read_bytes(), bitmap_locations(path)


def test_bitmap_base_ok(bitmap_base, tmp_path):
    path = tmp_path / "b.qcow2"
    path.write_bytes(bitmap_base[0])
    expect_ok(path)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(["bitmap_ext", "bitmap_dir", "bitmap_table",
                                                 "bitmap_data"]),
                                st.integers(0, 511),
                                st.one_of(st.binary(min_size=1, max_size=8),
                                          st.sampled_from([b"\xff" * 8, b"\0" * 8, b"\x80",
                                                           b"\x7f", b"\x01", b"\x03"]))),
                      min_size=1, max_size=3),
       read_only=st.booleans())
def test_fuzz_bitmaps(bitmap_base, tmp_path, edits, read_only):
    data, regions = bitmap_base
    data = bytearray(data)
    for region, pos, payload in edits:
        start, length = regions[region]
        offset = start + pos % length
        data[offset:offset + len(payload)] = payload
    path = tmp_path / "fuzz.qcow2"
    path.write_bytes(data)
    try_open_and_read(path, read_only)


# -- the regression corpus: damaged images kept in tests/corpus/ (gzip) ----------------

CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.qcow2.gz"))


@pytest.mark.parametrize("sample", CORPUS, ids=[c.name for c in CORPUS])
@pytest.mark.parametrize("read_only", [True, False])
def test_corpus(sample, tmp_path, read_only):
    path = tmp_path / "sample.qcow2"
    path.write_bytes(gzip.decompress(sample.read_bytes()))
    try_open_and_read(path, read_only)


# -- backing policy: an untrusted image does not choose which host files are read ------


@pytest.fixture
def chains(tmp_path):
    """img/top-same.qcow2 -> img/base.qcow2; img/top-out.qcow2 -> other/base.qcow2;
    img/top-link.qcow2 -> img/link.qcow2, a symlink to other/base.qcow2."""
    (tmp_path / "img").mkdir()
    (tmp_path / "other").mkdir()
    for d in ("img", "other"):
        qemu_img("create", "-f", "qcow2", str(tmp_path / d / "base.qcow2"), str(SIZE))
    os.symlink(tmp_path / "other" / "base.qcow2", tmp_path / "img" / "link.qcow2")
    for name, backing in (("same", "base.qcow2"), ("out", str(tmp_path / "other" / "base.qcow2")),
                          ("link", "link.qcow2")):
        qemu_img("create", "-f", "qcow2", "-b", backing, "-F", "qcow2",
                 str(tmp_path / "img" / f"top-{name}.qcow2"))
    return tmp_path / "img"


@pytest.mark.parametrize("policy, allowed", [("any", {"same", "out", "link"}),
                                             ("same-dir", {"same"}), ("none", set())])
def test_backing_policy(chains, policy, allowed):
    for name in ("same", "out", "link"):
        path = str(chains / f"top-{name}.qcow2")
        if name in allowed:
            open_image(path, "qcow2", backing_policy=policy).close()
        else:
            with pytest.raises(QnbdError, match=f"not allowed by the backing policy '{policy}'"):
                open_image(path, "qcow2", backing_policy=policy)


def test_backing_policy_applies_down_the_chain(tmp_path):
    """same-dir holds for every level: a backing file in the directory may not name one
    outside it."""
    (tmp_path / "other").mkdir()
    qemu_img("create", "-f", "qcow2", str(tmp_path / "other" / "far.qcow2"), str(SIZE))
    qemu_img("create", "-f", "qcow2", "-b", str(tmp_path / "other" / "far.qcow2"), "-F", "qcow2",
             str(tmp_path / "mid.qcow2"))
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2"))
    with pytest.raises(QnbdError, match="far.qcow2' is not allowed"):
        open_image(str(tmp_path / "top.qcow2"), "qcow2", backing_policy="same-dir")
