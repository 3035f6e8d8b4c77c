"""Project errors. Each carries a one-line reason meant for the user."""

import errno


class QnbdError(Exception):
    """Base of every error qnbd reports to a user instead of a traceback."""


class ImageError(QnbdError):
    """An image cannot be opened or used: malformed, unsupported, or refused."""


class UnsupportedFeature(ImageError):
    """The image uses a format feature this engine does not implement."""


class CorruptImage(ImageError):
    """A metadata inconsistency was found; the image is marked corrupt when writable."""


class IOFailure(QnbdError):
    """A request failed; `errno` says how, for the NBD layer to map into a reply."""

    def __init__(self, message: str, code: int = errno.EIO):
        super().__init__(message)
        self.errno = code


class NotFast(IOFailure):
    """A fast write-zeroes cannot be done without writing data (NBD_CMD_FLAG_FAST_ZERO)."""

    def __init__(self, message: str = "zeroing this range would not be fast"):
        super().__init__(message, errno.ENOTSUP)


def printable(text: str) -> str:
    """`text` with control characters escaped, so that names taken from an image (feature
    names, backing file names, bitmap names) cannot break an error message's one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
