"""Clients that write while a checkpoint is taken (issue 15), and the model of what the
image holds after their first k writes: shared by the checkpoint tests."""

import random
import struct
import threading

from images import MiB
from nbdserver import connect

SIZE = 16 * MiB


class Writer(threading.Thread):
    """Writes tagged data at random places of [lo, hi) until stopped; `sent` writes have
    begun, `done` have been answered (both only grow). Each write is tagged with its
    sequence number and `tag` (writers on other connections use other tags)."""

    def __init__(self, uri, lo: int = 0, hi: int = SIZE, tag: int = 0):
        super().__init__()
        self.h = connect(uri)
        self.lo, self.hi, self.tag = lo, hi, tag
        self.writes: list[tuple[int, bytes]] = []
        self.sent = self.done = 0
        self.halt = threading.Event()
        self.rng = random.Random(15 + tag)

    def run(self):
        while not self.halt.is_set():
            i = len(self.writes)
            n = self.rng.randrange(1, 96 * 1024)
            off = self.rng.randrange(self.lo, self.hi - n)
            data = (struct.pack(">HI", self.tag, i + 1) * (n // 6 + 1))[:n]
            self.writes.append((off, data))
            self.sent = i + 1
            self.h.pwrite(data, off)
            self.done = i + 1

    def wait_for(self, n):
        while self.done < n:
            self.halt.wait(0.01)
            assert self.is_alive()


def model(base: bytes, writes) -> bytearray:
    image = bytearray(base)
    for off, data in writes:
        image[off:off + len(data)] = data
    return image


def read_all(uri: str, size: int = SIZE) -> bytes:
    h = connect(uri)
    data = b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))
    h.shutdown()
    return data
