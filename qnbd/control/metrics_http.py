"""The Prometheus endpoint (`--metrics ADDR:PORT`): a minimal HTTP/1.0 server on the
event loop, so a scrape reads the statistics between two NBD requests (a consistent
picture, no thread touching what the loop mutates). GET /metrics (or /) answers the text
exposition; anything else is 404. A request head is bounded (MAX_HEAD) and must arrive
within HEAD_TIMEOUT, and at most MAX_SCRAPERS connections are served at once (more are
closed as they come): scrapers cannot make us hold memory, or the descriptors that NBD
clients need.
"""

import asyncio
import logging

from ..errors import QnbdError
from .metrics import prometheus_text, registry_for

log = logging.getLogger("qnbd.metrics")

MAX_HEAD = 8 << 10
HEAD_TIMEOUT = 10.0
MAX_SCRAPERS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_address(text: str) -> tuple[str, int]:
    """ADDR:PORT (an IPv6 address in brackets) -> (host, port); one-line errors."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise QnbdError(f"--metrics: expected ADDR:PORT, got '{text}'")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port)


async def _handle(registry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + [""]
        if method != "GET":
            status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif path.split("?")[0] in ("/metrics", "/"):
            status, body, ctype = "200 OK", prometheus_text(registry), CONTENT_TYPE
        else:
            status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
        writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)
        await writer.drain()
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):
        pass
    finally:
        writer.close()


def metrics_service(host: str, port: int):
    """A `services` entry for qnbd.nbd.server.serve."""
    async def start(server):
        registry = registry_for(server)
        active = set()

        async def handle(reader, writer):
            if len(active) >= MAX_SCRAPERS:
                writer.transport.abort()
                return
            active.add(writer)
            try:
                await _handle(registry, reader, writer)
            finally:
                active.discard(writer)

        try:
            srv = await asyncio.start_server(handle, host, port, limit=MAX_HEAD,
                                             reuse_address=True)
        except OSError as e:
            raise QnbdError(f"--metrics: cannot listen on {host}:{port}: "
                            f"{e.strerror or e}") from None
        log.info("metrics on http://%s:%d/metrics", host, port)
        return srv.close
    return start
