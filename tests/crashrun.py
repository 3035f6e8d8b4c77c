"""Running a workload on the recording seam and checking every enumerated crash state
against qemu-img (used by test_crash.py and test_crash_mutation.py)."""

import json
import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import qnbd.fileio
from qnbd.formats import open_image

from crashsim import SECTOR, RecordingFile, crash_states
from images import MiB, Shape
from workload import Model, apply_ops, converted

# The shapes the engine issue asks for: small refcount regions (512 B clusters, 64-bit
# refcounts: 64 clusters a block) under raw and qcow2 backing files, 1-bit refcounts,
# v2, lazy refcounts, compressed clusters, persistent bitmaps.
SHAPES = [
    Shape("c512-r64-raw", "cluster_size=512,refcount_bits=64", backing="raw", size=4 * MiB),
    Shape("c512-r64-qcow2", "cluster_size=512,refcount_bits=64", backing="qcow2",
          size=4 * MiB),
    Shape("c4k-r1", "cluster_size=4096,refcount_bits=1", size=4 * MiB),
    Shape("v2", "compat=0.10", size=4 * MiB),
    Shape("lazy", "lazy_refcounts=on", size=4 * MiB),
    Shape("zlib", compress="zlib", size=4 * MiB),
    Shape("bitmaps", "cluster_size=4096", size=4 * MiB, bitmaps=["b0", "b1"]),
]
SHAPE_IDS = [s.name for s in SHAPES]


@dataclass
class Context:
    flushed: bytes  # the guest content at the last completed flush
    touched: bytes  # one byte per sector: written since that flush
    during: str  # the operation under way, for failure messages


def crash_ops(rng: random.Random, size: int, count: int) -> list:
    """Writes, zeroes (with and without trim), discards and flushes, a few sectors to a
    few clusters long, some aligned: each one allocates, frees or rewrites metadata."""
    ops = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "write", "zero", "zero_trim", "discard",
                           "flush"])
        off = rng.randrange(0, size)
        if rng.random() < 0.4:
            off = off // 65536 * 65536
        n = rng.choice([1, 511, 512, 4096, 65536, 70000, rng.randrange(1, 140000)])
        ops.append((kind, off, max(1, min(n, size - off)), rng.randrange(1, 256)))
    return ops


def record_workload(shape: Shape, directory, ops, monkeypatch):
    """Run `ops` on a fresh image of `shape`, recording every interval; returns the
    image path and the intervals, each with its Context."""
    return record_driven(shape, directory, monkeypatch,
                         lambda dev, do: [do(op) for op in ops])


