"""``labs.waiting``: the bounded polling every system test waits with."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from labs.waiting import poll, wait_for


def answers(*values: object) -> tuple[Callable[[], object], list[int]]:
    """A condition that returns ``values`` one after the other (the last one for ever), and
    the count of its calls."""
    calls = [0]

    def found() -> object:
        calls[0] += 1
        return values[min(calls[0], len(values)) - 1]

    return found, calls


def test_the_first_true_value_is_returned_and_polling_stops() -> None:
    found, calls = answers(None, [], ["event"], ["later"])
    assert wait_for("an event", found, 10.0, interval_s=0) == ["event"]
    assert calls[0] == 3


def test_a_condition_never_met_names_what_was_awaited() -> None:
    found, calls = answers(False)
    with pytest.raises(AssertionError, match="waiting for the download's first bytes"):
        wait_for("the download's first bytes", found, 0.0)
    assert calls[0] == 1  # checked once even with no time at all


def test_poll_returns_the_last_false_value_at_the_deadline() -> None:
    found, calls = answers(0, [], None)
    assert poll(found, 0.0) == 0
    assert calls[0] == 1
