"""Images named by a protocol instead of a file (qemu's path_has_protocol: a name with a
':' before any '/'), for the top image and for backing files:

    null-co://                      block/null.py (options: size, read_zeroes)
    nbd://, nbd+unix://, nbds://... block/nbd_client.py, through libnbd
    file:PATH                       the file PATH

The bytes a protocol gives are raw data (qemu's raw format over that protocol); any other
protocol, or another format over one, fails at once with one line.
"""

import os

from .errors import ImageError

SECTOR = 512


def protocol_of(name) -> str | None:
    head = os.fspath(name).split("/", 1)[0]
    return head.split(":", 1)[0] if ":" in head else None


def file_path(name) -> str:
    """file:PATH names PATH."""
    name = os.fspath(name)
    return name[len("file:"):] if protocol_of(name) == "file" else name


def open_protocol(name: str, read_only: bool, probed: bool, size: int | None = None,
                  read_zeroes: bool = False, **_options):
    """The device behind `name`. probed: the format was not given (a probed raw image's
    requests are aligned to 512 bytes, as qemu's raw_refresh_limits). The devices are
    imported here: the tools that open plain files need neither (libnbd's client)."""
    from .block.nbd_client import SCHEMES, NbdDevice
    from .block.null import DEFAULT_SIZE, NullDevice
    protocol = protocol_of(name)
    if protocol == "null-co":
        return NullDevice(DEFAULT_SIZE if size is None else size, read_zeroes, read_only,
                          SECTOR if probed else 1)
    if protocol in SCHEMES:
        device = NbdDevice(name, read_only)
        device.request_alignment = SECTOR if probed else 1
        return device
    raise ImageError(f"Unknown protocol '{protocol}'")
