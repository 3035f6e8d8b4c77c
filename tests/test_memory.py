"""glibc malloc tuning for I/O buffers (qnbd/memory.py)."""

import ctypes
import ctypes.util

import pytest

from qnbd.memory import tune_malloc


def test_large_buffers_stay_on_the_heap():
    """After tuning, freeing a 1 MiB buffer and allocating another reuses heap memory:
    glibc's arena grows instead of serving the buffer with a fresh mmap each time."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        pytest.skip("not glibc")
    assert tune_malloc()

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = Mallinfo2
    before = libc.mallinfo2().hblks  # chunks currently served by mmap
    buffers = [bytearray(1 << 20) for _ in range(8)]
    assert libc.mallinfo2().hblks == before  # none of the 1 MiB buffers is an mmap
    del buffers
