"""A power-cut simulator on qnbd's file seam (qnbd/fileio.py) that enumerates crash
states instead of sampling them (docs/DESIGN.md, "Proving crash safety").

A `Recorder` wraps the real `File`s of one image (the image, an external data file) and
keeps each file as it was at its last fsync (the durable content) plus the writes,
truncates and hole punches since. Each fsync closes an *interval*. A power cut inside an interval can leave the durable content plus any subset
of the interval's operations, in order, one of them possibly torn at 512-byte
granularity (a disk with a volatile write cache may do all of that). `crash_states()`
enumerates, for one interval: every prefix of its operations, every single operation
alone, each write torn (two sector patterns) after the operations before it, and a few
random subsets. Identical states are enumerated once.
"""

import random
from dataclasses import dataclass

SECTOR = 512
RANDOM_SUBSETS = 8


@dataclass
class Interval:
    """The operations between two fsyncs, on top of the durable content before them.
    An image may span files (an external data file): `durable` maps each recorded path
    to its content, and each operation names its file."""
    durable: dict  # path -> bytes
    ops: list  # (path, op); op: ("write", offset, data) | ("truncate", n) | ("punch", o, n)
    context: object  # what the caller recorded when the interval closed (model state)


class Recorder:
    """The files of one image, recorded together: an fsync of one file makes only that
    file's operations durable, and a crash state may keep any of the others."""

    def __init__(self, on_interval=None):
        """on_interval(recorder) is called when an interval closes, before its
        operations become durable: the caller keeps `interval(context)` if it wants."""
        self.on_interval = on_interval
        self.durable: dict[str, bytearray] = {}
        self.pending: list[tuple[str, tuple]] = []

    def wrap(self, real) -> "RecordingFile":
        self.durable.setdefault(real.path, bytearray(real.pread(real.size(), 0)))
        return RecordingFile(real, self)

    def interval(self, context) -> Interval:
        return Interval({p: bytes(c) for p, c in self.durable.items()}, list(self.pending),
                        context)

    def sync(self, path: str) -> None:
        if self.pending and self.on_interval:
            self.on_interval(self)
        kept = []
        for p, op in self.pending:
            if p == path:
                apply_op(self.durable[p], op)
            else:
                kept.append((p, op))
        self.pending = kept


class RecordingFile:
    def __init__(self, real, recorder: Recorder):
        self.real = real
        self.recorder = recorder

    def __getattr__(self, name):  # path, fd, writable, lock helpers: as the real file
        return getattr(self.real, name)

    @property
    def durable(self) -> bytearray:
        return self.recorder.durable[self.real.path]

    def pread(self, length, offset):
        return self.real.pread(length, offset)

    def preadinto(self, buf, offset):
        return self.real.preadinto(buf, offset)

    def size(self):
        return self.real.size()

    def _record(self, op) -> None:
        self.recorder.pending.append((self.real.path, op))

    def pwrite(self, data, offset):
        self._record(("write", offset, bytes(data)))
        self.real.pwrite(data, offset)

    def pwritev(self, buffers, offset):
        self.pwrite(b"".join(bytes(b) for b in buffers), offset)

    def truncate(self, length):
        self._record(("truncate", length))
        self.real.truncate(length)

    def punch_hole(self, offset, length):
        self._record(("punch", offset, length))
        return self.real.punch_hole(offset, length)

    def fsync(self):
        self.recorder.sync(self.real.path)
        self.real.fsync()

    def close(self):
        # What was never synced stays a possible loss: one last interval.
        self.recorder.sync(self.real.path)
        self.real.close()


def apply_op(content: bytearray, op: tuple, sectors=None) -> None:
    """Apply one operation; `sectors` (a set of sector indexes within a write) tears it."""
    if op[0] == "write":
        _, offset, data = op
        if len(content) < offset + len(data):
            content.extend(bytes(offset + len(data) - len(content)))
        if sectors is None:
            content[offset:offset + len(data)] = data
        else:
            for s in sectors:
                piece = data[s * SECTOR:(s + 1) * SECTOR]  # the last one may be short
                content[offset + s * SECTOR:offset + s * SECTOR + len(piece)] = piece
    elif op[0] == "truncate":
        length = op[1]
        if len(content) > length:
            del content[length:]
        else:
            content.extend(bytes(length - len(content)))
    else:
        _, offset, length = op
        end = min(offset + length, len(content))
        if end > offset:
            content[offset:end] = bytes(end - offset)


def crash_states(interval: Interval, rng: random.Random):
    """(description, {path: content}) for each distinct crash state of one interval."""
    ops = interval.ops
    n = len(ops)
    plans: dict[tuple, str] = {}

    def plan(steps, what):
        plans.setdefault(tuple(steps), what)

    for k in range(1, n + 1):
        plan([(i, None) for i in range(k)], f"prefix of {k}/{n}")
    for i in range(n):
        plan([(i, None)], f"operation {i}/{n} alone")
    for i, (_path, op) in enumerate(ops):
        sectors = -(-len(op[2]) // SECTOR) if op[0] == "write" else 0
        if sectors > 1:
            half = tuple(range(sectors // 2))
            odd = tuple(range(1, sectors, 2))
            before = [(j, None) for j in range(i)]
            plan(before + [(i, half)], f"operation {i}/{n} torn (first half)")
            plan(before + [(i, odd)], f"operation {i}/{n} torn (odd sectors)")
    for _ in range(RANDOM_SUBSETS if n > 2 else 0):
        chosen = [i for i in range(n) if rng.random() < 0.5]
        plan([(i, None) for i in chosen], f"subset {chosen} of {n}")
    for steps, what in plans.items():
        contents = {p: bytearray(c) for p, c in interval.durable.items()}
        for i, sectors in steps:
            path, op = ops[i]
            apply_op(contents[path], op, sectors)
        yield what, {p: bytes(c) for p, c in contents.items()}
