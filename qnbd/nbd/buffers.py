"""Reusable payload buffers (issue 17; docs/DESIGN.md "I/O model"): the buffers that
large READ replies are read into and large WRITE payloads are received into.

A fresh bytearray per request costs a memset of its whole length (bytearray(n) zeroes
it), and cold cache lines for the copy that follows: perf put the memset at 15% of the
event loop thread's cycles on a 4-connection nbdcopy of 256 KiB reads. This pool hands
out buffers that earlier requests are done with, of exactly the length asked for (NBD
clients use one request size or a few: a size is its own class, and a buffer needs no
slicing, so engines and transports see a bytearray as before).

When is a buffer done with? Not when its reply was passed to `transport.writelines`:
uvloop keeps a memoryview of each piece it cannot send at once (stream.pyx
`_buffer_write`, no copy), the TLS layer keeps the pieces in its write backlog until it
has encrypted them, a write plan's worker thread holds views of the payload until its
pwritev returns. Each of those holds a reference to the bytearray (a memoryview refers to
its object), so the pool reuses a buffer only when its reference count shows nobody but
the pool holds it: ownership is proven by the interpreter, not by tracking every path a
buffer can take (a path this module does not know of can only keep a buffer out of use,
never hand it out twice).

Memory is bounded: the pool keeps at most `keep_bytes` of buffers (in use or free);
past that a request gets a buffer of its own, as before. Lengths are never larger than
what the caller accepted (the request size limit). `trim` drops them all when the server
has no client left.
"""

import collections
import sys

# Shorter buffers are allocated per request: malloc's free lists serve them without
# faults, and the memset of a few KiB is noise beside the request's Python overhead.
MIN_BYTES = 128 << 10
# The most the pool keeps, in use or free: what the read pool and the write pool may
# have out at once (reads.py, writes.py MAX_OUT_BYTES), for either direction's size.
KEEP_BYTES = 32 << 20


def _refs(bufs, i: int) -> int:
    return sys.getrefcount(bufs[i])


# The count `_refs` sees for a buffer that only a pool's list holds (measured, not
# assumed: what the interpreter counts for its arguments varies between versions).
IDLE_REFS = _refs(collections.deque([bytearray(1)]), 0)


class Buffers:
    """Used on the event loop only (its counts are read there too)."""

    def __init__(self, keep_bytes: int = KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self.kept = 0                            # bytes of the buffers below
        self.sizes: dict[int, collections.deque] = {}   # by length, least recently looked at first
        self.taken = 0                           # buffers of MIN_BYTES or more handed out
        self.reused = 0                          # of which the pool already had

    def take(self, length: int) -> bytearray:
        """A buffer of `length` bytes, for the caller to fill whole: its content is
        whatever an earlier request left there."""
        if length < MIN_BYTES:
            return bytearray(length)
        self.taken += 1
        bufs = self.sizes.get(length)
        if bufs is not None:
            # Least recently looked at first (the earliest taken are the likeliest to be
            # done with); each one looked at goes to the back, so the ones a stalled
            # client still holds are passed over once a take. At most KEEP_BYTES / MIN_BYTES.
            for _ in range(len(bufs)):
                idle = _refs(bufs, 0) == IDLE_REFS
                bufs.rotate(-1)
                if idle:
                    self.reused += 1
                    return bufs[-1]
        buf = bytearray(length)
        if self.kept + length > self.keep_bytes and not self._make_room(length):
            return buf   # the pool is full of buffers in use: this one is the request's
        if bufs is None:
            bufs = self.sizes[length] = collections.deque()
        bufs.append(buf)
        self.kept += length
        return buf

    def _make_room(self, length: int) -> bool:
        """Drop idle buffers of other lengths until `length` more bytes fit (a client that
        changed its request size leaves them behind)."""
        for size, bufs in list(self.sizes.items()):
            if size == length:
                continue
            i = 0
            while i < len(bufs) and self.kept + length > self.keep_bytes:
                if _refs(bufs, i) == IDLE_REFS:
                    del bufs[i]
                    self.kept -= size
                else:
                    i += 1
            if not bufs:
                del self.sizes[size]
            if self.kept + length <= self.keep_bytes:
                return True
        return False

    def trim(self) -> None:
        """Keep nothing (the buffers still in use are freed by their last user)."""
        self.sizes.clear()
        self.kept = 0
