"""The wait for GO (migrate.gowait, ``ServerHandover.client_still_committing``): a restored
connection waits for its client's GO from the client's newest COMMIT answer of the roam, not
from its own restore, and never longer than ``GO_WAIT_MAX_S``. Time is simulated."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrate import handover as h
from migrate.gowait import CommitAnswers
from migrate.reincarnation import Phase, Request

from .test_handover import CHECKPOINT, REPLAY


def restored(at: float, client_id: int = 1, epoch: int = 7, port: int = 40000) -> h.ServerHandover:
    prepare = Request(Phase.PREPARE, epoch, port, 80, len(REPLAY), 1000, 0, CHECKPOINT, REPLAY)
    commit = Request(Phase.COMMIT, epoch, port, 80, len(REPLAY), 1500, len(REPLAY), CHECKPOINT, b"")
    server = h.ServerHandover(prepare, at - 2.0, client_id=client_id)
    server.work_done(1000, at - 1.0)
    server.receive(commit, at - 0.1)
    server.work_done(1500, at)
    server.actions()
    assert server.state is h.ServerState.RESTORED
    return server


def due(answers: CommitAnswers, server: h.ServerHandover, now: float) -> bool:
    """What the server's round does: a due timer fires unless its client is still answered."""
    timer = server.get_timer()
    if timer is None or now < timer or answers.postpone(server, now):
        return False
    server.handle_timer(now)
    return True


def test_a_thousand_commits_answered_over_a_second_wait_for_the_last_answer() -> None:
    """The roam that logged 1000 go_timeouts: restores 1 ms apart, the switch after the last."""
    answers = CommitAnswers()
    servers = [restored(100.0 + i * 0.001, port=1024 + i) for i in range(1000)]
    for server in servers:
        answers.saw(server)
    last = 100.0 + 0.999
    now = 100.0
    while now < last + h.GO_TIMEOUT_S - 0.01:  # rounds every 20 ms
        assert not any(due(answers, server, now) for server in servers)
        now += 0.02
    # The GO came in time for every connection: none timed out.
    go = Request(Phase.GO, 7, 1024, 80, 0, 0, 0, b"", b"")
    servers[0].receive(go, now)
    assert servers[0].state is h.ServerState.LIVE
    # Lost GOs: the others start at the last answer's timeout, all in the same round.
    now = last + h.GO_TIMEOUT_S
    assert all(due(answers, server, now) for server in servers[1:])
    assert all(server.state is h.ServerState.LIVE for server in servers)


def test_another_clients_or_another_roams_answers_do_not_hold_a_connection() -> None:
    answers = CommitAnswers()
    mine = restored(10.0, client_id=1, epoch=7)
    answers.saw(mine)
    answers.saw(restored(10.8, client_id=2, epoch=7))
    answers.saw(restored(10.8, client_id=1, epoch=8, port=40001))
    assert due(answers, mine, 10.0 + h.GO_TIMEOUT_S)
    assert mine.state is h.ServerState.LIVE


def test_answers_that_never_stop_hold_a_connection_at_most_go_wait_max() -> None:
    """A client that keeps committing (or lies about it) delays only its own connections,
    and only up to ``GO_WAIT_MAX_S`` after each restore."""
    answers = CommitAnswers()
    first = restored(0.0)
    answers.saw(first)
    now = 0.0
    fired_at = None
    while fired_at is None and now < 60.0:  # bounded, should the cap be lost
        now += 0.02
        later = restored(now, port=50000)  # another of the client's COMMITs answered
        answers.saw(later)
        if due(answers, first, now):
            fired_at = now
    assert fired_at is not None
    assert fired_at == pytest.approx(h.GO_WAIT_MAX_S, abs=0.021)


@given(st.floats(min_value=-1e7, max_value=1e7, allow_nan=False))
def test_a_clock_step_forgets_the_answers_and_bounds_the_wait(step: float) -> None:
    answers = CommitAnswers()
    server = restored(1000.0)
    answers.saw(server)
    answers.saw(restored(1000.5, port=40001))
    now = 1000.5 + step
    answers.postpone(server, now)
    if not 0 <= now - 1000.5 <= h.GO_WAIT_MAX_S:
        assert answers.last == {}  # pruned at once: the step is taken as quiet
    timer = server.get_timer()
    assert timer is not None
    assert timer <= 1000.0 + h.GO_WAIT_MAX_S


def test_a_machine_not_restored_is_not_held() -> None:
    answers = CommitAnswers()
    server = h.ServerHandover(
        Request(Phase.PREPARE, 7, 40000, 80, len(REPLAY), 1000, 0, CHECKPOINT, REPLAY),
        0.0,
        client_id=1,
    )
    answers.saw(server)  # preparing: nothing noted
    assert answers.last == {}
    assert not answers.postpone(server, h.PENDING_TTL_S)


def test_commits_refused_after_a_restore_still_hold_it() -> None:
    """A COMMIT answered LATE (or refused) is still an answer the client waits for before it
    switches: the connections restored before it wait for their GO from then."""
    answers = CommitAnswers()
    first = restored(0.0)
    answers.saw(first)
    answers.note(1, 7, 2.0)  # the roam's last COMMIT came (and was answered LATE) at 2.0
    assert not due(answers, first, 2.5)
    assert due(answers, first, 3.0)


def test_an_insider_naming_many_epochs_costs_one_entry() -> None:
    """Bounded per sender: an authentic client's COMMITs for 10,000 epochs hold one entry."""
    answers = CommitAnswers()
    for epoch in range(10_000):
        answers.note(3, epoch, 100.0)
    answers.note(4, 7, 100.0)
    assert len(answers.last) == 2
    assert answers.last[3] == (9_999, 100.0)