def record_driven(shape: Shape, directory, monkeypatch, drive):
    """drive(dev, do) runs the workload, calling do(op) for each operation. The shape
    says its format (`fmt`: qcow2 shapes of images.py, QED shapes of qedimages.py)."""
    image = shape.build(directory)
    fmt = shape.fmt
    start = converted(image, fmt, directory)
    state = {"flushed": bytes(start), "touched": bytearray(len(start) // SECTOR + 1),
             "op": "open"}
    intervals = []

    def closed(f: RecordingFile):
        if f.path == image:
            intervals.append(f.interval(Context(state["flushed"], bytes(state["touched"]),
                                                state["op"])))

    real_open = qnbd.fileio.open_file
    monkeypatch.setattr(qnbd.fileio, "open_file",
                        lambda path, writable: RecordingFile(real_open(path, writable),
                                                             closed))
    dev = open_image(image, fmt, read_only=False)
    model = Model(start, dev.cluster_size,
                  discard_keeps=getattr(shape, "v2", False) and shape.backing is not None)
    done = []

    def do(op):
        kind, off, n, pattern = op
        state["op"] = f"op {len(done)} {op}"
        done.append(op)
        if kind != "flush":
            first, last = off // SECTOR, (off + n - 1) // SECTOR
            state["touched"][first:last + 1] = b"\1" * (last - first + 1)
        apply_ops(dev, model, [op])
        if kind == "flush" or (kind == "write" and pattern % 17 == 0):  # FUA
            state["flushed"] = bytes(model.data)
            state["touched"] = bytearray(len(start) // SECTOR + 1)

    try:
        drive(dev, do)
        state["op"] = "close"
    finally:
        dev.close()
        monkeypatch.setattr(qnbd.fileio, "open_file", real_open)
    return image, intervals


def _needs_repair(path: str, fmt: str) -> bool | str:
    """Whether the format says the image may be inconsistent and must be checked before
    it is written: qcow2's dirty bit (rule 6), QED's NEED_CHECK (rule 12); a string says
    why that cannot be told."""
    if fmt == "qed":
        with open(path, "rb") as f:
            return bool(f.read(24)[16] & 0x02)  # qed_spec.txt "Header": features
    r = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                       text=True)
    if r.returncode:
        return f"qemu-img info fails: {r.stderr.strip()}"
    return json.loads(r.stdout).get("dirty-flag", False)


def check_state(path: str, content: bytes, ctx: Context, what: str, scratch,
                fmt: str = "qcow2") -> str | None:
    """Why this crash state is wrong, or None. qcow2: no corruption (leaks allowed); a
    dirty image is repaired by our read-write open and must then be clean. QED: without
    NEED_CHECK nothing at all may be wrong (NEED_CHECK is what covers leaks); with it,
    our read-write open repairs the image and clears the bit (leaks left in the middle
    of the file are allowed: QED cannot reuse them)."""
    with open(path, "wb") as f:
        f.write(content)
    where = f"{what}, during {ctx.during}"
    repair = _needs_repair(path, fmt)
    if isinstance(repair, str):
        return f"{where}: {repair}"
    if repair:
        open_image(path, fmt, read_only=False).close()
        if fmt == "qed" and _needs_repair(path, fmt):
            return f"{where}: NEED_CHECK still set after the repair"
    r = subprocess.run(["qemu-img", "check", "-f", fmt, "--output=json", path],
                       capture_output=True, text=True)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    if r.returncode not in (0, 3) or report.get("corruptions", 0):
        return f"{where}: qemu-img check rc {r.returncode}: {r.stdout}{r.stderr}"
    # qcow2: leaks are harmless but a repair removes them; QED: only NEED_CHECK may
    # cover them, and a repair cannot give back those in the middle of the file.
    leaks_allowed = repair if fmt == "qed" else not repair
    if r.returncode and not leaks_allowed:
        return f"{where}: leaks ({'NEED_CHECK clear' if fmt == 'qed' else 'repaired'}): " \
            f"{r.stdout}"
    data = converted(path, fmt, scratch)
    if len(data) != len(ctx.flushed):
        return f"{where}: size {len(data)} instead of {len(ctx.flushed)}"
    for sector, touched in enumerate(ctx.touched):
        lo = sector * SECTOR
        if not touched and data[lo:lo + SECTOR] != ctx.flushed[lo:lo + SECTOR]:
            return f"{where}: flushed data lost at offset {lo}"
    return None


def enumerate_crashes(image: str, intervals, seed: int, scratch,
                      fmt: str = "qcow2") -> tuple[int, list[str]]:
    """Check every crash state of every interval, two at a time (qemu-img runs in
    subprocesses); returns how many states were checked and the failures."""
    rng = random.Random(seed)
    jobs = [(what, content, iv.context) for iv in intervals
            for what, content in crash_states(iv, rng)]

    def check(job_index):
        what, content, ctx = jobs[job_index]
        slot = job_index % 2
        worker = os.path.join(str(scratch), f"w{slot}")
        os.makedirs(worker, exist_ok=True)
        # Beside the image, so that a relative backing file name resolves.
        state = os.path.join(os.path.dirname(image), f"state{slot}.{fmt}")
        return check_state(state, content, ctx, what, worker, fmt)

    # One file per worker slot: states in flight at once never share files.
    with ThreadPoolExecutor(2) as pool:
        failures = []
        for start in range(0, len(jobs), 2):
            failures += [f for f in pool.map(check, range(start, min(start + 2, len(jobs))))
                         if f]
    return len(jobs), failures
