"""The --pid-file, as qemu-nbd keeps it (qemu util/oslib-posix.c qemu_write_pidfile): the
file is locked (POSIX lockf) for as long as the server runs, so a second server given the
same file fails ("Cannot lock pid file") instead of overwriting it, and it is left in place
on exit: deleting it could delete the file of another instance that took it over since.
"""

import fcntl
import os

from ..errors import QnbdError


class PidFile:
    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise QnbdError(f"Could not create '{path}': {e.strerror}") from None
        try:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise QnbdError(f"Cannot lock pid file: {e.strerror}") from None
            # The path may have been replaced between open and lock by an instance that
            # removed and recreated it: then our lock protects nothing (qemu checks too).
            opened, now = os.fstat(self.fd), _stat(path)
            if now is None or (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
                raise QnbdError(f"Cannot lock pid file: '{path}' was replaced")
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        """Release the lock (the file stays, as qemu-nbd's does)."""
        os.close(self.fd)


def _stat(path: str):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
