"""Sizes written by users, parsed the way qemu-img parses them (qemu util/cutils.c,
do_strtosz, and qemu-img.c, cvtnum), so that a size accepted by one tool means the same
number of bytes to the other.

    1024, 0x400         plain bytes (decimal, or hexadecimal without a fraction)
    64k 1M 2G 1T 1P 1E  powers of 1024, suffix in either case; "b"/"B" means bytes
    1.5G                a fraction needs a scaling suffix; it is truncated to a byte
    .5k                 the whole part may be left out before a fraction, as current qemu
                        allows (qemu 7.2 refused it; the newer rule accepts a superset)
"""

import re

MAX_SIZE = (1 << 63) - 1  # qemu-img: sizes are int64_t
_SUFFIXES = "BKMGTPE"  # index = power of 1024
_DECIMAL = re.compile(r"[ \t\n\r\f\v]*\+?([0-9]*)(?:\.([0-9]*))?([bkmgtpeBKMGTPE]?)")
# strtoull(base 16) swallows b/e as digits, so hex can only take the k..p suffixes.
_HEX = re.compile(r"[ \t\n\r\f\v]*\+?0[xX]([0-9a-fA-F]+)([kmgtpKMGTP]?)")

_INVALID = ("Invalid {what} specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
_RANGE = "Invalid {what} specified. Must be between 0 and {max}."


def parse_size(text: str, what: str = "image size") -> int:
    """Bytes meant by `text`; ValueError with qemu-img's one-line message otherwise."""
    m = _HEX.fullmatch(text)
    if m:
        value = int(m.group(1), 16) * _multiplier(m.group(2))
    else:
        m = _DECIMAL.fullmatch(text)
        if not m:
            raise ValueError(_INVALID.format(what=what))
        whole, frac, suffix = m.groups()
        if not whole and not frac:  # "", ".", ".k": no digits at all
            raise ValueError(_INVALID.format(what=what))
        mul = _multiplier(suffix)
        # The fraction 0.frac as numerator / 10**digits, in integers: exact, and without
        # importing fractions (decimal, numbers) into every command that parses options.
        numerator = int(frac or 0)
        if numerator and mul == 1:  # "1.5" or "1.5b": a byte count must be whole
            raise ValueError(_INVALID.format(what=what))
        value = int(whole or 0) * mul + numerator * mul // 10 ** len(frac or "")
    if value > MAX_SIZE:
        raise ValueError(_RANGE.format(what=what, max=MAX_SIZE))
    return value


def _multiplier(suffix: str) -> int:
    return 1024 ** _SUFFIXES.index(suffix.upper()) if suffix else 1
