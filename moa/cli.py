"""The ``moa`` command line.

The sub-commands live in ``moa/commands`` (one module per concern, each with a
``register(subparsers)``); this module builds the parser, sets up logging, and turns a
:class:`~moa.errors.MoaError` into a one-line message and exit code 1. Library code
logs; only command modules print.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from moa import __version__
from moa.commands import COMMAND_MODULES
from moa.errors import MoaError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moa`` command."""
    parser = argparse.ArgumentParser(
        prog="moa",
        description=(
            "moa serves many domain LoRA adapters over one shared NF4-quantized base model "
            "and mixes them per request: per-row adapter names, weighted mixtures, or a router."
        ),
        epilog="Run 'moa COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"moa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moa`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MoaError as error:
        print(f"moa {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
