"""The client's bounded wait for the first checkpoints of connections opened just before a roam
(``client_shim.candidates.await_carriers``): it must never outlast the hand-over's time."""

from __future__ import annotations

import asyncio
from typing import Any

from client_shim.candidates import await_carriers
from migrate.connstore import ConnectionStore, TrackedConnection
from migrate.handover import CARRIER_GRACE_S, NEWCOMER_MARGIN_S
from migrate.kernel.sockdiag import TcpSocketInfo


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def event(self, name: str, /, level: str = "info", **fields: Any) -> None:
        self.events.append((name, fields))


def young_connection(port: int) -> tuple[ConnectionStore, dict[int, TcpSocketInfo]]:
    """A connection that has received an answer but holds no checkpoint yet."""
    store = ConnectionStore()
    store.connections[port] = TrackedConnection(client_port=port, client_isn=1, opened_at=0.0)
    info = TcpSocketInfo(
        src=("10.0.1.4", port),
        dst=("10.0.0.1", 80),
        state="ESTABLISHED",
        inode=1,
        uid=0,
        cookie=1,
        family=2,
        rqueue=0,
        wqueue=0,
        has_info=True,
        bytes_received=352,
    )
    return store, {port: info}


class SteppingClock:
    """Simulated time: every reading is 10 ms after the previous one (one poll of the wait)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def wait(until_in: float | None) -> tuple[float, list[tuple[str, dict[str, Any]]]]:
    """Simulated seconds the wait took, and what it logged."""
    store, sockets = young_connection(40000)
    log = Recorder()
    clock = SteppingClock()
    started = clock.now
    until = None if until_in is None else started + until_in
    asyncio.run(await_carriers(store, sockets, lambda port, conn: True, clock, log, until))  # type: ignore[arg-type]
    return clock.now - started, log.events


def test_without_a_limit_the_wait_is_the_grace_and_the_late_ports_are_named() -> None:
    waited, events = wait(None)
    assert CARRIER_GRACE_S <= waited <= CARRIER_GRACE_S + 0.05
    assert events[0][1]["waited_s"] == CARRIER_GRACE_S
    assert [name for name, _ in events] == ["carriers_late"]
    assert events[0][1]["ports"] == [40000]


def test_a_hand_over_near_its_end_does_not_wait_for_first_checkpoints() -> None:
    # The new server's window closes in less than the margin: waiting would only lengthen
    # the freeze of every connection, for one that cannot move in time anyway.
    waited, events = wait(NEWCOMER_MARGIN_S / 2)
    assert waited <= 0.05
    assert events[0][0] == "carriers_late"
    assert events[0][1]["waited_s"] == 0.0


def test_the_wait_ends_the_margin_before_the_hand_over_must_be_done() -> None:
    waited, events = wait(NEWCOMER_MARGIN_S + 0.05)
    assert 0.03 <= waited <= 0.05 + 1e-9  # polled until the margin, not a poll longer
    assert events[0][0] == "carriers_late"


def test_a_checkpoint_stored_during_the_wait_ends_it_at_once(monkeypatch: Any) -> None:
    """With ``arrived`` (the capture's event), the wait looks again as soon as something was
    stored, not at its next poll: with polls an hour apart, it still ends within the test."""
    monkeypatch.setattr("client_shim.candidates.CARRIER_POLL_S", 3600.0)
    store, sockets = young_connection(40000)
    log = Recorder()

    async def run() -> None:
        arrived = asyncio.Event()
        loop = asyncio.get_running_loop()
        waiting = loop.create_task(
            await_carriers(
                store, sockets, lambda port, conn: True, loop.time, log, loop.time() + 7200, arrived
            )  # type: ignore[arg-type]
        )
        await asyncio.sleep(0)  # the wait has looked once and sleeps
        assert not waiting.done()
        # What a stored checkpoint does to the look (here: the connection stops being one to
        # wait for), and the capture's signal.
        store.connections[40000].unmigratable = "closed meanwhile"
        arrived.set()
        await asyncio.wait_for(waiting, 30)

    asyncio.run(run())
    assert log.events == []  # ended because nothing is waited for, not late
