"""The --snapshot overlay against a model: whatever is written, zeroed or discarded, reads
match a plain bytearray, block status stays consistent, and the base never changes."""

from hypothesis import example, given, settings, strategies as st

from nbdserver import make_raw
from qnbd.block.grainmap import GRAIN
from qnbd.block.overlay import SnapshotOverlay
from qnbd.block.raw import RawDevice

# A partial last grain; whole sectors, as raw devices are (qemu rounds a raw file up to
# 512-byte sectors, so the device would be larger than an unaligned file).
SIZE = 5 * GRAIN + 1536

ops = st.lists(st.tuples(st.sampled_from(["write", "zero", "discard"]),
                         st.integers(0, SIZE - 1), st.integers(1, 3 * GRAIN), st.integers(1, 255)),
               max_size=12)


@settings(max_examples=150, deadline=None)
@given(ops=ops)
@example(ops=[("discard", 132306, 196608, 1)])  # up to SIZE, short of the device's end
def test_overlay_matches_model(tmp_path_factory, ops):
    base_data = bytes((i * 7) % 251 for i in range(SIZE))
    path = make_raw(tmp_path_factory.mktemp("ov") / "base.raw", SIZE, base_data)
    overlay = SnapshotOverlay(RawDevice(path, read_only=True))
    # A raw image is whole sectors (qemu's bdrv_getlength): the device ends past SIZE and
    # its tail reads as zeros; the grain rules apply at the device's end, not the file's.
    size = overlay.size
    assert size == -(-SIZE // 512) * 512
    model = bytearray(base_data) + bytes(size - SIZE)
    try:
        for op, offset, length, byte in ops:
            length = min(length, size - offset)
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
                end = size if offset + length >= size else (offset + length) // GRAIN * GRAIN
                if end > start:
                    model[start:end] = bytes(end - start)
        assert overlay.read(0, size) == bytes(model)
        pos = 0
        while pos < size:
            (ext,) = overlay.block_status(pos, size - pos)
            if ext.flags & 2:
                assert model[pos:pos + ext.length] == bytes(ext.length)
            pos += ext.length
    finally:
        overlay.close()
    with open(path, "rb") as f:
        assert f.read() == base_data
