"""An Export: one block device offered over NBD, plus the policy around it.

Policy options keep qemu-nbd's meaning (qemu-nbd(8), qemu's block layer):
- discard=ignore|unmap: whether NBD_CMD_TRIM and WRITE_ZEROES without NO_HOLE may
  release space (ignore: TRIM succeeds and does nothing).
- detect_zeroes=off|on|unmap: turn all-zero WRITEs into write-zeroes (unmap: that may
  also release space; needs discard=unmap, as in qemu).
- cache=writeback|none|writethrough|directsync|unsafe: what FUA and FLUSH cost.
  writeback/none honour them as asked; writethrough/directsync make every write FUA;
  unsafe ignores FUA and FLUSH (fast, and not crash-safe). none/directsync open the
  image files with O_DIRECT (buffered, with a notice, where the file system refuses).
- snapshot: writes go to a throwaway overlay; the image itself is opened read-only.
- load_snapshot (-l): export an internal snapshot of a qcow2 image (an id or a name, or
  "snapshot.id=ID,snapshot.name=NAME"), read-only as in qemu-nbd.
- shared: how many clients may use the export at once (0 = unlimited). With more than
  one, `can_multi_conn` holds: every connection of an export shares this one open
  device, so a flush on one covers the writes of all.
- bitmaps (-B NAME, repeatable): persistent dirty bitmaps of a qcow2 image offered as
  `qemu:dirty-bitmap:NAME`; they stay enabled and keep tracking while exported, as in
  qemu-nbd. A parallels image's bitmaps (read-only, block/parallels_ext.py) too. allocation_depth (-A): offer `qemu:allocation-depth`.
- backing=any|same-dir|none (qnbd's own, `--backing-policy`): which backing files an
  image may name. "any" is qemu-nbd's behaviour; an untrusted image should get "same-dir"
  (only files in its own directory, symlinks resolved) or "none", so that its header
  cannot make the server read arbitrary host files.
- tls_only (config file only): with TLS mode "on" (SELECTIVETLS), the export is
  invisible to clients that have not started TLS.
- offset, size (qemu-nbd --offset, the raw driver's options in --image-opts): export a
  window of the image (block/window.py).

An Export says what it can do (`read_only`, `can_fast_zero`, `can_multi_conn`); turning
that into wire flags, and offering metadata contexts, is the NBD layer's job (qnbd/nbd/).
"""

from contextlib import nullcontext
from dataclasses import dataclass, field

from . import fileio
from .block.base import read_parts
from .block.plan import read_plan, write_plan
from .block.chain import BACKING_POLICIES
from .block.overlay import SnapshotOverlay
from .block.window import Window
from .errors import ImageError, QnbdError
from .formats import DRIVERS, open_image

DISCARD_MODES = ("ignore", "unmap")
DETECT_ZEROES_MODES = ("off", "on", "unmap")
CACHE_MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")
DIRECT_CACHE_MODES = ("none", "directsync")   # O_DIRECT, as qemu's cache.direct=on


@dataclass
class ExportConfig:
    """Everything needed to open and serve one export; built by the CLI or the config file."""
    image: str
    name: str = ""
    format: str | None = None
    description: str = ""
    read_only: bool = False
    discard: str = "ignore"
    detect_zeroes: str = "off"
    cache: str = "writeback"
    snapshot: bool = False
    shared: int = 1
    bitmaps: list[str] = field(default_factory=list)
    allocation_depth: bool = False
    backing: str = "any"
    tls_only: bool = False
    offset: int = 0
    size: int | None = None
    options: dict = field(default_factory=dict)  # the driver's, from --image-opts
    load_snapshot: str | None = None

    def validate(self) -> None:
        """One-line errors in qemu-nbd's words for the combinations it refuses."""
        for key, value, allowed in (("discard", self.discard, DISCARD_MODES),
                                    ("detect-zeroes", self.detect_zeroes, DETECT_ZEROES_MODES),
                                    ("cache", self.cache, CACHE_MODES),
                                    ("backing", self.backing, BACKING_POLICIES)):
            if value not in allowed:
                raise QnbdError(f"Invalid {key} mode '{value}' (expected {'|'.join(allowed)})")
        if self.format is not None and self.format not in DRIVERS:
            raise QnbdError(f"Unknown image format '{self.format}' (supported: {', '.join(DRIVERS)})")
        if self.detect_zeroes == "unmap" and self.discard != "unmap":
            raise QnbdError("setting detect-zeroes to unmap is not allowed without setting "
                            "discard operation to unmap")
        if self.shared < 0:
            raise QnbdError(f"Invalid shared value '{self.shared}' (0 = unlimited)")


