"""The power-cut simulator itself: durable state and crash images are what a disk could
hold, never bytes that no one wrote."""

import random

import qnbd.fileio

from crashsim import RecordingFile


def recording(tmp_path, content: bytes) -> RecordingFile:
    path = tmp_path / "f"
    path.write_bytes(content)
    return RecordingFile(qnbd.fileio.open_file(str(path), writable=True))


def test_durable_content_undoes_everything_since_fsync(tmp_path):
    f = recording(tmp_path, b"a" * 3000)
    f.pwrite(b"b" * 100, 10)
    f.fsync()
    synced = bytes(f.real.pread(10**6, 0))
    f.pwrite(b"c" * 700, 2900)  # grows the file
    f.truncate(5000)
    f.punch_hole(0, 512)
    f.pwrite(b"d" * 10, 4990)
    f.truncate(1000)  # shrinks it
    assert bytes(f.durable_content()) == synced
    f.close()


def test_crash_images_hold_only_written_bytes(tmp_path):
    f = recording(tmp_path, bytes(4096))
    f.fsync()
    f.pwrite(b"x" * 1300, 100)  # unaligned, with a short last sector when torn
    f.pwrite(b"y" * 10, 3000)
    seen_torn = False
    for seed in range(200):
        image = f.crash_image(random.Random(seed))
        assert len(image) == 4096
        assert set(image[100:1400]) <= {0, ord("x")}
        assert set(image[3000:3010]) <= {0, ord("y")}
        assert image[:100] == bytes(100) and image[1400:3000] == bytes(1600)
        seen_torn |= 0 < image[100:1400].count(b"x") < 1300
    assert seen_torn
    f.close()
