"""The `qnbd` command line: parses options and calls into the library, nothing more."""

import argparse
import importlib
import re
import sys

from . import __version__
from .errors import QnbdError

# Subcommand name -> module under qnbd.commands.
COMMANDS = ("serve", "create", "info", "bitmap", "check", "map", "convert", "snapshot", "resize",
            "ctl")


class QemuStyleParser(argparse.ArgumentParser):
    """Usage errors reported as qemu's tools report them, exiting 1 instead of argparse's
    usage block and exit 2, so scripts written for qemu-nbd and qemu-img see the same
    exit code and the same lines: a bad option value is one line naming it (the option's
    type function words it, see commands/serve_values.py); an unknown option or a missing
    argument is getopt's line followed by a hint."""

    # Long options that win an abbreviation they share with the parser's others: qemu's
    # own, in the order of qemu's getopt table, so that a prefix qemu takes as one of its
    # options (`--lo` for --load-snapshot) is not made ambiguous by qnbd's additions
    # (--log-level), and an ambiguous one lists qemu's candidates as getopt does.
    preferred_long_options: tuple[str, ...] = ()

    def _get_option_tuples(self, option_string):
        found = super()._get_option_tuples(option_string)
        if len(found) > 1:
            # The option string is the second item in every Python version's tuples.
            preferred = [t for t in found if t[1] in self.preferred_long_options]
            if len(preferred) == 1:
                return preferred
        return found

    def error(self, message: str):
        text, hint = _qemu_wording(message)
        m = _AMBIGUOUS.match(message)
        if m:
            matches = m.group(2).split(", ")
            order = {name: i for i, name in enumerate(self.preferred_long_options)}
            matches.sort(key=lambda name: order.get(name, len(order)))
            text = (f"option '{m.group(1)}' is ambiguous; possibilities: "
                    + " ".join(f"'{name}'" for name in matches))
        if hint:
            # getopt's errors are followed by an error_report() line; qemu-nbd's own
            # "Invalid number of arguments" by a bare error_printf() one (qemu-nbd.c).
            prefix = "" if hint == PLAIN_HINT else f"{self.prog}: "
            text += f"\n{prefix}Try `{self.prog} --help' for more information."
        self.exit(1, f"{self.prog}: {text}\n")


HINT, PLAIN_HINT = "hint", "plain hint"
_AMBIGUOUS = re.compile(r"ambiguous option: (\S+) could match (.+)$")


def _qemu_wording(message: str) -> tuple[str, str | None]:
    """argparse's message in getopt's (glibc) or qemu's words, and the hint after it."""
    if message.startswith("unrecognized arguments: "):
        first = message.split(": ", 1)[1].split()[0]
        if first.startswith("--"):
            return f"unrecognized option '{first}'", HINT  # getopt shows any =VALUE too
        if first.startswith("-") and len(first) > 1:
            return f"invalid option -- '{first[1]}'", HINT
        return "Invalid number of arguments", PLAIN_HINT
    if message.startswith("argument ") and ": " in message:
        names, why = message[len("argument "):].split(": ", 1)
        if why.startswith("expected one argument"):
            return f"option '{names.split('/')[-1]}' requires an argument", HINT
        if why.startswith("ignored explicit argument"):
            return f"option '{names.split('/')[-1]}' doesn't allow an argument", HINT
        if why.startswith("invalid choice"):
            return f"{names.split('/')[-1]}: {why}", None
        return why, None
    return message, HINT


def _commands_to_load(argv) -> tuple[str, ...]:
    """Only the named subcommand's module when the first argument names one: importing
    all of them (the server, TLS, every format) costs ~0.3 s, more than a whole
    `qnbd check` of a sparse 1 TiB image. Help, version and usage errors load them all."""
    first = next((a for a in (sys.argv[1:] if argv is None else argv)), None)
    return (first,) if first in COMMANDS else COMMANDS


def build_parser(argv=None) -> argparse.ArgumentParser:
    parser = QemuStyleParser(prog="qnbd", description="qcow2 NBD server and image tools")
    parser.add_argument("-V", "--version", action="version", version=version_text("qnbd"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=QemuStyleParser)
    for name in _commands_to_load(argv):
        module = importlib.import_module(f"qnbd.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(run=module.run, parser=p)
    return parser


def version_text(prog: str) -> str:
    """As qemu's tools print it: the program and version on the first line."""
    return f"{prog} {__version__}\n"


def main(argv=None) -> int:
    # Unknown options are reported by the subcommand's parser, under its own name.
    args, extras = build_parser(argv).parse_known_args(argv)
    if extras:
        args.parser.error("unrecognized arguments: " + " ".join(extras))
    try:
        return args.run(args) or 0
    except QnbdError as e:
        print(f"qnbd {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
