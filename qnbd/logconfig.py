"""Where qnbd's own log goes (`qnbd serve --log-level/--log-file/--log-format`).

By default a server writes what qemu-nbd would: warnings and errors on stderr, and nothing
per connection, so scripts that capture qemu-nbd's stderr see the same with qnbd. The
connection log (clients served, TLS, disconnects, shutdown) is the `info` level; `debug` adds
more. `--log-format=json` writes one JSON object a line, for log collectors.
"""

import json
import logging
import sys
import time

from .errors import QnbdError

LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "warning": logging.WARNING,
          "info": logging.INFO, "debug": logging.DEBUG}
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(prefix: str, level: str = "warning", path: str | None = None,
              fmt: str = "text") -> None:
    """Send the `qnbd` loggers to stderr or `path` at `level`."""
    if path is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as e:
            raise QnbdError(f"Cannot open log file '{path}': {e.strerror}") from None
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter(f"{prefix}: %(message)s"))
    root = logging.getLogger("qnbd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    root.propagate = False
