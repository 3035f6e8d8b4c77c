"""What the handshake offers: the exports by name, their metadata contexts, and the
transmission flags computed from what each export's device can do (proto.md "Transmission
flags"). Exports know nothing of the wire; this is where their abilities become bits, as
nbdkit computes its eflags from the backend's can_* answers.
"""

from ..errors import QnbdError
from . import protocol as p
from .contexts import MetaContext, contexts_for
from .stats import ExportStats


def transmission_flags(export, structured: bool, extended: bool = False,
                       contexts: bool = False) -> int:
    """The flags for one session. `contexts`: metadata contexts were selected for this
    export, which is when the block status filter is worth advertising."""
    flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_CACHE
    if structured or extended:
        flags |= p.FLAG_SEND_DF  # only with structured replies (proto.md SEND_DF)
    if export.read_only:
        flags |= p.FLAG_READ_ONLY
    else:
        flags |= p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES
        if export.can_fast_zero:
            flags |= p.FLAG_SEND_FAST_ZERO
    if export.can_multi_conn:
        flags |= p.FLAG_CAN_MULTI_CONN
    if extended and contexts:
        # "MUST NOT advertise this bit unless the client successfully negotiates extended
        # headers", "SHOULD NOT ... if the client does not negotiate metacontexts".
        flags |= p.FLAG_BLOCK_STATUS_PAYLOAD
    return flags


class Catalog:
    """The exports a handshake can choose from, and their contexts."""

    def __init__(self, exports):
        for export in exports:
            self.check(export)
        self.exports = exports
        self.by_name = {e.name: e for e in exports}
        self._contexts = {id(e): contexts_for(e) for e in exports}
        # Request statistics by export name, shared by the export's connections.
        self.stats = {e.name: ExportStats() for e in exports}
        self.shutting_down = False

    @staticmethod
    def check(export) -> None:
        # Names and descriptions travel as protocol strings (proto.md "Conventions").
        for what, text in (("name", export.name), ("description", export.description)):
            if len(text.encode()) > p.MAX_STRING:
                raise QnbdError(f"export {what} is longer than {p.MAX_STRING} bytes")

    def add(self, export) -> None:
        """An export that appears while serving (a checkpoint's view): the next
        handshake finds it."""
        self.check(export)
        if export.name in self.by_name:
            raise QnbdError(f"export {export.name!r} already exists")
        self.exports.append(export)
        self.by_name[export.name] = export
        self._contexts[id(export)] = contexts_for(export)
        self.stats[export.name] = ExportStats()

    def remove(self, export) -> None:
        """The export disappears from handshakes; sessions already using it keep their
        own reference (the caller makes sure there are none)."""
        self.exports.remove(export)
        del self.by_name[export.name]
        del self._contexts[id(export)]
        del self.stats[export.name]

    def find(self, name: str):
        """The empty name is the default export: the one named "" or else the first
        (proto.md NBD_OPT_EXPORT_NAME: "reserved for a default export")."""
        export = self.by_name.get(name)
        if export is None and name == "":
            export = self.exports[0]
        return export

    def contexts(self, export) -> list[MetaContext]:
        return self._contexts[id(export)]
