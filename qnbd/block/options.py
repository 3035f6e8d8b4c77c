"""QemuOpts-style option strings (`-o key=value,...` of qemu-img create), as qemu's
util/qemu-option.c parses them, and the value parsers a format's option table uses."""

from ..errors import QnbdError
from ..units import parse_size


def split_options(text: str) -> list[tuple[str, str]]:
    """key=value pairs separated by commas; ",," is a literal comma; a bare key means
    key=on."""
    pairs, item, i = [], [], 0
    while i <= len(text):
        if i == len(text) or (text[i] == "," and text[i + 1:i + 2] != ","):
            part = "".join(item)
            if part:
                key, sep, value = part.partition("=")
                pairs.append((key, value if sep else "on"))
            item = []
            i += 1
        elif text[i] == ",":  # ",,"
            item.append(",")
            i += 2
        else:
            item.append(text[i])
            i += 1
    return pairs


def parse_bool(name: str, value: str) -> bool:
    # QemuOpts booleans (qapi_bool_parse)
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QnbdError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_int(name: str, value: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise QnbdError(f"Parameter '{name}' expects a number") from None


def parse_size_option(name: str, value: str) -> int:
    try:
        return parse_size(value, what=f"value for '{name}'")
    except ValueError as e:
        raise QnbdError(str(e)) from None


def parse_text(name: str, value: str) -> str:
    return value


def parse_options(fmt: str, known: dict, strings: list[str]) -> dict:
    """Options for format `fmt` from -o strings; `known` maps an option key to
    (keyword argument, value parser)."""
    kwargs = {}
    for text in strings:
        for key, value in split_options(text):
            if key not in known:
                raise QnbdError(f"Invalid parameter '{key}' for format '{fmt}' "
                                f"(known: {', '.join(known)})")
            arg, parse = known[key]
            kwargs[arg] = parse(key, value)
    return kwargs
