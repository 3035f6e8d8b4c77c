"""The --snapshot overlay against a model: whatever is written, zeroed or discarded, reads
match a plain bytearray, block status stays consistent, and the base never changes."""

from hypothesis import given, settings, strategies as st

from nbdserver import make_raw
from qnbd.block.overlay import GRAIN, SnapshotOverlay
from qnbd.block.raw import RawDevice

SIZE = 5 * GRAIN + 1536  # a partial last grain (whole sectors: a raw device rounds its size up to
# 512 bytes, as qemu's raw driver does, so an odd size would grow a zero tail)

ops = st.lists(st.tuples(st.sampled_from(["write", "zero", "discard"]),
                         st.integers(0, SIZE - 1), st.integers(1, 3 * GRAIN), st.integers(1, 255)),
               max_size=12)


@settings(max_examples=150, deadline=None)
@given(ops=ops)
def test_overlay_matches_model(tmp_path_factory, ops):
    base_data = bytes((i * 7) % 251 for i in range(SIZE))
    path = make_raw(tmp_path_factory.mktemp("ov") / "base.raw", SIZE, base_data)
    overlay = SnapshotOverlay(RawDevice(path, read_only=True))
    model = bytearray(base_data)
    try:
        for op, offset, length, byte in ops:
            length = min(length, SIZE - offset)
            if op == "write":
                overlay.write(offset, bytes([byte]) * length)
                model[offset:offset + length] = bytes([byte]) * length
            elif op == "zero":
                overlay.write_zeroes(offset, length)
                model[offset:offset + length] = bytes(length)
            else:
                overlay.discard(offset, length)
                # Only whole grains (or the tail grain up to the end) read as zeros after.
                start = -(-offset // GRAIN) * GRAIN
                end = SIZE if offset + length >= SIZE else (offset + length) // GRAIN * GRAIN
                if end > start:
                    model[start:end] = bytes(end - start)
        assert overlay.read(0, SIZE) == bytes(model)
        pos = 0
        while pos < SIZE:
            (ext,) = overlay.block_status(pos, SIZE - pos)
            if ext.flags & 2:
                assert model[pos:pos + ext.length] == bytes(ext.length)
            pos += ext.length
    finally:
        overlay.close()
    with open(path, "rb") as f:
        assert f.read() == base_data
