"""Metadata contexts for NBD_CMD_BLOCK_STATUS (proto.md "Metadata querying").

A registry of providers, each answering for the contexts it can offer on an export. Only
`base:allocation` is registered here; providers for `qemu:dirty-bitmap:NAME` and
`qemu:allocation-depth` (qemu docs/interop/nbd.rst) plug in with `register_provider`
without touching the handshake or the transmission code.

Query rules implemented in `list_contexts` / `select_contexts`:
- NBD_OPT_LIST_META_CONTEXT with no query lists every context of the export; a query
  ending in ':' (such as `base:` or `qemu:dirty-bitmap:`) is a wildcard listing every
  context whose name starts with it; any other query lists the exact name if offered.
- NBD_OPT_SET_META_CONTEXT selects exact names only: wildcards and unknown names are
  ignored, never errors ("the server MUST ignore ... rather than report an error").
"""

from collections.abc import Callable, Iterable



class MetaContext:
    """One selectable context. `extents` returns (length, flags) descriptors that
    cover consecutive bytes from `offset`; at least one, never past the export end."""

    name: str

    def extents(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        raise NotImplementedError


# Descriptors per chunk: the spec asks for at most 2^20; far fewer keeps replies small
# while a client still always makes progress.
MAX_DESCRIPTORS = 1 << 16


class BaseAllocation(MetaContext):
    """`base:allocation` (proto.md): bit 0 HOLE, bit 1 ZERO - the same bits the
    BlockDevice contract uses, so extents pass through unchanged."""

    name = "base:allocation"

    def __init__(self, device):
        self.device = device

    def extents(self, offset, length, one):
        end = min(offset + length, self.device.size)
        out: list[tuple[int, int]] = []
        while offset < end:
            start = offset
            for ext in self.device.block_status(offset, end - offset):
                n = min(ext.length, end - offset)
                if n <= 0:
                    break
                if out and out[-1][1] == ext.flags:  # merge equal neighbours
                    out[-1] = (out[-1][0] + n, ext.flags)
                else:
                    out.append((n, ext.flags))
                offset += n
            if one or offset == start or len(out) >= MAX_DESCRIPTORS:
                break
        if not out:  # "MUST return at least one status descriptor": 0 is always safe
            out.append((end - offset, 0))
        return out[:1] if one else out


# A provider returns the contexts it offers for one export.
Provider = Callable[["object"], Iterable[MetaContext]]
_providers: list[Provider] = []


def register_provider(provider: Provider) -> None:
    """Add a source of contexts (e.g. one context per exposed dirty bitmap)."""
    _providers.append(provider)


def contexts_for(export) -> list[MetaContext]:
    """Every context `export` offers, in a stable order (the order of IDs)."""
    return [ctx for provider in _providers for ctx in provider(export)]


def list_contexts(available: list[MetaContext], queries: list[str]) -> list[MetaContext]:
    if not queries:
        return list(available)
    return [c for c in available
            if any(c.name == q or (q.endswith(":") and c.name.startswith(q)) for q in queries)]


def select_contexts(available: list[MetaContext], queries: list[str]) -> list[MetaContext]:
    wanted = set(queries)
    return [c for c in available if c.name in wanted]


register_provider(lambda export: [BaseAllocation(export.device)])