class Export:
    def __init__(self, config: ExportConfig, device):
        self.config = config
        self.name = config.name
        self.description = config.description
        self.device = device
        self.size = device.size
        # NBD_INFO_BLOCK_SIZE's minimum: the device's request alignment (512 for a probed
        # raw image, as qemu-nbd), else any byte.
        self.min_block = getattr(device, "request_alignment", 1)
        self.read_only = config.read_only or device.read_only
        self.shared = config.shared
        self.clients = 0
        self.may_trim = config.discard == "unmap"
        self.detect_zeroes = config.detect_zeroes != "off"
        self.fua_always = config.cache in ("writethrough", "directsync")
        self.unsafe = config.cache == "unsafe"
        self.allocation_depth = config.allocation_depth
        self.tls_only = config.tls_only
        self.bitmaps = [_bitmap(device, name) for name in dict.fromkeys(config.bitmaps)]
        self.can_fast_zero = not self.read_only and device.supports_fast_zero
        self.can_multi_conn = self.shared != 1
        # Two writes may be out at once only when they touch no common unit of this
        # size: a qcow2 cluster (they never allocate or map the same one); a probed raw
        # image's sector (rule 14 checks a write to the first one against all of it,
        # so it must not run beside another write there).
        self.write_unit = (getattr(device, "cluster_size", None)
                           or getattr(device, "request_alignment", 1))

    @classmethod
    def open(cls, config: ExportConfig) -> "Export":
        config.validate()
        # cache.direct=on in qemu's terms: the page cache is bypassed (qnbd/direct_io.py).
        with fileio.direct_opens() if config.cache in DIRECT_CACHE_MODES else nullcontext():
            device = cls._open_device(config)
        try:
            if config.offset or config.size is not None:
                device = Window(device, config.offset, config.size)
            return cls(config, device)
        except BaseException:
            # Close what was opened: a read-write open has already set in_use on the
            # image's bitmaps, and only a clean close clears it (docs/DESIGN.md rule 9).
            device.close()
            raise

    @staticmethod
    def _open_device(config: ExportConfig):
        loaded = config.load_snapshot
        if config.snapshot:
            base = open_image(config.image, config.format, read_only=True,
                              backing_policy=config.backing, snapshot=loaded,
                              **config.options)
            return SnapshotOverlay(base)
        return open_image(config.image, config.format,
                          read_only=config.read_only or loaded is not None,
                          backing_policy=config.backing, snapshot=loaded, **config.options)

    def admit(self) -> str | None:
        """Why one more client may not use this export, or None."""
        if self.shared and self.clients >= self.shared:
            return f"export '{self.name}' already has {self.clients} client(s) (shared={self.shared})"
        return None

    # --- I/O with policy applied; ranges were checked by the NBD layer ---

    def _fua(self, fua: bool) -> bool:
        return (fua or self.fua_always) and not self.unsafe

    def read(self, offset: int, length: int) -> bytes:
        return self.device.read(offset, length)

    def read_parts(self, offset: int, length: int):
        return read_parts(self.device, offset, length)

    def read_plan(self, offset: int, length: int):
        return read_plan(self.device, offset, length)

    def _zeroes(self, data) -> bool:
        """detect-zeroes applies: ordinary data fails at its first byte, so it costs
        nothing (the payload may be a bytearray, whose lstrip would copy it)."""
        return self.detect_zeroes and data and data[0] == 0 and data.count(0) == len(data)

    def write_plan(self, offset: int, data, fua: bool):
        """The device's plan for this write (qnbd/block/plan.py), or None: the caller
        then calls `write`."""
        if self._zeroes(data):
            return None
        return write_plan(self.device, offset, data, self._fua(fua))

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        if self._zeroes(data):
            self.device.write_zeroes(offset, len(data), may_trim=self.may_trim,
                                     fua=self._fua(fua))
        else:
            self.device.write(offset, data, fua=self._fua(fua))

    def write_zeroes(self, offset: int, length: int, no_hole: bool, fast: bool, fua: bool):
        self.device.write_zeroes(offset, length, may_trim=self.may_trim and not no_hole,
                                 fast=fast, fua=self._fua(fua))

    def trim(self, offset: int, length: int, fua: bool) -> None:
        if self.may_trim:
            self.device.discard(offset, length, fua=self._fua(fua))

    def flush(self) -> None:
        if not self.unsafe:
            self.device.flush()

    def block_status(self, offset: int, length: int):
        return self.device.block_status(offset, length)

    def close(self) -> None:
        self.device.close()


def _bitmap(device, name: str):
    """The named bitmap of the image behind `device` or, as qemu-nbd finds it
    (nbd/server.c, nbd_export_create: bdrv_find_dirty_bitmap on each node down
    bdrv_filter_or_cow_bs), of the first image down its backing chain that has one; a
    snapshot overlay is looked through. A bitmap of a backing file records no writes:
    writes go to the top image. Raw files have no bitmaps; a window (--offset) is not
    looked through, as qemu's raw node with an offset is not a filter."""
    image = getattr(device, "base", device)
    while image is not None:
        bitmaps = getattr(image, "bitmaps", None)
        if bitmaps is not None and any(e.name == name for e in bitmaps.describe()):
            return bitmaps.get(name)
        image = getattr(image, "backing", None)
    raise ImageError(f"Bitmap '{name}' is not found")
