"""Per-export request statistics (issue 15, metrics), kept as plain integers on the hot
path: one call per request, two clock reads and three list increments (the latency
bucket is the bit length of the nanoseconds: power-of-two buckets, no search). Turning
them into Prometheus text or JSON happens only when someone asks
(qnbd/control/metrics.py), never per request.

Latency is the time the transmission core spends answering a request on the event loop
(docs/DESIGN.md "I/O model": requests run inline, in order), not the time on the wire; a
READ streamed in pieces counts until its last piece is handed to the socket, including
the waits for the client to take the pieces before it.
"""

from . import protocol as p

# Command numbers 0..7 index the tables; anything else is counted as "unknown".
COMMANDS = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes",
            "block_status", "unknown")
_UNKNOWN = len(COMMANDS) - 1
ERRORS = {p.EPERM: "EPERM", p.EIO: "EIO", p.ENOMEM: "ENOMEM", p.EINVAL: "EINVAL",
          p.ENOSPC: "ENOSPC", p.EOVERFLOW: "EOVERFLOW", p.ENOTSUP: "ENOTSUP",
          p.ESHUTDOWN: "ESHUTDOWN"}
# A duration of ns nanoseconds lands in slot ns.bit_length(): ns < 2**slot. Slots per
# command (a 64-bit count of nanoseconds has at most 64 bits, 65 slots with 0).
_SLOTS = 65
# The exposed buckets: le = 2**k ns for k in FIRST..LAST (about 1 µs to 17 s); faster
# requests count in the first, slower ones only in +Inf.
FIRST, LAST = 10, 34
BUCKETS = tuple((2 ** k) / 1e9 for k in range(FIRST, LAST + 1))


class ExportStats:
    __slots__ = ("bytes", "latency", "latency_ns", "errors", "copy_before_write_bytes")

    def __init__(self):
        n = len(COMMANDS)
        self.bytes = [0] * n          # bytes the requests covered (offset ranges)
        self.latency = [0] * (n * _SLOTS)   # [command * _SLOTS + ns.bit_length()]
        self.latency_ns = [0] * n
        self.errors: dict[int, int] = {}
        self.copy_before_write_bytes = 0

    def record(self, cmd: int, length: int, ns: int) -> None:
        i = cmd if cmd < _UNKNOWN else _UNKNOWN
        self.bytes[i] += length
        self.latency_ns[i] += ns
        self.latency[i * _SLOTS + ns.bit_length()] += 1

    def error(self, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1

    def histogram(self, i: int) -> tuple[int, list[tuple[float, int]]]:
        """(count, [(le seconds, cumulative count)...]) for command index i, the last
        bucket +Inf."""
        slots = self.latency[i * _SLOTS:(i + 1) * _SLOTS]
        cumulative = sum(slots[:FIRST + 1])
        buckets = [(BUCKETS[0], cumulative)]
        for k in range(FIRST + 1, LAST + 1):
            cumulative += slots[k]
            buckets.append((BUCKETS[k - FIRST], cumulative))
        total = sum(slots)
        buckets.append((float("inf"), total))
        return total, buckets

    def snapshot(self) -> dict:
        """The numbers as JSON (the control socket's `metrics`): cumulative histogram
        buckets, as Prometheus exposes them."""
        out = {"requests": {}, "bytes": {}, "latency": {},
               "errors": {ERRORS.get(e, str(e)): n for e, n in sorted(self.errors.items())},
               "copy_before_write_bytes": self.copy_before_write_bytes}
        for i, name in enumerate(COMMANDS):
            count, buckets = self.histogram(i)
            if not count:
                continue
            out["requests"][name] = count
            out["bytes"][name] = self.bytes[i]
            out["latency"][name] = {
                "count": count, "sum": self.latency_ns[i] / 1e9,
                "buckets": {"+Inf" if le == float("inf") else repr(le): n
                            for le, n in buckets}}
        return out
