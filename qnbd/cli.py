"""The `qnbd` command line: parses options and calls into the library, nothing more."""

import argparse
import importlib
import sys

from .errors import QnbdError

# Subcommand name -> module under qnbd.commands.
COMMANDS = ("serve", "create", "info", "bitmap", "check", "map", "convert", "snapshot", "resize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qnbd", description="qcow2 NBD server and image tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"qnbd.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except QnbdError as e:
        print(f"qnbd {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
