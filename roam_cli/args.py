"""Argument types shared by the subcommands: each turns text into a value or a clear error."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import TypeVar

from migrate.endpoints import parse_server_list
from migrate.errors import RoamError

N = TypeVar("N", int, float)
_NON_NEGATIVE = "must be a finite, non-negative number"
_POSITIVE = "must be a finite number greater than 0"


def _number(text: str, kind: type[N], what: str) -> N:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def bounded_float(text: str, what: str, fits: Callable[[float], bool], rule: str) -> float:
    """A finite float that ``fits``; else the error ``'<text>' <rule>``."""
    value = _number(text, float, what)
    if not math.isfinite(value) or not fits(value):
        raise argparse.ArgumentTypeError(f"{text!r} {rule}")
    return value


def _int_at_least(text: str, low: int, rule: str) -> int:
    value = _number(text, int, "an integer")
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} {rule}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "must be at least 1")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "must not be negative")


def seconds(text: str) -> float:
    return bounded_float(text, "a number of seconds", lambda v: v >= 0, _NON_NEGATIVE)


def positive_float(text: str) -> float:
    return bounded_float(text, "a number", lambda v: v > 0, _POSITIVE)


def non_negative_float(text: str) -> float:
    return bounded_float(text, "a number", lambda v: v >= 0, _NON_NEGATIVE)


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def unix_time(text: str) -> float:
    """A Unix time in seconds, or ``now``."""
    if text == "now":
        return time.time()
    return bounded_float(text, "a Unix time (or 'now')", lambda _: True, "is not a finite time")


def server_list(text: str) -> str:
    """Validated early so a bad list fails before anything else happens; kept as text."""
    try:
        parse_server_list(text)
    except RoamError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
