"""Connections the new server cannot prepare in its window wait, frozen, for the next roam
(``client_shim.roams.defer_unanswered``, ``client_shim.rules.switch_script``'s ``held``)."""

from __future__ import annotations

import ipaddress

from client_shim.roams import RoamRecord, defer_unanswered
from client_shim.rules import switch_script
from migrate.connstore import ConnectionStore
from migrate.endpoints import Endpoint
from migrate.handover import (
    DEFER_HELD_MAX_S,
    NEVER_COMMITTED,
    NO_COMMIT_ANSWER,
    NO_PREPARE_ANSWER,
    ClientHandover,
    ClientState,
    NotMoved,
)
from migrate.reincarnation import Answer, Phase, Request, Status

CHECKPOINT = b"\x01" * 191


def machine(port: int) -> ClientHandover:
    prepare = Request(Phase.PREPARE, 7, port, 80, 10, 1000, 0, CHECKPOINT, b"x" * 10)
    return ClientHandover(prepare, 500, deadline=5.0, now=0.0)


def unanswered(port: int) -> ClientHandover:
    """No answer to its PREPARE by the freeze."""
    handoff = machine(port)
    handoff.freeze(None, "", 1.0)
    return handoff


def answered_at_commit(port: int, status: Status, detail: str) -> ClientHandover:
    handoff = machine(port)
    handoff.receive(Answer(Phase.PREPARE, port, Status.READY), 0.5)
    commit = Request(Phase.COMMIT, 7, port, 80, 10, 1200, 10, CHECKPOINT, b"")
    handoff.freeze(commit, "", 1.0)
    handoff.actions()
    handoff.receive(Answer(Phase.COMMIT, port, status, detail), 1.2)
    return handoff


def roam(epoch: int, *handoffs: ClientHandover | NotMoved) -> RoamRecord:
    record = RoamRecord(epoch, "10.0.1.2:80", 100.0)
    for handoff in handoffs:
        record.connections[handoff.port] = handoff
    return record


def test_only_connections_the_new_server_could_not_prepare_in_time_are_held() -> None:
    """Held: no answer to the PREPARE by the freeze, and a COMMIT the server took too late
    (LATE: refused before any work). Reset: what a server answered it cannot do, and a reset
    whose reason merely reads like an unanswered PREPARE."""
    record = roam(
        5,
        unanswered(40001),
        answered_at_commit(40002, Status.DIVERGED, "the replayed service answered otherwise"),
        answered_at_commit(40003, Status.REFUSED, "the COMMIT's checkpoint is of another"),
        NotMoved(40004, "closed", "ended before the hand-over", state=ClientState.CLOSED),
        answered_at_commit(40005, Status.LATE, "the window of epoch 5 on this server closed"),
        NotMoved(40006, "failed", NO_PREPARE_ANSWER),  # the text alone does not hold one
    )
    defer_unanswered(record, None, 100.5)
    assert record.deferred == {40001: 100.5, 40005: 100.5}
    held = record.connections[40001]
    assert held.outcome == "deferred"
    assert held.state is not ClientState.RESET  # not reset after the switch
    assert held.reason.startswith(NO_PREPARE_ANSWER)
    late = record.connections[40005]
    assert late.outcome == "deferred"
    assert late.state is not ClientState.RESET
    assert late.reason == "the window of epoch 5 on this server closed; held for the next roam"
    for port in (40002, 40003, 40006):  # a server's answer that it cannot: reset, as before
        assert record.connections[port].state is ClientState.RESET
    assert record.connections[40004].outcome == "closed"


