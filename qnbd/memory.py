"""Process memory tuning for a server that allocates and frees large I/O buffers.

Each NBD read of 1 MiB allocates a fresh buffer. glibc serves such sizes with mmap, or
grows and trims the heap around them, so every request page-faults its buffer in again
and the kernel zero-fills it before pread copies the data: measured on seqread-1M,
that was two thirds of the server's time. Keeping large chunks on the heap (mmap
threshold raised) and not trimming the heap below a bounded size lets freed buffers be
reused as they are; memory kept this way is bounded by TRIM_THRESHOLD.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger("qnbd")

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # above the largest NBD request (32 MiB)
TRIM_THRESHOLD = 64 << 20


def tune_malloc() -> bool:
    """Apply the settings where the C library is glibc; returns whether it did."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False  # not glibc: its allocator has its own policy
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the I/O buffer settings")
    return ok
