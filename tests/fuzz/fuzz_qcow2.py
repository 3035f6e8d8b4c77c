"""atheris harness for qcow2 image parsing (not part of the test suite).

    .venv/bin/pip install -e '.[fuzz]'
    cd tests && ../.venv/bin/python -m fuzz.fuzz_qcow2 -max_total_time=600

Damages a qemu-made image with two bitmaps that recorded a write (the base of
test_qcow2_broken.py's bitmap fuzzing) in its header, refcount table and block, L1 and L2
tables, bitmaps extension, bitmap directory, bitmap table and bitmap data, then opens,
reads and closes it with test_qcow2_broken.try_open_and_read: success or a one-line
project error within 5 s and within its memory budget (RLIMIT_AS: an allocation sized by
the damaged file fails the input), and a failed file left as it was. A failing input stops the run
(crash-* file); reproduce it by writing the damaged image out and add it to tests/corpus/.
"""

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["qnbd"]):
    from test_qcow2_broken import FUZZ_REGIONS, SIZE, try_open_and_read

from qcow2util import bitmap_locations, qemu_img, qemu_io


def base_image(d: Path) -> tuple[bytes, dict]:
    path = d / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), str(SIZE))
    qemu_img("bitmap", "--add", str(path), "b0")
    qemu_img("bitmap", "--add", "-g", "4096", str(path), "b1")
    qemu_io(str(path), "write -P 1 0 1M")
    return path.read_bytes(), {**FUZZ_REGIONS, **bitmap_locations(path)}


def main():
    d = Path(tempfile.mkdtemp(prefix="qnbd-fuzz-"))
    base, regions = base_image(d)
    names = sorted(regions)
    target = d / "fuzz.qcow2"

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        image = bytearray(base)
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            start, length = regions[fdp.PickValueInList(names)]
            offset = start + fdp.ConsumeIntInRange(0, length - 1)
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
            image[offset:offset + len(payload)] = payload
        target.write_bytes(image)
        try_open_and_read(target, read_only=fdp.ConsumeBool(), timeout=5)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
