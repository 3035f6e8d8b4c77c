"""A power-cut simulator on qnbd's file seam (qnbd/fileio.py) that enumerates crash
states instead of sampling them (docs/DESIGN.md, "Proving crash safety").

`RecordingFile` wraps a real `File` and keeps the file as it was at the last fsync (the
durable content) plus the writes, truncates and hole punches since. Each fsync closes an
*interval*. A power cut inside an interval can leave the durable content plus any subset
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
    """The operations between two fsyncs, on top of the durable content before them."""
    durable: bytes
    ops: list  # ("write", offset, data) | ("truncate", length) | ("punch", offset, length)
    context: object  # what the caller recorded when the interval closed (model state)


class RecordingFile:
    def __init__(self, real, on_interval=None):
        """on_interval(recording_file) is called when an interval closes, before its
        operations become durable: the caller keeps `interval(context)` if it wants it."""
        self.real = real
        self.durable = bytearray(real.pread(real.size(), 0))
        self.ops: list[tuple] = []
        self.on_interval = on_interval

    def __getattr__(self, name):  # path, fd, writable, lock helpers: as the real file
        return getattr(self.real, name)

    def pread(self, length, offset):
        return self.real.pread(length, offset)

    def preadinto(self, buf, offset):
        return self.real.preadinto(buf, offset)

    def size(self):
        return self.real.size()

    def pwrite(self, data, offset):
        self.ops.append(("write", offset, bytes(data)))
        self.real.pwrite(data, offset)

    def pwritev(self, buffers, offset):
        self.pwrite(b"".join(bytes(b) for b in buffers), offset)

    def truncate(self, length):
        self.ops.append(("truncate", length))
        self.real.truncate(length)

    def punch_hole(self, offset, length):
        self.ops.append(("punch", offset, length))
        return self.real.punch_hole(offset, length)

    def fsync(self):
        self.close_interval()
        self.real.fsync()

    def close(self):
        self.close_interval()
        self.real.close()

    def interval(self, context) -> Interval:
        return Interval(bytes(self.durable), list(self.ops), context)

    def close_interval(self) -> None:
        if self.ops and self.on_interval:
            self.on_interval(self)
        for op in self.ops:
            apply_op(self.durable, op)
        self.ops.clear()


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
    """(description, content) for each distinct crash state of one interval."""
    ops = interval.ops
    n = len(ops)
    plans: dict[tuple, str] = {}

    def plan(steps, what):
        plans.setdefault(tuple(steps), what)

    for k in range(1, n + 1):
        plan([(i, None) for i in range(k)], f"prefix of {k}/{n}")
    for i in range(n):
        plan([(i, None)], f"operation {i}/{n} alone")
    for i, op in enumerate(ops):
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
        content = bytearray(interval.durable)
        for i, sectors in steps:
            apply_op(content, ops[i], sectors)
        yield what, bytes(content)
