"""What the client shim remembers and logs of each roam: one ``RoamRecord`` per roam, with
every connection's hand-over (or why it did not move) and when each step ended."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from migrate.connstore import TrackedConnection
from migrate.handover import DEFER_HELD_MAX_S, ClientHandover, ClientState, NotMoved
from migrate.kernel.eventlog import EventLog
from migrate.kernel.sockdiag import TcpSocketInfo
from migrate.kernel.tcp_repair import RESTORED_WINDOW_SEGMENTS

MAX_ROAM_RECORDS = 50  # kept for status; older roams are in the log only

Handoff = ClientHandover | NotMoved


# A window read in the freeze this large (in the connection's segments) is final for its GO: the
# new server's restored socket assumes RESTORED_WINDOW_SEGMENTS and only ever lowers that to the
# told window, and the window can only open by the switch (nothing comes from the old server in
# the freeze). A smaller one may have opened meanwhile (the application read), and the ACK that
# said so was dropped with the freeze's other pure ACKs (client_shim.holding): it is read again
# after the switch. Twice the guess, against a new server whose MSS is larger than the client's.
LOW_WINDOW_SEGMENTS = 2 * RESTORED_WINDOW_SEGMENTS
MIN_MSS = 1460


def low_window(info: TcpSocketInfo) -> int:
    """Bytes below which ``info``'s receive window, read in the freeze, is read again after the
    switch (``LOW_WINDOW_SEGMENTS``)."""
    return LOW_WINDOW_SEGMENTS * max(info.snd_mss, info.rcv_mss, MIN_MSS)


@dataclass
class RoamRecord:
    epoch: int
    server: str
    started: float
    # The connections the old server has (all captured when the hand-over froze): the others
    # talk to the new server already.
    with_old: set[int] = field(default_factory=set)
    # Of those, the ones no hand-over of this roam has yet, with their SYN copies so far: the
    # late newcomers' candidates (``note_old``, ``answered_by_new``).
    opening: dict[int, int] = field(default_factory=dict)
    # Connections held frozen for the next roam (``defer_unanswered``), and since when.
    deferred: dict[int, float] = field(default_factory=dict)
    connections: dict[int, Handoff] = field(default_factory=dict)
    # When each step of the hand-over ended (the log breaks the pause down by them).
    marks: dict[str, float] = field(default_factory=dict)
    # Each committed connection's receive window for its GO (protocol.md 8.3), read in the
    # freeze with its positions; those below ``low_window`` are read again after the switch.
    windows: dict[int, int | None] = field(default_factory=dict)
    low_windows: set[int] = field(default_factory=set)
    # Segments written during the freeze and held (client_shim.holding): (sent on, dropped).
    held: tuple[int, int] = (0, 0)

    def note_windows(self, sockets: dict[int, TcpSocketInfo]) -> None:
        """The receive windows of ``sockets``, read in the freeze, for their GOs; those below
        ``low_window`` are to be read again after the switch."""
        for port, info in sockets.items():
            self.windows[port] = info.rcv_wnd
            if info.rcv_wnd is not None and info.rcv_wnd < low_window(info):
                self.low_windows.add(port)

    def note_old(self, connections: Mapping[int, TrackedConnection]) -> None:
        """The connections the old server has: every one captured when new SYNs were held.
        The candidates (read in the freeze, before the COMMITs go) leave out those the client
        has closed: no late newcomer, and each would cost a lookup there."""
        self.with_old = set(connections)
        self.opening = {
            p: c.syns for p, c in connections.items() if p not in self.connections and not c.fin
        }

    def answered_by_new(
        self, established: Collection[int], connections: Mapping[int, TrackedConnection]
    ) -> set[int]:
        """Take out of ``with_old`` the candidates whose handshake completes with the new
        server: not established when read after the freeze (the old server's SYN-ACK is
        dropped from then on, and the client's TCP sends its SYN again, to the new server; a
        SYN held in the hold waits in the queue until the switch), or whose SYN was sent again
        since the hold (where the hold drops SYNs uncopied, the copy is of one sent after the
        freeze). ``established``: read after the freeze, and
        ``connections`` the capture's, drained after that read. Returns the ports taken out."""
        taken = {
            port
            for port, syns in self.opening.items()
            if port not in established
            or (conn := connections.get(port)) is None
            or conn.syns != syns
        }
        self.with_old -= taken
        return taken

    def moving(self, port: int, conn: TrackedConnection, *, with_old: set[int] | None) -> bool:
        """Whether this roam still moves ``port`` (for ``await_carriers``): one of its
        hand-overs not over yet, or one it has none for yet that the old server has (all
        before the freeze, ``with_old`` None; else only those in it)."""
        handoff = self.connections.get(port)
        if handoff is not None:
            return isinstance(handoff, ClientHandover) and not handoff.final
        return with_old is None or port in with_old

    def hold_after_window(
        self, connections: Mapping[int, TrackedConnection], closes: float | None, now: float
    ) -> list[ClientHandover]:
        """If the switch comes after the new server's window ``closes`` (a hand-over longer
        than the epoch): that server's gate is closed or closing, and the connections sent on
        to it would meet no socket there, and a RST once its gate opened again for a later
        epoch. Every committed connection is to wait for the next roam instead
        (``ClientHandover.window_closed``; returned, their ABORTs to send, and held by
        ``defer_unanswered``), and so is every connection opened since the hold (in the
        capture's ``connections``, not in ``with_old``): it talks to the new server already,
        which leaves it, pushing its checkpoint, as its gate closes."""
        if closes is None or now < closes or "frozen" not in self.marks:
            return []  # (not frozen: the hand-over failed before it, nothing was opened since)
        committed = self.machines(ClientState.COMMITTED)
        for handoff in committed:
            handoff.window_closed(now - closes)
        reason = f"opened in a hand-over that switched {now - closes:.2f} s after the window"
        for port, conn in connections.items():
            if port not in self.connections and port not in self.with_old and not conn.fin:
                self.connections[port] = NotMoved(
                    port, "deferred", f"{reason} closed; held for the next roam",
                    state=ClientState.CLOSED,
                )  # fmt: skip
                self.deferred[port] = now
        return committed

    def mark(self, step: str, now: float) -> None:
        self.marks[step] = now

    @property
    def switched(self) -> float:
        """When the rewrite moved to the new server (0: not yet): the end of the pause."""
        return self.marks.get("switched", 0.0)

    def machines(self, *states: ClientState) -> list[ClientHandover]:
        return [
            h
            for h in self.connections.values()
            if isinstance(h, ClientHandover) and (not states or h.state in states)
        ]

    def summary(self) -> dict[str, Any]:
        outcomes: dict[str, int] = {}
        for handoff in self.connections.values():
            outcomes[handoff.outcome] = outcomes.get(handoff.outcome, 0) + 1
        return {
            "epoch": self.epoch,
            "server": self.server,
            "connections": len(self.connections),
            "outcomes": outcomes,
            "pause_ms": round((self.switched - self.started) * 1000, 3) if self.switched else None,
            "bytes_replayed": sum(h.replayed for h in self.connections.values()),
            "held_segments": {"sent_on": self.held[0], "dropped": self.held[1]},
            # Milliseconds from the freeze to the end of each step (negative: before it).
            "steps_ms": {
                step: round((when - self.started) * 1000, 1) for step, when in self.marks.items()
            },
        }


