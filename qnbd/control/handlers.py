"""The control socket's commands, run on the event loop between two NBD requests (the
engines are synchronous, docs/DESIGN.md "I/O model"), so each is atomic with respect to
the writes of every client.

The server is seen through what it offers (`catalog`, `active` connections): this package
sits above qnbd.nbd, which knows nothing of it (docs/DESIGN.md "Layers").
"""

import logging

from . import bitmaps
from .checkpoints import Checkpoints
from .protocol import INTERNAL, UNKNOWN_EXPORT, ControlError, Request

log = logging.getLogger("qnbd.control")


class Handlers:
    def __init__(self, server, metrics=None):
        self.server = server
        self.metrics = metrics   # a callable returning the metrics as JSON, or None
        self.checkpoints = Checkpoints(server.catalog)

    def run(self, request: Request):
        """The result of a validated request, or ControlError."""
        command = request.command
        try:
            if command == "exports":
                return [self._export_info(e) for e in self.server.catalog.exports]
            if command == "clients":
                return self._clients()
            if command == "metrics":
                if self.metrics is None:
                    raise ControlError("not-supported", "metrics are not collected")
                return self.metrics()
            if command.startswith("bitmap-"):
                export = self._export(request.args["export"])
                result = bitmaps.run(self.server.catalog, export, command, request.args)
                log.info("control: %s %s %s", command, export.name, request.args["name"])
                return result
            if command == "checkpoint":
                export = self._export(request.args["export"])
                result = self.checkpoints.create(export, request.args["name"],
                                                 request.args.get("bitmap"))
                log.info("control: checkpoint %s", result["export"])
                return result
            if command == "release":
                result = self.checkpoints.release(request.args["export"])
                log.info("control: released %s", result["export"])
                return result
        except ControlError:
            raise
        except Exception as e:   # a bug costs this request, never the server
            log.error("control: %s failed", command, exc_info=e)
            raise ControlError(INTERNAL, f"{command} failed: internal error") from None
        raise ControlError(INTERNAL, f"{command} has no handler")

    def _export(self, name: str):
        export = self.server.catalog.by_name.get(name)
        if export is None:
            raise ControlError(UNKNOWN_EXPORT, f"no export named {name!r}")
        return export

    def _export_info(self, export) -> dict:
        return {"name": export.name, "image": export.config.image,
                "size": export.size, "read_only": export.read_only,
                "clients": export.clients, "bitmaps": bitmaps.describe(export),
                "checkpoints": self.checkpoints.of(export)}

    def _clients(self) -> list[dict]:
        out = []
        for conn in self.server.active:
            tx = conn.tx
            out.append({"peer": conn.peer, "export": tx.export.name if tx else None,
                        "since": round(conn.since, 3), "bytes_in": conn.bytes_in,
                        "bytes_out": conn.bytes_out})
        return sorted(out, key=lambda c: c["since"])
