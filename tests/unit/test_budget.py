"""The work bound of tests/unit/budget.py: it catches a step whose cost grows with a gap, and
counts the same work the same way every time (no machine's speed or load changes it)."""

from __future__ import annotations

import hashlib

import pytest

from tests.unit.budget import STEP_EVENTS, bounded_step, measured

DAY_OF_EPOCHS = 43_200  # 2 s epochs


def walk(epochs: int) -> bytes:
    key = bytes(32)
    for _ in range(epochs):
        key = hashlib.sha256(b"\x00" + key).digest()
    return key


def test_a_step_that_walks_a_days_gap_fails_the_bound() -> None:
    with (
        pytest.raises(AssertionError, match="a day's walk: executed"),
        bounded_step("a day's walk"),
    ):
        walk(DAY_OF_EPOCHS)


def test_a_constant_step_passes_and_its_count_does_not_vary() -> None:
    counts = set()
    for _ in range(5):
        with bounded_step("twenty epochs") as work:
            walk(20)
        counts.add(work.events)
    assert len(counts) == 1
    assert 0 < counts.pop() < STEP_EVENTS


def test_a_tracer_already_set_is_restored() -> None:
    import sys

    seen: list[str] = []

    def outer(_frame, event, _arg):  # type: ignore[no-untyped-def]
        seen.append(event)

    sys.settrace(outer)
    try:
        with measured():
            walk(1)
        assert sys.gettrace() is outer
    finally:
        sys.settrace(None)
