"""``roam server --config FILE`` / ``roam client --config FILE``: options from a TOML file.

Every key is the long name of one of the command's options, without its dashes, with the value
it takes (``update-period = 2``, ``listen = "192.0.2.1:80"``; a switch such as ``quiet`` or
``no-transparent`` takes ``true``). The file's options come first and options on the command
line after them, so the command line overrides the file. A key that is not an option, a value
of the wrong kind or one its option refuses is an error naming the key, before anything starts.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Sequence
from pathlib import Path

from migrate.errors import ConfigError

COMMANDS = ("server", "client")
FLAG = "--config"


def _config_path(argv: list[str]) -> tuple[Path | None, list[str]]:
    """The ``--config`` value and ``argv`` without it."""
    rest: list[str] = []
    path: Path | None = None
    index = 0
    while index < len(argv):
        item = argv[index]
        if item == FLAG:
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a FILE")
            path = Path(argv[index + 1])
            index += 2
            continue
        if item.startswith(FLAG + "="):
            path = Path(item.removeprefix(FLAG + "="))
        else:
            rest.append(item)
        index += 1
    return path, rest


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name (no dashes) -> action, for the documented options of ``parser``."""
    found = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if option.startswith("--") and option != FLAG:
                found[option.removeprefix("--")] = action
    return found


def _value(path: Path, key: str, value: object, action: argparse.Action) -> list[str]:
    flag = f"--{key}"
    switch = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
    if switch:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: key '{key}' is a switch: give true or false")
        return [flag] if value else []
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{path}: key '{key}' takes a string or a number, not {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise ConfigError(f"{path}: key '{key}': {error}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{path}: key '{key}': {text!r} is not one of {choices}")
    return [flag, text]


def file_argv(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The options ``path`` gives, as command-line arguments for ``parser``."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    options = _options(parser)
    argv: list[str] = []
    for key, value in document.items():
        action = options.get(key)
        if action is None:
            raise ConfigError(
                f"{path}: unknown key '{key}' (keys are the long options of "
                f"'{parser.prog} --help', without the dashes)"
            )
        argv += _value(path, key, value, action)
    return argv


def expand(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with a ``server``/``client`` command's ``--config FILE`` replaced by the file's
    options, placed before the command line's own so that these override them."""
    args = list(argv)
    if (
        not args
        or args[0] not in COMMANDS
        or not any(a == FLAG or a.startswith(FLAG + "=") for a in args)
    ):
        return args
    path, rest = _config_path(args[1:])
    assert path is not None
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = subparsers.choices[args[0]]
    return [args[0], *file_argv(path, command), *rest]
