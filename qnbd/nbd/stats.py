"""Per-export request statistics (issue 15, metrics), kept as plain integers on the hot
path: one call per request, two clock reads, a bisect and a few list increments. Turning
them into Prometheus text or JSON happens only when someone asks
(qnbd/control/metrics.py), never per request.

Latency is the time the transmission core spends answering a request on the event loop
(docs/DESIGN.md "I/O model": requests run inline, in order), not the time on the wire; a
READ streamed in pieces counts its first piece.
"""

from bisect import bisect_left

from . import protocol as p

# Command numbers 0..7 index the tables; anything else is counted as "unknown".
COMMANDS = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes",
            "block_status", "unknown")
_UNKNOWN = len(COMMANDS) - 1
ERRORS = {p.EPERM: "EPERM", p.EIO: "EIO", p.ENOMEM: "ENOMEM", p.EINVAL: "EINVAL",
          p.ENOSPC: "ENOSPC", p.EOVERFLOW: "EOVERFLOW", p.ENOTSUP: "ENOTSUP",
          p.ESHUTDOWN: "ESHUTDOWN"}
# Histogram upper bounds, seconds (Prometheus `le`), and the same in nanoseconds.
BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
           25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)
_BOUNDS_NS = tuple(int(b * 1e9) for b in BUCKETS)


class ExportStats:
    __slots__ = ("requests", "bytes", "latency", "latency_ns", "errors",
                 "copy_before_write_bytes")

    def __init__(self):
        n = len(COMMANDS)
        self.requests = [0] * n
        self.bytes = [0] * n          # bytes the requests covered (offset ranges)
        # Per command: counts per bucket, the last one past the largest bound (+Inf).
        self.latency = [[0] * (len(BUCKETS) + 1) for _ in range(n)]
        self.latency_ns = [0] * n
        self.errors: dict[int, int] = {}
        self.copy_before_write_bytes = 0

    def record(self, cmd: int, length: int, ns: int) -> None:
        i = cmd if cmd < _UNKNOWN else _UNKNOWN
        self.requests[i] += 1
        self.bytes[i] += length
        self.latency[i][bisect_left(_BOUNDS_NS, ns)] += 1
        self.latency_ns[i] += ns

    def error(self, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1

    def snapshot(self) -> dict:
        """The numbers as JSON (the control socket's `metrics`): cumulative histogram
        buckets, as Prometheus exposes them."""
        out = {"requests": {}, "bytes": {}, "latency": {},
               "errors": {ERRORS.get(e, str(e)): n for e, n in sorted(self.errors.items())},
               "copy_before_write_bytes": self.copy_before_write_bytes}
        for i, name in enumerate(COMMANDS):
            if not self.requests[i]:
                continue
            out["requests"][name] = self.requests[i]
            out["bytes"][name] = self.bytes[i]
            cumulative, buckets = 0, {}
            for bound, count in zip(BUCKETS + (float("inf"),), self.latency[i]):
                cumulative += count
                buckets["+Inf" if bound == float("inf") else repr(bound)] = cumulative
            out["latency"][name] = {"count": self.requests[i],
                                    "sum": self.latency_ns[i] / 1e9, "buckets": buckets}
        return out
