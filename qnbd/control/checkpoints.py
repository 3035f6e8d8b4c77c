"""`checkpoint EXPORT NAME [--bitmap PREV]` and `release EXPORT@NAME` (issue 15): a live
incremental backup in one command.

A checkpoint, made on the event loop between two NBD requests (so exact with respect to
every client's writes, docs/DESIGN.md "I/O model"):
- adds the persistent bitmap NAME, enabled: it records every change from this instant;
- disables PREV, if given: it stops changing, and holds what changed between the
  checkpoint that created it and this one;
- makes a read-only export `EXPORT@NAME` showing the image as it is at this instant, by
  copy-before-write into a temporary overlay (qnbd/block/cbw.py), offering
  `qemu:dirty-bitmap:PREV` so that a backup reads only what changed since PREV.
Everything that can be refused is checked before anything changes. The bitmaps follow
rule 9 as every bitmap does (stored by the clean close); the overlay is temporary.

Every writable export takes checkpoints: copy-before-write needs only reads and writes of
the device (qcow2 with or without a backing file or an external data file, QED, raw, a
window, a `--snapshot` overlay). Where the image keeps no persistent bitmaps (raw, QED:
qed_spec.txt has no bitmap; a window or an overlay, through which qemu finds none either)
a checkpoint is the view alone: no bitmap NAME is made, and `--bitmap` is refused, since
there is no previous bitmap to offer. Read-only exports are refused: they never change, a
view of one would be the export itself.
"""

from ..block.cbw import CopyBeforeWrite, PointInTime
from ..errors import QnbdError, printable
from ..export import Export, ExportConfig
from .bitmaps import busy_names, image_bitmaps, writable
from .protocol import BUSY, FAILED, NOT_SUPPORTED, UNKNOWN_EXPORT, ControlError


class Checkpoints:
    def __init__(self, catalog):
        self.catalog = catalog
        self.views: dict[str, tuple[object, PointInTime]] = {}   # view name -> (export, view)

    def of(self, export) -> list[str]:
        return [name for name, (base, _) in self.views.items() if base is export]

    def create(self, export, name: str, prev: str | None) -> dict:
        catalog = self.catalog
        writable(export)
        bitmaps = image_bitmaps(export)
        if not name:   # EXPORT@ would name nothing (a bitmap name is refused anyway)
            raise ControlError(FAILED, "a checkpoint needs a name")
        view_name = f"{export.name}@{name}"
        if view_name in catalog.by_name:
            raise ControlError(FAILED, f"export {view_name!r} already exists")
        if bitmaps is None and prev is not None:
            raise ControlError(NOT_SUPPORTED, f"export {export.name!r} has no persistent "
                               "bitmaps: its checkpoints are views only, without --bitmap")
        if prev is not None:
            if prev == name:
                raise ControlError(FAILED, "the new bitmap and --bitmap must differ")
            if prev in busy_names(catalog, bitmaps):
                raise ControlError(BUSY, f"bitmap {printable(prev)!r} is exported by "
                                   "another export and cannot stop changing")
        device = export.device
        wrapper = device if isinstance(device, CopyBeforeWrite) else \
            CopyBeforeWrite(device, self._counter(export.name))
        view = None
        try:
            if prev is not None:
                bitmaps.get(prev)   # consistent and present, or refused here
            view = PointInTime(wrapper.device)
            view_export = Export(ExportConfig(image=f"{export.config.image}@{name}",
                                              name=view_name, read_only=True, shared=0,
                                              description=f"checkpoint {name} of "
                                              f"{export.name}",
                                              bitmaps=[prev] if prev is not None else []),
                                 view)
            catalog.check(view_export)
            if bitmaps is not None:
                bitmaps.add(name)   # validates the name; the last step that may refuse
        except (QnbdError, OSError) as e:
            if view is not None:
                view.close()
            raise ControlError(FAILED, str(e) if isinstance(e, QnbdError) else
                               f"checkpoint overlay: {e.strerror or e}") from None
        if prev is not None:
            bitmaps.set_enabled(prev, False)
        wrapper.views.append(view)
        export.device = wrapper
        catalog.add(view_export)
        self.views[view_name] = (export, view)
        return {"export": view_name, "bitmap": name if bitmaps is not None else None,
                "previous": prev}

    def release(self, view_name: str) -> dict:
        entry = self.views.get(view_name)
        if entry is None:
            if view_name in self.catalog.by_name:
                raise ControlError(FAILED, f"export {view_name!r} is not a checkpoint")
            raise ControlError(UNKNOWN_EXPORT, f"no export named {view_name!r}")
        export, view = entry
        view_export = self.catalog.by_name[view_name]
        if view_export.clients:
            raise ControlError(BUSY, f"export {view_name!r} has {view_export.clients} "
                               "client(s)")
        self.catalog.remove(view_export)
        del self.views[view_name]
        wrapper = export.device
        wrapper.views.remove(view)
        if not wrapper.views:   # no view left: writes go straight to the image again
            export.device = wrapper.device
        view.close()
        return {"export": view_name, "copied": view.copied}

    def _counter(self, name: str):
        def on_copy(n: int) -> None:
            stats = self.catalog.stats.get(name)
            if stats is not None:
                stats.copy_before_write_bytes += n
        return on_copy
