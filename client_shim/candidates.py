"""Which of the client's connections a roam can move, and waiting (bounded) for the first
checkpoint of connections opened just now."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from client_shim.connections import verifiable
from migrate.connstore import ConnectionStore, TrackedConnection
from migrate.handover import CARRIER_GRACE_S, NEWCOMER_MARGIN_S
from migrate.kernel import sockdiag
from migrate.kernel.eventlog import EventLog

CARRIER_POLL_S = 0.01  # a look at the connections still without a usable checkpoint, at most


def unmovable_reason(conn: TrackedConnection | None, roam_started: float | None) -> str | None:
    """Why ``conn`` cannot be prepared (None: it can). ``roam_started`` is given for a
    connection found after the PREPAREs went out (a newcomer), whose age the reason names."""
    if conn is None:
        return "opened before the shim" if roam_started is None else "not captured"
    if conn.unmigratable is not None:
        return conn.unmigratable
    if conn.carrier is None:
        if roam_started is None:
            return "no checkpoint yet"
        age = max(0.0, roam_started - conn.opened_at)
        return f"no checkpoint yet (opened {age:.2f} s before the roam began)"
    return None


async def await_carriers(
    store: ConnectionStore,
    sockets: dict[int, sockdiag.TcpSocketInfo],
    moving: Callable[[int, TrackedConnection], bool],
    clock: Callable[[], float],
    log: EventLog,
    until: float | None = None,
    arrived: asyncio.Event | None = None,
) -> None:
    """Connections opened just now get their first checkpoint within a round trip: wait that
    long (``CARRIER_GRACE_S``) rather than reset them; only for those ``moving`` names. If the
    hand-over must be over by ``until``, the wait ends ``NEWCOMER_MARGIN_S`` before it: their
    PREPAREs and COMMITs need that time, and a wait past it only lengthens the freeze (of
    every connection, for those found during it) for connections that cannot move anyway.
    ``arrived``: set when a checkpoint is stored (``Capture.carriers_arrived``): the wait ends
    as soon as the last one needed is here, not at the next look ``CARRIER_POLL_S`` later
    (half of it on average, at every roam whose boundary round was awaited)."""
    started = clock()
    deadline = started + CARRIER_GRACE_S
    if until is not None:
        deadline = min(deadline, until - NEWCOMER_MARGIN_S)
    waiting: list[int] = []
    while True:
        if arrived is not None:
            arrived.clear()  # before the look: a checkpoint stored after it sets it again
        waiting = [
            port
            for port, info in sockets.items()
            if (conn := store.connections.get(port)) is not None
            and conn.unmigratable is None
            and not verifiable(conn, info)
            and moving(port, conn)
        ]
        if not waiting:
            return
        if clock() >= deadline:
            break
        if arrived is None:
            await asyncio.sleep(CARRIER_POLL_S)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), CARRIER_POLL_S)
    log.event(
        "carriers_late",
        level="warning",
        count=len(waiting),
        ports=waiting[:20],
        waited_s=round(max(0.0, deadline - started), 3),
        reason="no checkpoint that covers what these connections received",
    )
