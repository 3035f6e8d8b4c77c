"""Positional I/O on a file opened with O_DIRECT (serve --cache=none|directsync, qemu's
cache.direct=on): the page cache is bypassed, so the offset, the length and the memory
of every transfer must be aligned to the device's logical block.

ALIGN is 4096: a multiple of every logical block size in use (512 and 4096), and page
alignment is what anonymous mmaps give. Callers' ranges are widened to ALIGN through a
bounce buffer: reads copy the wanted part out; a write that does not cover whole blocks
first reads the blocks at its ends (read-modify-write, as qemu's file-posix bounce
does), and when it extends the file the size is put back to where the write ended.
Every buffer comes from one bounded pool, not from each request.
"""

import mmap
import os
import threading

ALIGN = 4096
# Largest total of free buffers the pool keeps for reuse; larger ones are unmapped.
POOL_KEEP_BYTES = 16 << 20


class BufferPool:
    """Page-aligned buffers (anonymous mmaps) in power-of-two sizes, reused; thread-safe
    (the read pool's worker threads take them too)."""

    def __init__(self, keep_bytes: int = POOL_KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self.kept = 0
        self.free: dict[int, list[mmap.mmap]] = {}
        self.lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        size = max(ALIGN, 1 << (size - 1).bit_length())
        with self.lock:
            free = self.free.get(size)
            if free:
                self.kept -= size
                return free.pop()
        return mmap.mmap(-1, size)

    def give(self, buf: mmap.mmap) -> None:
        with self.lock:
            if self.kept + len(buf) <= self.keep_bytes:
                self.free.setdefault(len(buf), []).append(buf)
                self.kept += len(buf)
                return
        buf.close()


POOL = BufferPool()


def _span(offset: int, length: int) -> tuple[int, int]:
    return offset & -ALIGN, -(-(offset + length) // ALIGN) * ALIGN


def _read_aligned(fd: int, view: memoryview, offset: int) -> int:
    """Fill the aligned `view` from the aligned `offset`; short only at end of file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        got += n
        if n == 0 or n % ALIGN:   # the end of the file: nothing aligned follows
            break
    return got


def read(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; returns the bytes read (short only at end of file)."""
    start, end = _span(offset, len(view))
    buf = POOL.take(end - start)
    try:
        got = _read_aligned(fd, memoryview(buf)[:end - start], start)
        n = max(0, min(got - (offset - start), len(view)))
        view[:n] = buf[offset - start:offset - start + n]
        return n
    finally:
        POOL.give(buf)


def write(fd: int, buffers: list, offset: int) -> None:
    """Write the concatenation of `buffers` at `offset`."""
    length = sum(len(b) for b in buffers)
    if not length:
        return
    start, end = _span(offset, length)
    buf = POOL.take(end - start)
    try:
        whole = memoryview(buf)[:end - start]
        size = None
        if start < offset or end > offset + length:
            size = os.fstat(fd).st_size
            partial = {start} if start < offset else set()
            if end > offset + length:
                partial.add(end - ALIGN)
            for block in partial:   # the blocks the write covers only in part
                part = whole[block - start:block - start + ALIGN]
                got = _read_aligned(fd, part, block) if block < size else 0
                part[got:] = bytes(ALIGN - got)   # past the end of the file: zeros
        at = offset - start
        for b in buffers:
            b = memoryview(b).cast("B")
            whole[at:at + len(b)] = b
            at += len(b)
        done = 0
        while done < len(whole):
            done += os.pwritev(fd, [whole[done:]], start + done)
        if size is not None and end > max(size, offset + length):
            os.ftruncate(fd, max(size, offset + length))
    finally:
        POOL.give(buf)
