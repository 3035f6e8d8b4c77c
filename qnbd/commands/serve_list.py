"""`qnbd serve -L`: qemu-nbd's client mode, listing a server's exports in qemu-nbd's
format (qemu-nbd.c, qemu_nbd_client_list), with libnbd as the client.

For each export named by NBD_OPT_LIST: NBD_OPT_INFO (size, flags, block sizes) and
NBD_OPT_LIST_META_CONTEXT with no query, which asks for every context (proto.md). The
format is current qemu's, which prints the header style the client negotiated
("transaction size", qemu 8.2 and later) and the block-status-payload flag (qemu 9).
"""

import errno
import os

from ..errors import QnbdError

# Transmission flag bits in the order qemu-nbd prints their names (proto.md
# "Transmission flags"); bit 0 is NBD_FLAG_HAS_FLAGS. libnbd reports each as a can_*/is_*
# answer rather than the raw field, so the field is rebuilt from them.
FLAGS = (
    (1, "readonly", "is_read_only"), (2, "flush", "can_flush"), (3, "fua", "can_fua"),
    (4, "rotational", "is_rotational"), (5, "trim", "can_trim"),
    (6, "zeroes", "can_zero"), (7, "df", "can_df"), (8, "multi", "can_multi_conn"),
    (10, "cache", "can_cache"), (11, "fast-zero", "can_fast_zero"),
    (12, "block-status-payload", "can_block_status_payload"),
)


def list_exports(listener, creds=None, hostname: str | None = None) -> str:
    """The text qemu-nbd -L prints for the server at `listener` (a config.Listener).
    creds: objects.TlsCreds with endpoint client, or None for plaintext."""
    try:
        import nbd
    except ImportError:
        raise QnbdError("--list needs libnbd's Python bindings (Debian: python3-libnbd)") \
            from None
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)  # ask for descriptions (NBD_INFO_DESCRIPTION)
    if creds is not None:
        _tls(h, creds, hostname)
    where = listener.unix or f"{listener.address}:{listener.port}"
    try:
        if listener.unix:
            h.connect_unix(listener.unix)
        else:
            h.connect_tcp(listener.address, str(listener.port))
    except nbd.Error as e:
        raise QnbdError(f"Failed to connect to '{where}': {_reason(e)}") from None
    try:
        names = []
        h.opt_list(lambda name, description: names.append(name) or 0)
        out = [f"exports available: {len(names)}"]
        for name in names:
            out += _describe(h, name)
        h.opt_abort()
    except nbd.Error as e:
        raise QnbdError(_reason(e)) from None
    return "\n".join(out) + "\n"


def _tls(h, creds, hostname):
    import nbd
    h.set_tls(nbd.TLS_REQUIRE)
    if creds.kind == "psk":
        h.set_tls_psk_file(os.path.join(creds.dir, "keys.psk"))
        h.set_tls_username(creds.username)
    else:
        h.set_tls_certificates(creds.dir)
        h.set_tls_verify_peer(creds.verify_peer)
    if hostname is not None:
        if not hasattr(h, "set_tls_hostname"):  # an older libnbd (1.14 has none)
            raise QnbdError("--tls-hostname needs a libnbd with nbd_set_tls_hostname")
        h.set_tls_hostname(hostname)


def _reason(e) -> str:
    """The system error as qemu words it; libnbd gives its errno as a name ("ENOENT")."""
    code = getattr(errno, e.errno, None) if isinstance(e.errno, str) else e.errno
    if code:
        return os.strerror(code)
    return str(e.string).split(": ", 1)[-1]


def _describe(h, name: str) -> list[str]:
    h.set_export_name(name)
    h.opt_info()
    out = [f" export: '{name}'"]
    try:
        description = h.get_export_description()
    except Exception:  # nbd.Error: the server sent none
        description = ""
    if description:
        out.append(f"  description: {description}")
    flags = 1
    for bit, _, method in FLAGS:
        answer = getattr(h, method, None)
        if answer is not None and answer():
            flags |= 1 << bit
    names = "".join(f" {label}" for bit, label, _ in FLAGS if flags & (1 << bit))
    out += [f"  size:  {h.get_size()}", f"  flags: 0x{flags:x} ({names} )"]
    sizes = [h.get_block_size(k) for k in (0, 1, 2)]  # minimum, preferred, maximum
    if sizes[0]:
        out += [f"  min block: {sizes[0]}", f"  opt block: {sizes[1]}",
                f"  max block: {sizes[2]}"]
    extended = getattr(h, "get_extended_headers_negotiated", lambda: False)()
    out.append(f"  transaction size: {'64-bit' if extended else '32-bit'}")
    contexts = []
    h.opt_list_meta_context(lambda context: contexts.append(context) or 0)
    if contexts:
        out.append(f"  available meta contexts: {len(contexts)}")
        out += [f"   {c}" for c in contexts]
    return out