def defer_unanswered(record: RoamRecord, previous: RoamRecord | None, now: float) -> None:
    """The connections the new server could not prepare in its window (no answer to their
    PREPARE by the freeze, or a COMMIT too late: ``ClientHandover.movable_later``), and those
    only waiting for their first checkpoint (``NotMoved.movable_later``), are held frozen for
    the next roam instead of being reset (``DEFER_WITHIN_S``: the caller says whether that
    roam comes soon enough), unless held since the roams before for ``DEFER_HELD_MAX_S``
    already. Their ABORT is sent: the new server frees what it holds."""
    held_before = previous.deferred if previous is not None else {}
    for port, handoff in list(record.connections.items()):
        since = held_before.get(port, now)
        if (
            handoff.state is ClientState.RESET
            and handoff.movable_later
            and now - since < DEFER_HELD_MAX_S
        ):
            reason = f"{handoff.reason}; held for the next roam"
            record.connections[port] = NotMoved(
                port, "deferred", reason, handoff.replayed, ClientState.CLOSED
            )
            record.deferred[port] = since


def log_roam(log: EventLog, record: RoamRecord, roams: list[RoamRecord]) -> None:
    """One ``handoff`` event per connection and a ``roam`` summary; ``record`` joins ``roams``
    (the newest ``MAX_ROAM_RECORDS`` kept)."""
    pause_ms = round((record.switched - record.started) * 1000, 3)
    for port, handoff in record.connections.items():
        log.event(
            "handoff",
            epoch=record.epoch,
            server=record.server,
            port=port,
            outcome=handoff.outcome,
            detail=handoff.reason,
            bytes_replayed=handoff.replayed,
            pause_ms=pause_ms,
        )
    roams.append(record)
    del roams[:-MAX_ROAM_RECORDS]
    log.event("roam", **record.summary())
