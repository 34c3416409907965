"""Waiting for something to happen in a lab: poll a condition, bounded in time.

Tests wait for events, not for luck: they poll what they need (a log line, a counter, a
socket's state) until it is there, and give up with a message naming what never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL_S = 0.05


def poll(found: Callable[[], T], timeout_s: float, interval_s: float = POLL_INTERVAL_S) -> T:
    """The first true value ``found()`` returns within ``timeout_s``, or its last (false) value
    at the deadline; ``found`` runs at least once, and once more at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = found()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def wait_for(
    what: str, found: Callable[[], T], timeout_s: float, interval_s: float = POLL_INTERVAL_S
) -> T:
    """The first true value of ``found()``; an AssertionError naming ``what`` if none came
    within ``timeout_s``."""
    value = poll(found, timeout_s, interval_s)
    if not value:
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
    return value
