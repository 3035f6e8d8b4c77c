"""Broken QED images: a one-line project error, and the file left as it was.

Images start valid (made by qemu-img, written by qemu-io) and are damaged here at the
offsets of qed_spec.txt ("Header", "Tables"), taken from the engine's own field table.
Header damage refuses the open; damage inside the tables fails the requests that meet
it (never a traceback, never memory sized by what the file claims, never a write over
metadata that was not ours), and the rest of the image stays usable.
"""

import hashlib
import signal
import struct
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qnbd.errors import IOFailure, QnbdError
from qnbd.formats import open_image
from qnbd.qed import header as hdr

from cli_util import qnbd_subprocess
from peers import qemu_img, qemu_io

CS = 4096
SIZE = 16 << 20  # four L2 tables of 4 MiB
L1 = CS  # qemu-img puts the L1 table in cluster 1
_CODES = {"I": "<I", "Q": "<Q"}


def patch(path, **fields):
    """Set header fields by name (offsets from qnbd.qed.header's field table)."""
    with open(path, "r+b") as f:
        for name, value in fields.items():
            width = 4 if name in ("magic", "cluster_size", "table_size", "header_size",
                                  "backing_filename_offset", "backing_filename_size") else 8
            f.seek(hdr.field_offset(name))
            f.write(value.to_bytes(width, "little"))


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek_u64(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack("<Q", f.read(8))[0]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def image(tmp_path):
    """4 KiB clusters, 2-cluster tables, data at 0-8k and 2M-2M+4k; after the header
    and the L1 table (clusters 1-2) qemu appends each write's data before its L2
    table."""
    path = str(tmp_path / "i.qed")
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", path,
             str(SIZE))
    qemu_io(path, "qed", "write -P 1 0 8k", f"write -P 2 {2 << 20} 4k")
    return path


def l2_offset(path):
    return peek_u64(path, L1)


def open_error(path, read_only):
    try:
        dev = open_image(path, "qed", read_only=read_only)
    except QnbdError as e:
        return e
    dev.close()
    return None


HEADER_CASES = [
    ("bad-magic", dict(magic=0x00444552), "not in QED format"),
    ("cluster-size-1000", dict(cluster_size=1000), "cluster size 1000"),
    ("cluster-size-2k", dict(cluster_size=2048), "cluster size 2048"),
    ("cluster-size-128M", dict(cluster_size=1 << 27), "cluster size"),
    ("cluster-size-0", dict(cluster_size=0), "cluster size 0"),
    ("table-size-0", dict(table_size=0), "table size 0"),
    ("table-size-3", dict(table_size=3), "table size 3"),
    ("table-size-32", dict(table_size=32), "table size 32"),
    ("header-size-0", dict(header_size=0), "header size"),
    ("header-size-huge", dict(header_size=0xFFFFFFFF), "header size"),
    ("unknown-feature", dict(features=0x8), "unsupported QED features 0x8"),
    ("feature-bit-63", dict(features=1 << 63), "unsupported QED features"),
    ("image-size-unaligned", dict(image_size=1000), "image size 1000"),
    ("image-size-huge", dict(image_size=1 << 63), "image size"),
    ("l1-unaligned", dict(l1_table_offset=L1 + 8), "L1 table offset"),
    ("l1-in-header", dict(l1_table_offset=0), "L1 table offset 0x0"),
    ("l1-past-eof", dict(l1_table_offset=1 << 40), "L1 table offset"),
    ("l1-max", dict(l1_table_offset=(1 << 64) - CS), "L1 table offset"),
    # A 1 GiB L1 table claimed by a small file: refused before anything is allocated.
    ("l1-claims-1g", dict(cluster_size=1 << 26, table_size=16, image_size=1 << 30),
     "L1 table offset"),
    ("backing-outside-header", dict(features=hdr.F_BACKING_FILE,
                                    backing_filename_offset=CS - 4,
                                    backing_filename_size=8), "outside the header"),
    ("backing-empty", dict(features=hdr.F_BACKING_FILE, backing_filename_offset=64,
                           backing_filename_size=0), "empty"),
    ("backing-size-huge", dict(features=hdr.F_BACKING_FILE, backing_filename_offset=64,
                               backing_filename_size=0xFFFFFFFF), "outside the header"),
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=lambda c: c[0])
def test_bad_header(image, case):
    _id, fields, fragment = case
    patch(image, **fields)
    before = digest(image)
    for ro in (True, False):
        error = open_error(image, ro)
        assert error is not None and fragment.lower() in str(error).lower(), error
        assert "\n" not in str(error)
    assert digest(image) == before
    r = qnbd_subprocess("info", "-f", "qed", image)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("name,fragment", [
    (b"\xff\xfe", "not UTF-8"),
    (b"a\0b", "NUL"),
    (b"missing.raw", "could not open backing file"),
    (b"i.qed", "loop"),
    (b"evil\nname\x1b[2J", "could not open backing file"),
])
def test_bad_backing_name(image, name, fragment):
    poke(image, 64, name)
    patch(image, features=hdr.F_BACKING_FILE, backing_filename_offset=64,
          backing_filename_size=len(name))
    before = digest(image)
    error = open_error(image, True)
    assert error is not None and fragment.lower() in str(error).lower(), error
    assert "\n" not in str(error) and "\x1b" not in str(error)
    assert digest(image) == before


def test_truncated_header(tmp_path):
    path = tmp_path / "t.qed"
    path.write_bytes(b"QED\0" + bytes(20))
    error = open_error(str(path), True)
    assert "too short" in str(error)


