"""The control socket's wire format (issue 15), sans-I/O: newline-delimited JSON.

A request is one line holding one JSON object:

    {"command": "bitmap-add", "args": {"export": "disk", "name": "b0"}, "id": 7}

`args` is optional (an empty object), `id` optional and echoed (any JSON scalar). A reply
is one line too:

    {"ok": true, "result": ..., "id": 7}
    {"ok": false, "error": {"code": "unknown-export", "message": "..."}, "id": 7}

Every request is checked against the command's schema (SCHEMAS) before anything runs:
unknown commands, unknown or missing arguments and wrong types are refused by name. A line
is bounded (MAX_LINE): what a client sends never sizes the server's memory beyond it.
"""

import json
from dataclasses import dataclass, field

# A request line, newline included. Generous for the longest request (a merge of many
# bitmaps, each name at most 1023 bytes), small enough that a client cannot grow us.
MAX_LINE = 64 << 10

# Error codes, stable for scripts (the message is for people).
BAD_JSON = "bad-json"
BAD_REQUEST = "bad-request"
LINE_TOO_LONG = "line-too-long"
UNKNOWN_COMMAND = "unknown-command"
UNKNOWN_EXPORT = "unknown-export"
NOT_SUPPORTED = "not-supported"
BUSY = "busy"
FAILED = "failed"
INTERNAL = "internal-error"


class ControlError(Exception):
    """A request refused: a code from the list above and a one-line message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = " ".join(message.split())  # one line, whatever it quotes


# Argument name -> (type, required). bool is not an int here (JSON true is not 1).
_EXPORT = {"export": (str, True)}
_BITMAP = {**_EXPORT, "name": (str, True)}
SCHEMAS: dict[str, dict[str, tuple[type, bool]]] = {
    "exports": {},
    "clients": {},
    "metrics": {},
    "bitmap-add": {**_BITMAP, "granularity": (int, False), "disabled": (bool, False)},
    "bitmap-remove": _BITMAP,
    "bitmap-clear": _BITMAP,
    "bitmap-enable": _BITMAP,
    "bitmap-disable": _BITMAP,
    "bitmap-merge": {**_BITMAP, "sources": (list, True)},
    "checkpoint": {**_BITMAP, "bitmap": (str, False)},
    "release": _EXPORT,
}


@dataclass
class Request:
    command: str
    args: dict = field(default_factory=dict)
    id: object = None


def parse(line: bytes) -> Request:
    """One request line (newline stripped or not) -> a validated Request, or ControlError.
    Raised errors carry the request's id when it could be read (`error.id`)."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ControlError(BAD_JSON, f"request is not JSON: {e}") from None
    except RecursionError:   # "[[[[...": nesting deeper than the decoder goes
        raise ControlError(BAD_JSON, "request is not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ControlError(BAD_REQUEST, "request must be a JSON object")
    rid = doc.get("id")
    try:
        return _validate(doc, rid)
    except ControlError as e:
        e.id = rid if _scalar(rid) else None
        raise


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _validate(doc: dict, rid) -> Request:
    extra = set(doc) - {"command", "args", "id"}
    if extra:
        raise ControlError(BAD_REQUEST, f"unknown request field {sorted(extra)[0]!r}")
    if not _scalar(rid):
        raise ControlError(BAD_REQUEST, "id must be a string, number or boolean")
    command = doc.get("command")
    if not isinstance(command, str):
        raise ControlError(BAD_REQUEST, "request needs a \"command\" string")
    schema = SCHEMAS.get(command)
    if schema is None:
        raise ControlError(UNKNOWN_COMMAND, f"unknown command {command!r} (known: "
                           f"{', '.join(SCHEMAS)})")
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise ControlError(BAD_REQUEST, "args must be a JSON object")
    for key, value in args.items():
        if key not in schema:
            raise ControlError(BAD_REQUEST, f"{command}: unknown argument {key!r}")
        want = schema[key][0]
        if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
            raise ControlError(BAD_REQUEST, f"{command}: argument {key!r} must be "
                               f"{_TYPE_NAMES[want]}")
    for key, (_want, required) in schema.items():
        if required and key not in args:
            raise ControlError(BAD_REQUEST, f"{command}: missing argument {key!r}")
    if command == "bitmap-merge":
        sources = args["sources"]
        if not sources or not all(isinstance(s, str) for s in sources):
            raise ControlError(BAD_REQUEST, "bitmap-merge: sources must be a non-empty "
                               "list of bitmap names")
    return Request(command, args, rid)


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


def ok(result, rid=None) -> bytes:
    return _line({"ok": True, "result": result, "id": rid})


def error(code: str, message: str, rid=None) -> bytes:
    return _line({"ok": False, "error": {"code": code, "message": message}, "id": rid})


def _line(doc: dict) -> bytes:
    if doc["id"] is None:
        del doc["id"]
    # ensure_ascii: names from images never break the line (escaped, not raw).
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class LineBuffer:
    """Bytes in, complete lines out; a line longer than MAX_LINE is an error (the rest of
    it, up to its newline, is skipped so the session can go on)."""

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self.buf = bytearray()
        self.skipping = False

    def feed(self, data: bytes) -> list[bytes | ControlError]:
        out: list[bytes | ControlError] = []
        self.buf += data
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > self.limit:
                    if not self.skipping:
                        out.append(ControlError(LINE_TOO_LONG,
                                                f"request longer than {self.limit} bytes"))
                    self.skipping = True
                    self.buf.clear()
                return out
            line = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            if self.skipping:
                self.skipping = False   # the end of the long line
                continue
            if len(line) > self.limit:
                out.append(ControlError(LINE_TOO_LONG, f"request longer than {self.limit} "
                                        "bytes"))
            elif line.strip():
                out.append(line)
