"""Backing chains, for every format: which backing files an image may name (the policy),
loops, and one depth limit. qemu's block.c (bdrv_open_backing_file, path_combine).

A format's opener is handed `open_backing(image_path, name, fmt)`; it never opens a
backing file itself. An untrusted image's header must not choose which host file the
server reads: the policy `same-dir` or `none` stops it (docs/DESIGN.md, "Backing files").
"""

import os

from ..errors import ImageError, printable

# any (qemu's behaviour), same-dir (only files in the top image's directory after
# resolving symlinks), none.
BACKING_POLICIES = ("any", "same-dir", "none")
MAX_BACKING_DEPTH = 16


def resolve_backing(image_path: str, name: str) -> str:
    """The file a backing name means, as qemu's path_combine: a relative name is relative
    to the directory of the image that names it."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


class BackingChain:
    """Opens an image and, through the opener, everything below it."""

    def __init__(self, opener, policy: str = "any", max_depth: int = MAX_BACKING_DEPTH,
                 above: tuple = ()):
        """opener(path, fmt, read_only, open_backing, **options) opens one image."""
        if policy not in BACKING_POLICIES:
            raise ImageError(f"unknown backing policy '{policy}'")
        self.opener = opener
        self.policy = policy
        self.max_depth = max_depth
        self.above = above  # real paths of the images above, top first

    def open(self, path: str, fmt: str | None, read_only: bool, **options):
        below = BackingChain(self.opener, self.policy, self.max_depth,
                             self.above + (os.path.realpath(path),))
        return self.opener(path, fmt, read_only, below.open_backing,
                           data_file_path=below.data_file_path, **options)

    def _allowed(self, image_path: str, name: str, what: str, protocols: bool) -> str:
        """The path (or, where `protocols`, the protocol URI) a name from an image header
        means, if the policy allows it. `same-dir` allows no protocol: it is no file
        there."""
        protocol = ":" in name.split("/", 1)[0]
        if protocol and not protocols:
            raise ImageError(f"{what} '{printable(name)}' uses a protocol prefix, "
                             "which is not supported")
        path = name if protocol else resolve_backing(image_path, name)
        if self.policy == "none" or self.policy == "same-dir" and (
                protocol or os.path.dirname(os.path.realpath(path))
                != os.path.dirname(self.above[0])):
            raise ImageError(f"{what} '{printable(path)}' is not allowed by the "
                             f"backing policy '{self.policy}'")
        return path

    def data_file_path(self, image_path: str, name: str) -> str:
        """An external data file named by an image, under the same policy as backing
        files: an untrusted image must not pick a host file to read and write."""
        return self._allowed(image_path, name, "data file", protocols=False)

    def open_backing(self, image_path: str, name: str, fmt: str | None):
        # A protocol (an NBD URI, ...) is opened by name, as qemu does; the opener refuses
        # those it has no driver for.
        path = self._allowed(image_path, name, "backing file", protocols=True)
        real = path if ":" in name.split("/", 1)[0] else os.path.realpath(path)
        if real in self.above:
            raise ImageError(f"backing file '{printable(path)}' makes a loop in the "
                             "backing chain")
        if len(self.above) > self.max_depth:
            raise ImageError(f"backing chain of '{self.above[0]}' is deeper than "
                             f"{self.max_depth}")
        try:
            return self.open(path, fmt, read_only=True)
        except ImageError as e:
            # The name comes from the image: escape it to keep the message on one line.
            raise ImageError(f"could not open backing file: {printable(str(e))}") from None


def backing_size(image_path: str, backing_file: str | None, backing_fmt: str | None,
                 open_backing) -> int | None:
    """The size of a new image's backing file, opened read-only as qemu-img create
    does (`open_backing(path, fmt)`; None: -u, not opened)."""
    if backing_file is None or open_backing is None:
        return None
    if not backing_fmt:
        raise ImageError("Backing file specified without backing format")
    try:
        device = open_backing(resolve_backing(image_path, backing_file), backing_fmt)
    except ImageError as e:
        raise ImageError(f"Could not open backing image: {e}") from None
    try:
        return device.size
    finally:
        device.close()
