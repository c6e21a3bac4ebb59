"""The ``dirtylog`` command: one module per family of sub-commands (``migrate.py`` holds keygen, receive and
migrate), each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from dirtylog.errors import DirtylogError

# Sub-command modules, in the order ``dirtylog --help`` lists their commands. Each defines
# ``register(subparsers: argparse._SubParsersAction) -> None`` and sets ``func`` on its parser.
_COMMANDS = ("info", "run", "track", "rate", "model", "migrate", "snapshot", "demo", "arm64", "ctl")


class _Parser(argparse.ArgumentParser):
    """argparse takes ``--duration -5s`` or ``--memory -1G`` for an option named ``-5s`` and says only "expected one
    argument"; no option of ours starts with a digit, so a value that does is a value, and its own parser says
    what is wrong with it ("is negative")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="dirtylog", description="Dirty page logging for virtual machines, on real KVM and as a model."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"dirtylog.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"dirtylog.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dirtylog`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status: int = args.func(args)
    except DirtylogError as error:
        print(f"dirtylog: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dirtylog: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
