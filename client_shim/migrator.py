"""Live migration on the client: the executor of each roam's hand-overs.

Theory of operation: ``client_shim.capture`` keeps, per connection, the newest checkpoint and the
replay bytes; ``client_shim.requests`` carries requests and answers. A roam to a new server,
make-before-break (ARCHITECTURE.md), drives one ``ClientHandover`` (migrate.handover) per live
connection, which decides every step; this module only feeds it facts (answers, positions read
from the kernel, timers) and executes what it returns:

1. ``prepare`` (shortly before the boundary): a PREPARE per live connection (sock_diag lists the
   client's sockets to the VIP) with the checkpoint, the client's positions and replay bytes.
2. ``refresh`` (just before it): the client's position, so the server regenerates ahead.
3. ``commit`` (at the boundary): the connections' outgoing data is frozen and nothing more is
   taken from the old server, so the positions read now are final; a COMMIT carries them.
4. The kernel rewrite is pointed at the new server and the freeze lifted in one transaction;
   then a GO per committed connection lets the new server speak.

A connection that cannot follow is reset cleanly with SOCK_DESTROY after the switch (the
application gets ECONNABORTED, never wrong bytes) and, if the new server may hold something
for it, an ABORT frees it there. Every hand-over is logged with its outcome, the pause and the
bytes replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

from client_shim.candidates import await_carriers, unmovable_reason
from client_shim.capture import Capture
from client_shim.connections import ClientConnections, Sockets, verifiable
from client_shim.holding import FrozenHold
from client_shim.requests import ReplayStreams, RequestChannel
from client_shim.roams import RoamRecord, defer_unanswered, log_roam
from client_shim.switching import Switching
from client_shim.waiting import Waiting
from migrate.connstore import TrackedConnection
from migrate.cover import CoverConfig
from migrate.endpoints import Endpoint
from migrate.handover import (
    DEFAULT_COMMIT_TIMEOUT_S,
    DEFAULT_PREPARE_LEAD_S,
    MIGRATION_PORT,
    MISSED_WINDOW_S,
    PREPARE_OVERTIME_S,
    PREPARE_WAIT_S,
    ClientHandover,
    ClientState,
    NotMoved,
    RemoteError,
    Send,
)
from migrate.kernel import sockdiag
from migrate.kernel.eventlog import EventLog
from migrate.registration import Bundle
from migrate.reincarnation import Answer, Phase
from migrate.replaystream import DEFAULT_MAX_REPLAY


class Migrator:
    def __init__(
        self,
        bundle: Bundle,
        table: str,
        nflog_group: int,
        log: EventLog,
        clock: Callable[[], float],
        clock_offset: Callable[[], float],
        *,
        prepare_lead: float = DEFAULT_PREPARE_LEAD_S,
        commit_timeout: float = DEFAULT_COMMIT_TIMEOUT_S,
        migration_port: int = MIGRATION_PORT,
        cover_config: CoverConfig | None = None,
        max_replay: int = DEFAULT_MAX_REPLAY,
    ) -> None:
        self.bundle = bundle
        self.table, self.rules = table, Switching(table, bundle.vip, bundle.service_port)
        self.group = nflog_group
        self.log = log
        self.hold: FrozenHold | None = None  # set by the daemon where the host can hold
        self.clock = clock
        self.prepare_lead = prepare_lead
        self.commit_timeout = commit_timeout
        self.capture = Capture(bundle, log, clock, clock_offset, max_replay)
        self.store = self.capture.store
        self.view = ClientConnections(self.capture, bundle.service_port, log)
        self.suggested_lead = self.view.suggested_lead
        self.channel = RequestChannel(
            bundle,
            log,
            clock,
            clock_offset,
            self._on_answer,
            migration_port=migration_port,
            cover_config=cover_config if cover_config is not None else CoverConfig(),
        )
        self.sealer = self.channel.sealer
        self.streams = ReplayStreams(self.channel, bundle, log)
        self.roams: list[RoamRecord] = []
        # The running roam's machines by client port (answers are dispatched to them).
        self._machines: dict[int, ClientHandover] = {}
        self._target: Endpoint | None = None
        self._changed = asyncio.Event()
        self._waits: list[Waiting[ClientHandover]] = []  # the running ``_run``s' (one per wait)

    # -- feeding the machines and executing their actions -----------------------------------

    def _on_answer(self, answer: Answer, now: float) -> None:
        machine = self._machines.get(answer.client_port)
        if machine is None:
            return  # a late answer of a finished roam
        try:
            machine.receive(answer, now)
        except RemoteError as error:
            self.log.rejection("answer_rejected", error=type(error).__name__, reason=str(error))
            return
        self._execute(machine)
        for waiting in self._waits:
            waiting.touch(answer.client_port)
        self._changed.set()

    def _execute(self, machine: ClientHandover) -> None:
        """Send what the machine asks to send. A ``Reset`` waits for the switch (``_finish``
        resets every connection whose state says RESET)."""
        for action in machine.actions():
            if isinstance(action, Send) and action.request is not None:
                assert self._target is not None
                self.streams.send(self._target, action.request)

    async def _run(self, machines: Iterable[ClientHandover], state: ClientState) -> None:
        """Feed answers and timers until none of ``machines`` is in ``state`` any more (looking
        again only at the answered ones at each wake-up: ``client_shim.waiting``)."""
        waiting = Waiting(machines, state)
        self._waits.append(waiting)
        try:
            while waiting.pending():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), waiting.wait_s(self.clock()))
                waiting.settle()
                now = self.clock()
                due = waiting.due(now)
                # A connection that ended while its answer was awaited needs none: it is closed,
                # not failed. Only the due are looked up (a dump per retry: costly).
                sockets = self.view.established([m.port for m in due]) if due else {}
                for machine in due:
                    if machine.port not in sockets and machine.state is state:
                        machine.ended()
                    machine.handle_timer(now)
                    self._execute(machine)
        finally:
            self._waits.remove(waiting)

    # -- a roam ------------------------------------------------------------------------------

    def prepare(self, epoch: int, target: Endpoint) -> RoamRecord:
        """Send a PREPARE for every live connection; returns the roam's record."""
        self._machines.clear()
        self._target = target
        # Fresh streams per roam: a server forgets runs whose hand-overs ended (migration_port).
        self.streams.close()
        record = RoamRecord(epoch, str(target), self.clock())
        for port, info in self.view.sockets_and_capture().items():
            conn = self.store.connections.get(port)
            if conn is not None and conn.unmigratable is None and not verifiable(conn, info):
                continue  # too new for a usable checkpoint: handled at the commit, as a newcomer
            reason = unmovable_reason(conn, None)
            if reason is not None or conn is None:
                record.connections[port] = NotMoved(port, "unmigratable", str(reason))
                continue
            self._prepare_one(record, info, conn, self.clock() + PREPARE_WAIT_S)
        return record

    def _prepare_one(
        self,
        record: RoamRecord,
        info: sockdiag.TcpSocketInfo,
        conn: TrackedConnection,
        deadline: float,
    ) -> ClientHandover | None:
        """The PREPARE of one connection, with its latest checkpoint."""
        port = info.src[1]
        request = self.view.request(Phase.PREPARE, record.epoch, info, None)
        if request is None:
            record.connections[port] = NotMoved(port, "unmigratable", "replay bytes are incomplete")
            return None
        assert conn.carrier is not None
        machine = ClientHandover(
            request, conn.carrier.s2c_pos, deadline, self.clock(), self.commit_timeout
        )
        record.connections[port] = self._machines[port] = machine
        self.store.pin(port, request.c2s_sent)
        self._execute(machine)
        return machine

    def refresh(self, record: RoamRecord, target: Endpoint) -> None:
        """Just before the boundary: how far each client has got (regenerated before the freeze)."""
        sockets = self.view.sockets_and_capture()
        now = self.clock()
        for machine in record.machines(ClientState.PREPARING, ClientState.PREPARED):
            info = sockets.get(machine.port)
            conn = self.store.connections.get(machine.port)
            if info is None or conn is None or conn.carrier is None:
                continue
            newer = None
            if conn.carrier.sealed != machine.request.checkpoint and verifiable(conn, info):
                newer = self.view.request(Phase.PREPARE, record.epoch, info, None)
            machine.refresh(info.bytes_received, conn.sent, newer, conn.carrier.s2c_pos, now)
            if newer is not None and machine.request is newer:
                self.store.pin(machine.port, newer.c2s_sent)
            self._execute(machine)
            self._top_up(target, machine)

    def _top_up(self, target: Endpoint, machine: ClientHandover) -> None:
        """A connection whose PREPARE went on the replay stream: send the bytes written since,
        so that the COMMIT, during the freeze, carries only the last few."""
        request = machine.request
        if request.streamed:
            data = self.store.replay_bytes(machine.port, request.c2s_sent)
            self.streams.top_up(target, request, data)

    async def commit(
        self,
        record: RoamRecord,
        target: Endpoint,
        prepare_deadline: float | None = None,
        give_up_at: float | None = None,
        may_defer: bool = False,
        window_closes: float | None = None,
    ) -> None:
        """Freeze, commit, switch, GO; reset what could not follow (or, ``may_defer``, hold
        those the new server could not prepare for the next roam). Records every outcome.

        PREPAREs are waited for until ``prepare_deadline`` (the old server stops serving soon
        after the boundary) and late ones ``PREPARE_OVERTIME_S`` longer, but never past
        ``give_up_at``: the new server takes COMMITs for its epoch only until shortly after
        the epoch began (frozen ``MISSED_WINDOW_S`` past it, a connection sends none), and
        GOs until ``window_closes`` (``hold_after_window`` past it)."""
        self._target = target
        deadline = (
            prepare_deadline if prepare_deadline is not None else self.clock() + PREPARE_WAIT_S
        )
        deadline += PREPARE_OVERTIME_S
        if give_up_at is not None:
            deadline = min(deadline, give_up_at)
        # Connections opened since the PREPAREs: prepared now, while the old server serves.
        record.mark("boundary", self.clock())
        sockets = self.view.tracked_sockets()
        await self._await_carriers(sockets, record, None, deadline)
        record.mark("carriers_before", self.clock())
        self._newcomers(record, sockets, deadline, None)
        for machine in record.machines(ClientState.PREPARING):
            machine.wait_until(deadline)
        # The new server regenerates while the old one serves; all at once, the slowest bounds.
        await self._run(record.machines(), ClientState.PREPARING)
        # Which connections the old server has: all captured by now. New ones wait (their SYNs
        # dropped, sent again by their TCP) until the freeze sends them to the new server.
        self.rules.hold()
        try:
            self.capture.drain()
            record.note_old(self.store.connections)
            record.started = self.clock()
            ready = record.machines(ClientState.PREPARED)
            self._freeze(ready, target)
            record.mark("frozen", self.clock())
            # The copies of everything sent before the freeze are queued by now: take them all
            # before reading positions (and the candidates' SYN copies, ``answered_by_new``).
            sockets = self.view.sockets_of([*(m.port for m in ready), *record.opening])
            record.answered_by_new(sockets.keys(), self.store.connections)
            record.mark("carriers", self.clock())
            self._commit(ready, sockets, record, give_up_at)
            record.mark("commits_sent", self.clock())
            # The prepared connections commit at once; the connections opened in the last
            # moments (still with the old server, perhaps still without a checkpoint) are
            # prepared and committed meanwhile, so that waiting for them does not lengthen
            # the others' pause. (Started after the COMMITs: their urgent slot goes first.)
            late = asyncio.create_task(self._late_newcomers(record, target, give_up_at))
            try:
                await self._run(ready, ClientState.COMMITTING)
                record.mark("committed", self.clock())
            finally:
                await late
        finally:
            if may_defer:
                now, connections = self.clock(), self.store.connections
                for machine in record.hold_after_window(connections, window_closes, now):
                    self._execute(machine)  # its ABORT
                defer_unanswered(record, self.roams[-1] if self.roams else None, now)
            held, gone = sorted(record.deferred), self._not_following(record)
            self.rules.switch(target, gone, held)
            record.mark("switched", self.clock())
            if self.hold is not None:  # held segments on to the new server, or dropped
                record.held = self.hold.release({*gone, *held})
                record.mark("released", self.clock())
        self._finish(record)

    def _not_following(self, record: RoamRecord) -> list[int]:
        """The ports whose segments must not reach the new server from the switch on: every
        connection of the hand-over but those with a socket waiting there (COMMITTED: the
        others closed, or will be reset after the switch), and those the server had closed
        before it (when the application closes them later, its FIN must not reach the new
        server: a RST)."""
        ports = {p for p, h in record.connections.items() if h.state is not ClientState.COMMITTED}
        ports -= record.deferred.keys()
        return sorted(ports | (self.view.closing - set(record.connections)))

    def _commit(
        self,
        machines: list[ClientHandover],
        sockets: dict[int, sockdiag.TcpSocketInfo],
        record: RoamRecord,
        give_up_at: float | None,
    ) -> None:
        """Each frozen machine's COMMIT with its positions now, and its GO's window."""
        now = self.clock()
        record.note_windows(sockets)
        give_up = give_up_at if give_up_at is not None else float("inf")
        late_by = now - give_up  # and the window closes MISSED_WINDOW_S after: no answer then
        for machine in machines:
            info = sockets.get(machine.port)
            if info is None:
                # Closed meanwhile (the server finished and sent its FIN): nothing to move.
                machine.ended()
            elif late_by >= MISSED_WINDOW_S:
                machine.missed_window(late_by)  # held for the next roam, not LATE and reset
            elif self.view.unverifiable(machine.port, info):
                machine.unverifiable(info.bytes_received)  # held: not refused and reset
            else:
                request = self.view.request(Phase.COMMIT, record.epoch, info, machine.prepared_sent)
                machine.freeze(request, "replay bytes incomplete", now, give_up + MISSED_WINDOW_S)
            self._execute(machine)
        self.channel.flush_urgent()

    async def _late_newcomers(
        self, record: RoamRecord, target: Endpoint, give_up_at: float | None
    ) -> None:
        """Connections opened with the old server after the PREPAREs and before the freeze:
        wait (bounded) for their first checkpoints, then prepare, freeze and commit them.
        Found in the capture's store (their SYNs), not by a dump: this runs in the freeze.
        Never past ``give_up_at``: every connection's switch waits for this."""
        limit = min(self.clock() + self.commit_timeout, give_up_at or float("inf"))
        old = record.with_old
        candidates = [p for p in old if p not in record.connections and p in self.store.connections]
        sockets = self.view.sockets_of(candidates)
        await self._await_carriers(sockets, record, old, limit)
        newcomers = self._newcomers(record, sockets, limit, old)
        if not newcomers:
            return
        self._freeze(newcomers, target)
        await self._run(newcomers, ClientState.PREPARING)
        prepared = [m for m in newcomers if m.state is ClientState.PREPARED]
        sockets = self.view.sockets_of([m.port for m in prepared])
        self._commit(prepared, sockets, record, give_up_at)
        await self._run(prepared, ClientState.COMMITTING)
        record.mark("newcomers", self.clock())

    def _freeze(self, machines: list[ClientHandover], target: Endpoint) -> None:
        self.rules.freeze([m.port for m in machines], target)

    def _finish(self, record: RoamRecord) -> None:
        """After the switch: GO for each committed connection, reset what could not follow
        (unless its application has closed it meanwhile: then it ends quietly)."""
        failed = [p for p, h in record.connections.items() if h.state is ClientState.RESET]
        for port in sorted(self.view.closed_by_application(failed)):
            handoff = record.connections[port]
            record.connections[port] = NotMoved(
                port,
                "closed",
                f"closed by its application during the roam (could not move: {handoff.reason})",
                handoff.replayed,
                ClientState.CLOSED,
            )
        going = [p for p, h in record.connections.items() if h.state is ClientState.COMMITTED]
        record.windows.update(self.view.receive_windows(record.low_windows.intersection(going)))
        record.mark("windows", now := self.clock())
        for port, handoff in record.connections.items():
            if isinstance(handoff, ClientHandover) and not handoff.final:
                handoff.switched(now, record.windows.get(port))
                self._execute(handoff)
            if handoff.state is ClientState.RESET:
                self.view.reset(port)
            self.store.pin(port, None)
        self.channel.flush_urgent()
        record.mark("go_sent", self.clock())
        self._machines.clear()
        log_roam(self.log, record, self.roams)

    def _newcomers(
        self,
        record: RoamRecord,
        sockets: dict[int, sockdiag.TcpSocketInfo],
        deadline: float,
        with_old: set[int] | None,
    ) -> list[ClientHandover]:
        """Prepare, now, the connections opened with the old server after the PREPAREs; those
        not in ``with_old`` (when given: those found at the freeze) talk to the new server."""
        found = []
        for port, info in sockets.items():
            if port in record.connections or (with_old is not None and port not in with_old):
                continue
            conn = self.store.connections.get(port)
            reason = unmovable_reason(conn, record.started)
            if reason is not None or conn is None:
                later = conn is not None and conn.unmigratable is None  # no checkpoint yet
                handoff = NotMoved(port, "unmigratable", str(reason), movable_later=later)
                record.connections[port] = handoff
                continue
            machine = self._prepare_one(record, info, conn, deadline)
            if machine is not None:
                found.append(machine)
        return found

    async def _await_carriers(
        self, sockets: Sockets, record: RoamRecord, with_old: set[int] | None, until: float
    ) -> None:
        """Connections opened just now get their first checkpoint within a round trip: wait
        that long (bounded, ending in time for their hand-over to be done by ``until``) rather
        than reset them; only those this hand-over still moves (not one given up on, nor one
        opened after the freeze, not in ``with_old``: it talks to the new server already)."""
        moving = functools.partial(record.moving, with_old=with_old)
        arrived = self.capture.carriers_arrived
        await await_carriers(self.store, sockets, moving, self.clock, self.log, until, arrived)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.capture.open(self.group), self.capture.on_readable)
        await self.channel.start()

    def close(self) -> None:
        self.channel.close()
        self.streams.close()
        if self.capture.reader is not None:
            asyncio.get_running_loop().remove_reader(self.capture.reader.fileno())
            self.capture.close()

    def status(self) -> dict[str, Any]:
        return {
            "tracked_connections": len(self.store.connections),
            "carriers_stored": self.store.carriers_stored,
            "carriers_rejected": self.capture.rejected_carriers,
            "carriers_ignored": self.store.carriers_ignored,
            "carriers_ignored_by_reason": dict(self.store.ignored_by_reason),
            "capture_losses": self.capture.losses,
            "capture": self.capture.status(),
            "cover": self.channel.cover_status(),
            "replay_stream": self.streams.status(),
            "roams": [record.summary() for record in self.roams[-10:]],
        }