def test_a_prepare_unanswered_by_its_deadline_or_the_switch_is_held_too() -> None:
    by_deadline = machine(40001)
    by_deadline.handle_timer(5.0)  # the PREPARE's deadline (the new server's window)
    by_switch = machine(40002)
    by_switch.switched(1.0)  # still unanswered when the rewrite moved on
    committing = answered_at_commit(40003, Status.READY, "")
    committing.switched(1.5)  # READY came: migrated, nothing to hold
    unanswered_commit = machine(40004)
    unanswered_commit.receive(Answer(Phase.PREPARE, 40004, Status.READY), 0.5)
    unanswered_commit.freeze(
        Request(Phase.COMMIT, 7, 40004, 80, 10, 1200, 10, CHECKPOINT, b""), "", 1.0
    )
    # Unanswered: a restore may have happened there (its READY lost), but nothing started (no
    # GO): the ABORT frees it and the checkpoint still holds. Held too.
    unanswered_commit.handle_timer(1.0 + 5.0)
    assert unanswered_commit.reason == NO_COMMIT_ANSWER
    sent = [a.request.phase for a in unanswered_commit.actions() if hasattr(a, "request")]
    assert sent[-1] is Phase.ABORT
    prepared = machine(40005)
    prepared.receive(Answer(Phase.PREPARE, 40005, Status.READY), 0.5)
    prepared.actions()
    prepared.switched(1.0)  # answered, never frozen: nothing restored, its preparation freed
    assert prepared.reason == NEVER_COMMITTED
    assert [a.request.phase for a in prepared.actions() if hasattr(a, "request")] == [Phase.ABORT]
    record = roam(5, by_deadline, by_switch, committing, unanswered_commit, prepared)
    defer_unanswered(record, None, 100.0)
    assert record.deferred == {40001: 100.0, 40002: 100.0, 40004: 100.0, 40005: 100.0}
    assert record.connections[40003].outcome == "migrated"


def test_a_connection_frozen_too_late_for_the_window_is_held_not_reset() -> None:
    """The client's host stalled through the new server's window (its COMMIT would be LATE):
    held for the next roam like an unanswered PREPARE, its reason saying why."""
    late = machine(40001)
    late.receive(Answer(Phase.PREPARE, 40001, Status.READY), 0.5)
    late.missed_window(1.2)
    record = roam(5, late)
    defer_unanswered(record, None, 100.0)
    assert record.deferred == {40001: 100.0}
    held = record.connections[40001]
    assert held.outcome == "deferred"
    assert held.reason == (
        "frozen 1.20 s after the hand-over's give-up time (a stalled host); held for the next roam"
    )


def test_a_connection_is_held_again_only_while_held_less_than_the_bound() -> None:
    first = roam(5, unanswered(40001))
    defer_unanswered(first, None, 100.0)
    again = roam(6, unanswered(40001))
    defer_unanswered(again, first, 100.0 + DEFER_HELD_MAX_S / 2)
    assert again.deferred == {40001: 100.0}  # held since the first roam
    last = roam(7, unanswered(40001))
    defer_unanswered(last, again, 100.0 + DEFER_HELD_MAX_S)
    assert last.deferred == {}
    assert last.connections[40001].state is ClientState.RESET


def test_the_switch_keeps_held_connections_frozen_and_thaws_the_others() -> None:
    vip = ipaddress.ip_address("10.0.0.1")
    target = Endpoint(ipaddress.ip_address("10.0.1.2"), 80)
    script = switch_script("roam_cli_1", vip, 80, target, finished=[40003], held=[40001, 40005])
    lines = script.splitlines()
    flush = lines.index("flush set ip roam_cli_1 frozen")
    assert lines.index("add element ip roam_cli_1 frozen { 40001, 40005 }") > flush
    assert "add element ip roam_cli_1 finished { 40003 }" in lines
    assert "frozen {" not in switch_script("roam_cli_1", vip, 80, target, finished=[40003])


def test_a_connection_only_waiting_for_its_first_checkpoint_is_held_and_no_other() -> None:
    """A newcomer without a checkpoint (its server, busy, had not got to it: it pushes one as
    it gets to it or leaves) is held for the next roam like an unanswered PREPARE; one the
    capture gave up on (unmigratable for good) is reset. Held at most DEFER_HELD_MAX_S."""
    young = "no checkpoint yet (opened 0.01 s before the roam began)"
    record = roam(
        5,
        NotMoved(40001, "unmigratable", young, movable_later=True),
        NotMoved(40002, "unmigratable", "the client half-closed the connection (FIN)"),
    )
    defer_unanswered(record, None, 100.5)
    assert record.deferred == {40001: 100.5}
    held = record.connections[40001]
    assert held.outcome == "deferred"
    assert held.state is not ClientState.RESET
    assert held.reason == f"{young}; held for the next roam"
    assert record.connections[40002].state is ClientState.RESET
    # Still without one when the holding time is up: reset.
    later = roam(6, NotMoved(40001, "unmigratable", young, movable_later=True))
    defer_unanswered(later, record, 100.5 + DEFER_HELD_MAX_S)
    assert later.deferred == {}
    assert later.connections[40001].state is ClientState.RESET


