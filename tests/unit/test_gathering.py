"""Answers to a packed cell gathered into one answer cell (migrate.gathering), pure.

What a client relies on: every request of a cell that has an answer gets it, in one answer
cell that is sent once, no larger than the cell; a refused request holds nobody; a slow one
holds its neighbours ``GATHER_MAX_S`` at most; memory stays bounded whatever the clock does.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.cover import ANSWER_CELL_BYTES, ENVELOPE_BYTES, frame_many, unframe_all
from migrate.gathering import (
    GATHER_GIVE_UP_S,
    GATHER_MAX_S,
    MAX_GATHERINGS,
    Gatherer,
    fit_answers,
)
from migrate.reincarnation import MAX_DETAIL_BYTES, Answer, Phase, Status

TO = ("10.0.0.9", 47474)


def ready(port: int, phase: Phase = Phase.PREPARE) -> Answer:
    return Answer(phase, port, Status.READY)


def test_answers_now_and_later_leave_together_once_the_last_is_in() -> None:
    gatherer: Gatherer[tuple[str, int]] = Gatherer()
    cell = gatherer.begin(1, Phase.PREPARE, [1, 2, 3], TO, 1024, 0.0)
    gatherer.enter(cell, 1)
    assert gatherer.absorb(1, ready(1)) is cell  # answered at once (a repeat)
    gatherer.leave()
    gatherer.enter(cell, 2)
    gatherer.refused(cell, 2)  # refused without an answer: nobody waits for it
    gatherer.leave()
    gatherer.enter(cell, 3)
    gatherer.leave()  # its work started: the answer comes later
    assert not cell.complete
    assert not cell.answerable
    assert gatherer.absorb(1, ready(3, Phase.COMMIT)) is None  # another phase: not this cell's
    assert gatherer.absorb(2, ready(3)) is None  # another client's: not this cell's
    assert gatherer.absorb(1, ready(3)) is cell
    assert cell.complete
    assert cell.answers == [ready(1), ready(3)]
    assert gatherer.done(cell)
    assert not gatherer.done(cell)
    assert len(gatherer) == 0
    assert gatherer.absorb(1, ready(3)) is None  # a late copy goes alone, as before packing


def test_nothing_new_makes_a_cover_answer_and_a_cell_wholly_refused_gets_none() -> None:
    gatherer: Gatherer[str] = Gatherer()
    quiet = gatherer.begin(1, Phase.PREPARE, [1, 2], "c", 1024, 0.0)
    for port in (1, 2):
        gatherer.enter(quiet, port)
        assert gatherer.absorb(1, None) is quiet  # a repeat still worked on
        gatherer.leave()
    assert quiet.complete
    assert quiet.said_nothing
    assert quiet.answers == []
    refused = gatherer.begin(1, Phase.COMMIT, [1, 2], "c", 1024, 0.0)
    for port in (1, 2):
        gatherer.enter(refused, port)
        gatherer.refused(refused, port)
        gatherer.leave()
    assert refused.complete
    assert not refused.said_nothing
    assert refused.answers == []
    assert gatherer.absorb(1, None) is None  # outside a cell: cover, sent as before


def test_a_later_cell_asking_again_takes_the_answer_from_the_earlier_one() -> None:
    gatherer: Gatherer[str] = Gatherer()
    first = gatherer.begin(1, Phase.PREPARE, [5, 6], "c", 1024, 0.0)
    for port in (5, 6):
        gatherer.enter(first, port)
        gatherer.leave()
    again = gatherer.begin(1, Phase.PREPARE, [6], "c", 1024, 0.5)
    gatherer.enter(again, 6)
    gatherer.leave()  # still worked on: its answer is the newer cell's
    assert gatherer.absorb(1, ready(5)) is first
    assert first.complete
    assert first.answers == [ready(5)]
    assert gatherer.absorb(1, ready(6)) is again
    assert again.complete


def test_a_slow_request_holds_its_neighbours_gather_max_at_most() -> None:
    gatherer: Gatherer[str] = Gatherer()
    cell = gatherer.begin(1, Phase.PREPARE, [1, 2], "c", 1024, 100.0)
    for port in (1, 2):
        gatherer.enter(cell, port)
        gatherer.leave()
    gatherer.absorb(1, ready(1))
    assert gatherer.due(100.0 + GATHER_MAX_S / 2) == []
    assert gatherer.due(100.0 + GATHER_MAX_S * 1.01) == [cell]  # answered with what it has
    gatherer.done(cell)
    assert gatherer.absorb(1, ready(2)) is None  # the slow one's answer goes alone


def test_a_cell_with_nothing_yet_goes_with_its_next_answer_and_is_forgotten_at_last() -> None:
    gatherer: Gatherer[str] = Gatherer()
    cell = gatherer.begin(1, Phase.COMMIT, [1, 2, 3], "c", 1024, 0.0)
    for port in (1, 2, 3):
        gatherer.enter(cell, port)
        gatherer.leave()
    assert gatherer.due(GATHER_MAX_S * 2) == []
    assert cell.overdue
    assert gatherer.absorb(1, ready(2, Phase.COMMIT)) is cell
    assert cell.answerable
    silent = gatherer.begin(1, Phase.COMMIT, [9], "c", 1024, 0.0)
    gatherer.enter(silent, 9)
    gatherer.leave()
    assert silent in gatherer.due(GATHER_GIVE_UP_S)  # its work ended without a word


def test_memory_is_bounded_and_a_clock_step_back_holds_no_cell_longer() -> None:
    gatherer: Gatherer[str] = Gatherer()
    cells = [gatherer.begin(1, Phase.PREPARE, [p], "c", 1024, 0.0) for p in range(MAX_GATHERINGS)]
    for cell in cells:
        gatherer.enter(cell, cell.waiting.copy().pop())
        gatherer.leave()
    more = gatherer.begin(1, Phase.PREPARE, [70000], "c", 1024, 0.0)
    assert gatherer.due(0.0) == [cells[0]]  # the oldest gives way
    for cell in gatherer.due(0.0):
        gatherer.done(cell)
    # A cell made "in the future" (the clock stepped back an hour) waits from now on.
    future = gatherer.begin(1, Phase.PREPARE, [70001], "c", 1024, 3600.0)
    gatherer.enter(future, 70001)
    gatherer.leave()
    assert future not in gatherer.due(0.0)
    assert future in gatherer.due(GATHER_GIVE_UP_S)
    assert more in gatherer.due(GATHER_GIVE_UP_S)


def test_weeks_of_cells_leave_nothing_behind() -> None:
    gatherer: Gatherer[str] = Gatherer()
    now = 0.0
    for index in range(20_000):  # a cell every 30 s for a week, every third one silent
        now += 30.0
        cell = gatherer.begin(1, Phase.PREPARE, [index % 60000 + 1], "c", 1024, now)
        gatherer.enter(cell, index % 60000 + 1)
        gatherer.leave()
        if index % 3:
            gatherer.absorb(1, ready(index % 60000 + 1))
        for due in gatherer.due(now):
            gatherer.done(due)
        assert len(gatherer) <= 2
    assert len(gatherer._members) <= 2


@settings(max_examples=200)
@given(
    details=st.lists(st.text(max_size=MAX_DETAIL_BYTES), min_size=1, max_size=64),
    budget=st.integers(512, 8192),
)
def test_fitted_answers_fit_the_cell_and_keep_every_status(details: list[str], budget: int) -> None:
    answers = [
        Answer(Phase.COMMIT, 1000 + i, Status(i % 5), detail) for i, detail in enumerate(details)
    ]
    bodies = fit_answers(answers, budget)
    plaintext = frame_many(bodies, ANSWER_CELL_BYTES)
    wire = len(plaintext) + ENVELOPE_BYTES  # what it seals to
    assert wire % ANSWER_CELL_BYTES == 0
    assert wire <= budget
    got = [Answer.decode(body) for body in unframe_all(plaintext)]
    assert [(a.phase, a.client_port, a.status) for a in got] == [
        (a.phase, a.client_port, a.status) for a in answers
    ]
    for fitted, original in zip(got, answers, strict=True):
        assert original.detail.startswith(fitted.detail)
