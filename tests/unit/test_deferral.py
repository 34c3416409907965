"""Connections the new server cannot prepare in its window wait, frozen, for the next roam
(``client_shim.roams.defer_unanswered``, ``client_shim.rules.switch_script``'s ``held``)."""

from __future__ import annotations

import ipaddress

from client_shim.roams import RoamRecord, defer_unanswered
from client_shim.rules import switch_script
from migrate.endpoints import Endpoint
from migrate.handover import DEFER_HELD_MAX_S, NO_PREPARE_ANSWER, ClientState, NotMoved


def roam(epoch: int, **handoffs: NotMoved) -> RoamRecord:
    record = RoamRecord(epoch, "10.0.1.2:80", 100.0)
    for handoff in handoffs.values():
        record.connections[handoff.port] = handoff
    return record


def test_only_unanswered_preparations_are_held_and_the_rest_reset_as_before() -> None:
    record = roam(
        5,
        unanswered=NotMoved(40001, "failed", NO_PREPARE_ANSWER),
        diverged=NotMoved(40002, "diverged", "the replayed service answered with different bytes"),
        refused=NotMoved(40003, "refused", "the window of epoch 5 on this server closed"),
        closed=NotMoved(40004, "closed", "ended before the hand-over", state=ClientState.CLOSED),
    )
    defer_unanswered(record, None, 100.5)
    assert record.deferred == {40001: 100.5}
    held = record.connections[40001]
    assert held.outcome == "deferred"
    assert held.state is not ClientState.RESET  # not reset after the switch
    for port in (40002, 40003):  # a server's answer that it cannot: reset, as before
        assert record.connections[port].state is ClientState.RESET
    assert record.connections[40004].outcome == "closed"


def test_a_connection_is_held_again_only_while_held_less_than_the_bound() -> None:
    first = roam(5, a=NotMoved(40001, "failed", NO_PREPARE_ANSWER))
    defer_unanswered(first, None, 100.0)
    again = roam(6, a=NotMoved(40001, "failed", NO_PREPARE_ANSWER))
    defer_unanswered(again, first, 100.0 + DEFER_HELD_MAX_S / 2)
    assert again.deferred == {40001: 100.0}  # held since the first roam
    last = roam(7, a=NotMoved(40001, "failed", NO_PREPARE_ANSWER))
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
