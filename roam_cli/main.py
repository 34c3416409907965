"""Entry point of the ``roam`` command.

Every expected failure is a ``RoamError`` (or an ``OSError`` from the file system or the
kernel) and is printed as one line, ``roam: error: ...``, with exit status 1; usage errors exit
with status 2 as argparse does. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

import roam_cli.commands
from migrate import __version__
from migrate.errors import RoamError


def command_modules() -> list[object]:
    """Every module of ``roam_cli.commands``, in name order; each registers its subcommands."""
    import importlib
    import pkgutil

    names = sorted(info.name for info in pkgutil.iter_modules(roam_cli.commands.__path__))
    return [importlib.import_module(f"roam_cli.commands.{name}") for name in names]


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (exit 2), like every other error of ``roam``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="roam",
        description="Proactive server roaming: a private TCP service hops among replicated "
        "servers at secret times that only subscribed clients can compute.",
    )
    parser.add_argument("--version", action="version", version=f"server-roaming {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in command_modules():
        module.register(subparsers)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except RoamError as error:
        print(f"roam: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        print(f"roam: error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("roam: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
