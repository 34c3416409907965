"""Entry point of the ``roam`` command.

Every expected failure is a ``RoamError`` (or an ``OSError`` from the file system or the
kernel) and is printed as one line, ``roam: error: ...``, with exit status 1; so are usage
errors (a missing or unknown argument), as the operator's guide promises. A traceback means a
bug.

A standard output closed by its reader (``roam trigger ... | head -1``) does not cut a command
short: what it does and records is done, the rest of its output is discarded, and its exit
status is what it would have been.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import roam_cli.commands
from migrate import __version__
from migrate.errors import RoamError
from roam_cli.config import expand as expand_config


def command_modules() -> list[object]:
    """Every module of ``roam_cli.commands``, in name order; each registers its subcommands."""
    import importlib
    import pkgutil

    names = sorted(info.name for info in pkgutil.iter_modules(roam_cli.commands.__path__))
    return [importlib.import_module(f"roam_cli.commands.{name}") for name in names]


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr with exit status 1, like every other error of
    ``roam`` (argparse's own status 2 would make scripts tell two kinds of error apart that
    the guide promises are one)."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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


class ReaderMayLeave:
    """Standard output whose reader may close it early: writes after that are discarded
    instead of raising ``BrokenPipeError`` in the middle of a command's work."""

    def __init__(self, stream: object) -> None:
        self._stream = stream
        self.reader_left = False

    def write(self, text: str) -> int:
        if not self.reader_left:
            try:
                return int(self._stream.write(text))  # type: ignore[attr-defined]
            except BrokenPipeError:
                self._discard()
        return len(text)

    def flush(self) -> None:
        if not self.reader_left:
            try:
                self._stream.flush()  # type: ignore[attr-defined]
            except BrokenPipeError:
                self._discard()

    def _discard(self) -> None:
        # What is still buffered goes to /dev/null, so that the interpreter's last flush at
        # exit does not fail either.
        self.reader_left = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())  # type: ignore[attr-defined]
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        # ``roam server|client --config FILE``: the file's options, then the command line's.
        raw = expand_config(parser, raw)
    except RoamError as error:
        print(f"roam: error: {error}", file=sys.stderr)
        return 1
    args = parser.parse_args(raw)
    real_stdout = sys.stdout
    stdout = ReaderMayLeave(real_stdout)
    sys.stdout = stdout
    try:
        return _run(args)
    finally:
        stdout.flush()
        sys.stdout = real_stdout


def _run(args: argparse.Namespace) -> int:
    try:
        status: int = args.handler(args)
    except RoamError as error:
        print(f"roam: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        print(f"roam: error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        from roam_cli.extras import missing_extra

        message = missing_extra(error)
        if message is None:
            raise  # not an optional extra: a bug
        print(f"roam: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("roam: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
