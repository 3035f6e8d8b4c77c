"""A power-cut simulator on qnbd's file seam (qnbd/fileio.py).

`RecordingFile` wraps a real `File`: every write, truncate and hole punch since the last
fsync is logged with what it replaced. `crash_image()` then builds what a power cut at
this instant could leave on disk: the durable state (everything before the last fsync)
plus any subset of the later operations, in order, one of them possibly torn at 512-byte
granularity, as a disk with a volatile write cache may do.
"""

import random

SECTOR = 512


class RecordingFile:
    def __init__(self, real, on_syscall=None):
        self.real = real
        self.unsynced: list[tuple] = []
        self.on_syscall = on_syscall  # called before each write-like call: crash points

    def __getattr__(self, name):  # path, fd, writable, lock helpers: as the real file
        return getattr(self.real, name)

    # -- reads pass through ------------------------------------------------------------

    def pread(self, length, offset):
        return self.real.pread(length, offset)

    def preadinto(self, buf, offset):
        return self.real.preadinto(buf, offset)

    def size(self):
        return self.real.size()

    # -- writes are logged with their pre-image ----------------------------------------

    def _before(self):
        if self.on_syscall:
            self.on_syscall(self)

    def pwrite(self, data, offset):
        self._before()
        data = bytes(data)
        size = self.real.size()
        self.unsynced.append(("write", offset, data, self.real.pread(len(data), offset), size))
        self.real.pwrite(data, offset)

    def pwritev(self, buffers, offset):
        self.pwrite(b"".join(bytes(b) for b in buffers), offset)

    def truncate(self, length):
        self._before()
        size = self.real.size()
        cut = self.real.pread(size - length, length) if length < size else b""
        self.unsynced.append(("truncate", length, cut, size))
        self.real.truncate(length)

    def punch_hole(self, offset, length):
        self._before()
        size = self.real.size()
        self.unsynced.append(("punch", offset, length, self.real.pread(length, offset), size))
        return self.real.punch_hole(offset, length)

    def fsync(self):
        self._before()
        self.real.fsync()
        self.unsynced.clear()

    def close(self):
        self.real.close()

    # -- the power cut -----------------------------------------------------------------

    def durable_content(self) -> bytearray:
        """The file as of the last fsync: current content with unsynced operations undone."""
        content = bytearray(self.real.pread(self.real.size(), 0))
        for op in reversed(self.unsynced):
            if op[0] == "write":
                _, offset, data, pre, size = op
                content[offset:offset + len(pre)] = pre
                _resize(content, size)
            elif op[0] == "truncate":
                _, length, cut, size = op
                _resize(content, size)
                content[length:length + len(cut)] = cut
            else:
                _, offset, length, pre, size = op
                content[offset:offset + len(pre)] = pre
        return content

    def crash_image(self, rng: random.Random) -> bytes:
        content = self.durable_content()
        kept = [op for op in self.unsynced if rng.random() < 0.5]
        torn = rng.randrange(len(kept)) if kept and rng.random() < 0.5 else -1
        for i, op in enumerate(kept):
            if op[0] == "write":
                _, offset, data, _pre, _size = op
                if len(content) < offset + len(data):
                    _resize(content, offset + len(data))
                if i == torn:
                    for s in range(0, len(data), SECTOR):
                        if rng.random() < 0.5:
                            piece = data[s:s + SECTOR]  # the last one may be short
                            content[offset + s:offset + s + len(piece)] = piece
                else:
                    content[offset:offset + len(data)] = data
            elif op[0] == "truncate":
                _resize(content, op[1])
            else:
                _, offset, length, _pre, _size = op
                end = min(offset + length, len(content))
                if end > offset:
                    content[offset:end] = bytes(end - offset)
        return bytes(content)


def _resize(content: bytearray, size: int) -> None:
    if len(content) > size:
        del content[size:]
    else:
        content.extend(bytes(size - len(content)))
