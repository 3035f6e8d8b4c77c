"""An NBD export as a block device, through libnbd: what qemu's nbd protocol driver does
for an image or a backing file named by an NBD URI (nbd://host[:port]/export,
nbd+unix:///export?socket=PATH, nbds://... with TLS; the URI syntax of
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md, which libnbd parses).

Block status asks the server for base:allocation; a server without it is all data. A
server that does not finish the handshake within CONNECT_TIMEOUT fails the open instead
of hanging it.
"""

import errno
import time

from ..errors import ImageError, IOFailure
from .base import HOLE, Extent

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp")
# Largest request most servers take (qemu-nbd, nbdkit and qnbd: 32 MiB).
_MAX_REQUEST = 32 << 20
CONNECT_TIMEOUT = 30.0


def _nbd():
    try:
        import nbd
    except ImportError:
        raise ImageError("NBD URIs need libnbd's Python bindings (Debian: python3-libnbd)") \
            from None
    return nbd


class NbdDevice:
    supports_fast_zero = False

    def __init__(self, uri: str, read_only: bool = True):
        nbd = self.nbd = _nbd()
        self.uri = uri
        self.h = nbd.NBD()
        self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            self._connect(uri)
            self.size = self.h.get_size()
            self.read_only = read_only or bool(self.h.is_read_only())
            self.has_status = bool(self.h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        except nbd.Error as e:
            raise ImageError(f"Could not open '{uri}': {e.string}") from None

    def _connect(self, uri: str) -> None:
        """connect_uri, with a deadline: the asynchronous connect, polled until the
        handshake is done."""
        self.h.aio_connect_uri(uri)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self.h.aio_is_ready():
            if self.h.aio_is_dead() or self.h.aio_is_closed():
                raise ImageError(f"Could not open '{uri}': the server ended the handshake")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ImageError(f"Could not open '{uri}': no NBD handshake within "
                                 f"{CONNECT_TIMEOUT:g} s")
            self.h.poll(int(left * 1000) + 1)

    def _call(self, what, *args):
        try:
            return what(*args)
        except self.nbd.Error as e:
            code = getattr(errno, e.errno, None) if isinstance(e.errno, str) else e.errno
            raise IOFailure(f"{self.uri}: {e.string}", code or errno.EIO) from None

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        while length:
            n = min(length, _MAX_REQUEST)
            parts.append(self._call(self.h.pread, n, offset))
            offset += n
            length -= n
        return b"".join(parts)

    def _check_writable(self):
        if self.read_only:
            raise IOFailure("the device is read-only", errno.EPERM)

    def write(self, offset, data, fua=False):
        self._check_writable()
        self._call(self.h.pwrite, bytes(data), offset, self.nbd.CMD_FLAG_FUA if fua else 0)

    def write_zeroes(self, offset, length, may_trim=False, fast=False, fua=False):
        self._check_writable()
        flags = (0 if may_trim else self.nbd.CMD_FLAG_NO_HOLE) | \
            (self.nbd.CMD_FLAG_FUA if fua else 0)
        self._call(self.h.zero, length, offset, flags)

    def discard(self, offset, length, fua=False):
        self._check_writable()
        if self.h.can_trim():
            self._call(self.h.trim, length, offset, self.nbd.CMD_FLAG_FUA if fua else 0)

    def flush(self):
        if not self.read_only and self.h.can_flush():
            self._call(self.h.flush)

    def block_status(self, offset, length):
        length = min(length, self.size - offset, _MAX_REQUEST)
        if not self.has_status:
            return [Extent(length, 0, 1)]
        extents = []

        def collect(context, _offset, entries, _err):
            if context == self.nbd.CONTEXT_BASE_ALLOCATION:
                extents.extend(zip(entries[::2], entries[1::2]))
            return 0

        self._call(self.h.block_status, length, offset, collect)
        out, left = [], length
        for n, flags in extents:
            n = min(n, left)
            if n:
                out.append(Extent(n, flags & 3, 0 if flags & HOLE else 1))
                left -= n
        return out or [Extent(length, 0, 1)]

    def close(self):
        """Flush and disconnect (libnbd frees the handle when it is collected)."""
        try:
            self.flush()
            self.h.shutdown()
        except (self.nbd.Error, IOFailure):
            pass