TABLE_CASES = [
    # (id, where to write what (relative to the L2 table or absolute), fragment)
    ("l1-entry-past-eof", lambda p: (L1, 1 << 40), "L2 table offset"),
    ("l1-entry-unaligned", lambda p: (L1, l2_offset(p) + 8), "L2 table offset"),
    ("l1-entry-is-l1", lambda p: (L1, L1), "overlaps the L1 table"),
    ("l2-entry-past-eof", lambda p: (l2_offset(p), 1 << 40), "not a valid cluster"),
    ("l2-entry-unaligned", lambda p: (l2_offset(p), peek_u64(p, l2_offset(p)) + 8),
     "not a valid cluster"),
]


@pytest.mark.parametrize("case", TABLE_CASES, ids=lambda c: c[0])
def test_bad_table_entry_fails_requests_only(image, case):
    _id, where, fragment = case
    at, value = where(image)
    poke(image, at, value.to_bytes(8, "little"))
    before = digest(image)
    for ro in (True, False):
        dev = open_image(image, "qed", read_only=ro)
        try:
            with pytest.raises(IOFailure, match=fragment):
                dev.read(0, 4096)
            assert bytes(dev.read(8 << 20, 4096)) == bytes(4096)  # other tables: fine
            if not ro:
                with pytest.raises(IOFailure, match=fragment):
                    dev.write(0, b"x" * 4096)
        finally:
            dev.close()
        assert digest(image) == before


@pytest.mark.parametrize("target", ["l1", "l2", "l2-second-cluster"])
def test_data_entry_into_a_table_is_never_written(image, target):
    """An L2 entry that names a table cluster: reads show its bytes (harmless), a write
    there is refused, so a damaged image never makes us overwrite metadata."""
    l2 = l2_offset(image)
    victim = {"l1": L1, "l2": l2, "l2-second-cluster": l2 + CS}[target]
    poke(image, l2 + 8 * 1, victim.to_bytes(8, "little"))  # guest cluster 1
    with open(image, "rb") as f:
        f.seek(victim)
        table_before = f.read(CS)
    dev = open_image(image, "qed", read_only=False)
    try:
        dev.read(CS, CS)
        with pytest.raises(IOFailure, match="points into a table"):
            dev.write(CS, b"x" * 100)
        with pytest.raises(IOFailure, match="points into a table"):
            dev.write_zeroes(CS, CS, may_trim=True)
        dev.write(0, b"y" * 100)  # cluster 0 is fine
    finally:
        dev.close()
    with open(image, "rb") as f:
        f.seek(victim)
        assert f.read(CS) == table_before


def test_unfixable_need_check_image_refused_read_write(image):
    l2 = l2_offset(image)
    poke(image, l2 + 8 * 5, peek_u64(image, l2).to_bytes(8, "little"))  # referenced twice
    patch(image, features=hdr.F_NEED_CHECK)
    before = digest(image)
    assert open_error(image, True) is None  # read-only: no check, readable
    error = open_error(image, False)
    assert "could not be repaired" in str(error) and "\n" not in str(error)
    assert digest(image) == before


@contextmanager
def time_limit(seconds):
    def expired(_signum, _frame):
        raise AssertionError(f"took longer than {seconds} s (a hang?)")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _session(path, read_only):
    """Open, read everything, (read-write) write a little, close: the QnbdError
    raised or None; anything else fails the test."""
    dev = None
    try:
        dev = open_image(path, "qed", read_only=read_only)
        for off in range(0, min(dev.size, 64 << 20), 1 << 20):
            try:
                dev.read(off, min(1 << 20, dev.size - off))
            except IOFailure:
                pass  # a damaged table fails the requests that meet it
        if not read_only:
            for off in (0, dev.size // 2, max(0, dev.size - 4096)):
                try:
                    dev.write(off, b"w" * min(4096, dev.size - off))
                except IOFailure:
                    pass
    except QnbdError as e:
        return e
    finally:
        if dev is not None:
            dev.close()
    return None


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(["header", "l1", "l2"]),
                                st.integers(0, 4095), st.integers(0, 255)),
                      min_size=1, max_size=6))
def test_random_damage(image, tmp_path_factory, edits):
    """Random bytes anywhere in the header, the L1 table or an L2 table: one-line
    errors or working requests, never another exception or a hang; a read-only
    session and a refused open leave the file as it was."""
    path = str(tmp_path_factory.mktemp("fuzz") / "f.qed")
    with open(image, "rb") as f:
        original = f.read()
    l2 = int.from_bytes(original[L1:L1 + 8], "little")
    content = bytearray(original)
    for where, at, value in edits:
        base = {"header": 0, "l1": L1, "l2": l2}[where]
        content[base + (at % 64 if where == "header" else at)] = value
    for read_only in (True, False):
        with open(path, "wb") as f:
            f.write(content)
        with time_limit(20):
            error = _session(path, read_only)
        if error is not None:
            assert str(error).isprintable(), repr(str(error))
        with open(path, "rb") as f:
            after = f.read()
        if read_only or error is not None:
            assert after == bytes(content), f"changed after {error}"


def test_need_check_image_with_fixable_and_unfixable_damage_left_as_is(image):
    """A table past the end of the file could be dropped, but a cluster referenced
    twice cannot be fixed: the read-write open refuses before writing anything."""
    l2 = l2_offset(image)
    poke(image, l2 + 8 * 5, peek_u64(image, l2).to_bytes(8, "little"))
    poke(image, L1 + 8 * 3, (1 << 40).to_bytes(8, "little"))
    patch(image, features=hdr.F_NEED_CHECK)
    before = digest(image)
    error = open_error(image, False)
    assert "could not be repaired" in str(error)
    assert digest(image) == before