def test_a_switch_after_the_new_servers_window_holds_everything_for_the_next_roam() -> None:
    """A hand-over longer than the epoch: by the switch, the new server's gate is closed or
    closing, and connections sent on to it would meet no socket there (a RST once its gate
    opens again for a later epoch). The committed ones are held (their ABORT frees the
    restored sockets), and so are those opened since the hold, which talk to that server;
    nothing else changes, and nothing at all before the window closes."""
    store = ConnectionStore()
    for port in (40001, 40002, 40003, 40004, 40005):
        store.on_syn(port, 1000 + port, 99.0)
    store.connections[40005].fin = True  # opened since the hold but closed already

    def record_with_commit() -> RoamRecord:
        record = roam(
            5,
            answered_at_commit(40001, Status.READY, ""),
            NotMoved(40002, "closed", "ended before the hand-over", state=ClientState.CLOSED),
        )
        record.with_old = {40001, 40002, 40003}
        record.mark("frozen", 100.0)
        return record

    unfrozen = roam(5, answered_at_commit(40001, Status.READY, ""))  # failed before the freeze
    assert unfrozen.hold_after_window(store.connections, 100.8, 101.0) == []
    assert unfrozen.deferred == {}
    early = record_with_commit()
    assert early.hold_after_window(store.connections, 101.0, 100.9) == []
    assert early.hold_after_window(store.connections, None, 100.9) == []
    assert early.connections[40001].state is ClientState.COMMITTED
    assert early.deferred == {}

    record = record_with_commit()
    [committed] = record.hold_after_window(store.connections, 100.8, 101.0)
    assert committed.port == 40001
    assert committed.state is ClientState.RESET
    assert committed.reason == "the new server's window closed 0.20 s before the switch"
    assert [a.request.phase for a in committed.actions() if hasattr(a, "request")] == [Phase.ABORT]
    # Opened since the hold: held from now; the old server's and the closed one untouched.
    assert record.deferred == {40004: 101.0}
    assert record.connections[40004].outcome == "deferred"
    assert 40003 not in record.connections
    assert 40005 not in record.connections
    defer_unanswered(record, None, 101.0)
    assert record.deferred == {40001: 101.0, 40004: 101.0}
    assert record.connections[40001].outcome == "deferred"
    assert record.connections[40002].outcome == "closed"


def test_a_commit_answer_is_not_awaited_past_the_new_servers_window() -> None:
    """Frozen 0.2 s before the window closes: its COMMIT is retried until then, not for the
    whole COMMIT timeout (a READY after the window is of no use: the switch would hold the
    connection anyway), and then it is held for the next roam."""
    handoff = machine(40001)
    handoff.receive(Answer(Phase.PREPARE, 40001, Status.READY), 0.5)
    commit = Request(Phase.COMMIT, 7, 40001, 80, 10, 1200, 10, CHECKPOINT, b"")
    handoff.freeze(commit, "", 1.0, until=1.2)
    timer = handoff.get_timer()
    assert timer is not None
    assert timer <= 1.2
    handoff.handle_timer(1.2)
    assert handoff.state is ClientState.RESET
    assert handoff.reason == NO_COMMIT_ANSWER
    record = roam(5, handoff)
    defer_unanswered(record, None, 1.2)
    assert record.deferred == {40001: 1.2}
    # Without a window (tests, direct calls) the COMMIT timeout alone bounds the wait.
    patient = machine(40002)
    patient.receive(Answer(Phase.PREPARE, 40002, Status.READY), 0.5)
    patient.freeze(Request(Phase.COMMIT, 7, 40002, 80, 10, 1200, 10, CHECKPOINT, b""), "", 1.0)
    patient.handle_timer(1.2)
    assert patient.state is ClientState.COMMITTING
