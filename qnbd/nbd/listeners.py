"""Where clients come from: unix sockets, TCP addresses and listening sockets inherited
through systemd socket activation (sd_listen_fds(3)). The NBD protocol starts once a
connection is accepted (proto.md "Protocol phases"); nothing here speaks it.
"""

import errno
import os
import socket
import stat

from ..errors import QnbdError


async def listen(loop, listener, factory):
    """An asyncio server accepting on `listener` (a qnbd.config.Listener: an inherited
    `fd`, a `unix` path or an `address` and `port`)."""
    if listener.fd is not None:
        sock = socket.socket(fileno=listener.fd)
        if sock.family == socket.AF_UNIX:
            return await loop.create_unix_server(factory, sock=sock)
        return await loop.create_server(factory, sock=sock)
    if listener.unix is not None:
        return await loop.create_unix_server(factory, sock=bind_unix(listener.unix))
    try:
        return await loop.create_server(factory, listener.address, listener.port,
                                        reuse_address=True)
    except socket.gaierror as e:
        # qemu-nbd's words (inet_listen_saddr) for a host or port getaddrinfo refuses.
        raise QnbdError(f"address resolution failed for {listener.describe()}: "
                        f"{e.strerror or e}") from None
    except OSError as e:
        raise QnbdError(f"Failed to bind socket to {listener.describe()}: "
                        f"{e.strerror or e}") from None


def bind_unix(path: str, mode: int | None = None) -> socket.socket:
    """A listening unix socket at `path` (a stale one left by a dead server is replaced).
    With `mode`, the socket file is created with those permissions, never wider even for
    an instant (the umask is set around bind: the process is single-threaded here)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode) if mode is not None else None
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not _stale_socket(path):
                raise
            os.unlink(path)  # left behind by a server that died: nobody listens on it
            sock.bind(path)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise QnbdError(f"Failed to bind socket to {path}: {e.strerror or e}") from None
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    return sock


def _stale_socket(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def socket_activation() -> list[int]:
    """systemd's protocol (sd_listen_fds(3)): LISTEN_PID names this process and
    LISTEN_FDS counts listening sockets passed from fd 3 on. The variables are removed so
    that nothing started later mistakes them for its own. Returns the listening fds."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        raise QnbdError(f"bad socket activation variables LISTEN_PID={pid} LISTEN_FDS={count}") \
            from None
    for fd in range(3, 3 + n):
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise QnbdError(f"socket activation: fd {fd}: {e.strerror}") from None
    return list(range(3, 3 + n))
