"""The power-cut simulator itself: the durable content is what was fsynced, and every
enumerated crash state is one a disk could hold, never bytes that no one wrote."""

import random

import qnbd.fileio

from crashsim import SECTOR, Recorder, crash_states


def recording(tmp_path, content: bytes, intervals: list, name="f", recorder=None):
    path = tmp_path / name
    path.write_bytes(content)
    real = qnbd.fileio.open_file(str(path), writable=True)
    recorder = recorder or Recorder(lambda r: intervals.append(r.interval(None)))
    return recorder.wrap(real)


def test_durable_content_follows_fsyncs(tmp_path):
    intervals = []
    f = recording(tmp_path, b"a" * 3000, intervals)
    f.pwrite(b"b" * 100, 10)
    f.fsync()
    synced = bytes(f.real.pread(10**6, 0))
    assert bytes(f.durable) == synced
    f.pwrite(b"c" * 700, 2900)  # grows the file
    f.truncate(5000)
    f.punch_hole(0, 512)
    f.pwrite(b"d" * 10, 4990)
    f.truncate(1000)  # shrinks it
    assert bytes(f.durable) == synced  # nothing of this is durable yet
    f.fsync()
    assert bytes(f.durable) == bytes(f.real.pread(10**6, 0))
    assert [len(iv.ops) for iv in intervals] == [1, 5]
    assert intervals[1].durable[f.path] == synced
    f.close()


def test_states_hold_only_written_bytes_and_cover_the_interval(tmp_path):
    intervals = []
    f = recording(tmp_path, bytes(4096), intervals)
    f.fsync()  # nothing written: no interval
    f.pwrite(b"x" * 1300, 100)  # unaligned, with a short last sector when torn
    f.pwrite(b"y" * 10, 3000)
    f.pwrite(b"z" * 590, 3500)
    f.fsync()
    assert len(intervals) == 1
    states = list(crash_states(intervals[0], random.Random(1)))
    contents = [c[f.path] for _, c in states]
    descriptions = [d for d, _ in states]
    for image in contents:
        assert len(image) == 4096
        assert set(image[100:1400]) <= {0, ord("x")}
        assert set(image[3000:3010]) <= {0, ord("y")}
        assert set(image[3500:4096]) <= {0, ord("z")}
        assert image[:100] == bytes(100) and image[1400:3000] == bytes(1600)
    # Every prefix and every single write is there, and the first write torn.
    assert all(f"prefix of {k}/3" in descriptions for k in (1, 2, 3))
    assert all(f"operation {i}/3 alone" in descriptions for i in (1, 2))
    torn = [c[f.path] for d, c in states if d.startswith("operation 0/3 torn")]
    assert torn and all(0 < c[100:1400].count(b"x") < 1300 for c in torn)
    alone = dict(states)["operation 2/3 alone"][f.path]
    assert alone[3500:4090] == b"z" * 590 and alone[100:1400] == bytes(1300)
    f.close()


def test_torn_write_keeps_whole_sectors(tmp_path):
    intervals = []
    f = recording(tmp_path, bytes(8 * SECTOR), intervals)
    f.pwrite(b"w" * (4 * SECTOR), 0)
    f.fsync()
    for what, contents in crash_states(intervals[0], random.Random(2)):
        image = contents[f.path]
        for s in range(4):
            sector = image[s * SECTOR:(s + 1) * SECTOR]
            assert sector in (bytes(SECTOR), b"w" * SECTOR), what
    f.close()


def test_an_fsync_makes_only_its_own_file_durable(tmp_path):
    """Two files of one image (an image and its data file): syncing one leaves the
    other's writes pending, so a crash may still drop them."""
    intervals = []
    recorder = Recorder(lambda r: intervals.append(r.interval(None)))
    meta = recording(tmp_path, bytes(1024), intervals, "meta", recorder)
    data = recording(tmp_path, bytes(1024), intervals, "data", recorder)
    data.pwrite(b"d" * 512, 0)
    meta.pwrite(b"m" * 512, 0)
    meta.fsync()
    assert bytes(recorder.durable[meta.path][:512]) == b"m" * 512
    assert bytes(recorder.durable[data.path][:512]) == bytes(512)
    meta.pwrite(b"n" * 512, 512)
    data.fsync()
    states = list(crash_states(intervals[1], random.Random(3)))
    # The data write is still a candidate in the second interval, alone or not.
    assert any(c[data.path][:512] == b"d" * 512 and c[meta.path][512:] == bytes(512)
               for _, c in states)
    assert any(c[data.path][:512] == bytes(512) for _, c in states)
    meta.close()
    data.close()
