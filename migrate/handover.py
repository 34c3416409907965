"""One connection's hand-over to a new server, as two pure state machines.

Theory of operation (the make-before-break roam of ARCHITECTURE.md, messages of
``migrate.reincarnation``): shortly before a boundary the client sends the new server a
PREPARE per live connection; the server replays the client's requests to a fresh service
connection and regenerates the response up to the client's position (*preparing*), then answers
READY (*prepared*). A refreshed PREPARE (the same checkpoint, a later position) extends the
work. At the boundary the client freezes the connection and sends a COMMIT with its final
positions; the server finishes the replay and creates the client-facing socket with
TCP_REPAIR (*committing*), answers READY and keeps the socket silent (*restored*) until the
client has switched its rewrite and says GO, or ``GO_TIMEOUT_S`` has passed (*live*). A client
that gives up on a prepared hand-over sends ABORT and resets the connection; the server
releases whatever it held, or does so itself ``PENDING_TTL_S`` after the PREPARE.

Each side is a machine in the style of h11 and aioquic: a module-level transition table
(``SERVER_TRANSITIONS``, ``CLIENT_TRANSITIONS``: ``{state: {event: next state}}``, from which
docs/protocol.md's diagram is drawn), inputs that carry ``now`` (``receive``, the events of the
work or of the roam, ``handle_timer``), outputs the caller pulls (``actions()``) and
``get_timer()``. An event not in the table raises ``RemoteError`` (the peer sent something the
protocol does not allow now: the caller refuses the message and nothing changes) or
``LocalError`` (the caller drove its own machine wrongly: a bug of ours). No I/O, no clock.

Every timing constant of the hand-over is defined here, once, with the reason for its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from migrate import errors
from migrate.checkpoint import sealed_has_range
from migrate.reincarnation import (
    LATE_REQUEST_S,
    PREPARE_AHEAD_S,
    Answer,
    Phase,
    Request,
    Status,
)

# -- the timing contract -----------------------------------------------------------------------
#
# Requests for an epoch are taken by its server from PREPARE_AHEAD_S (5 s) before its start to
# LATE_REQUEST_S (10 s) after (migrate.reincarnation, where admission checks them). The client's
# own deadlines below all fall inside that window.

MIGRATION_PORT = 47476  # UDP port of re-incarnation requests on every server (and cover)

# Client: when to prepare.
DEFAULT_PREPARE_LEAD_S = 0.15  # a service connection and a replay on an idle pool
# The new server regenerates each connection's response up to the client's position before it
# answers READY: give it that long, at a conservative replay speed, on top of the base lead.
REGENERATE_BYTES_PER_S = 60e6
# An upload's replay bytes (a PUT body, a redis SET of megabytes, unanswered) go to the new
# server on the replay stream and into its service before it answers READY: give them that long
# too, at a conservative speed (sealed, streamed, opened and replayed on a busy 2-CPU host:
# labs.benchmarks.replay_stream measures about 240 MB/s for the stream alone, idle; at 40 MB/s
# a 64 MiB upload roaming every second still met unanswered PREPAREs, labs.benchmarks.uploads).
REPLAY_BYTES_PER_S = 20e6
PREPARE_SECONDS_PER_CONNECTION = 0.02  # a service connection, a replay, a few round trips
MAX_PREPARE_LEAD_S = 4.0  # well inside PREPARE_AHEAD_S: a clock 1 s off is still admitted
# Client: the last position report before the boundary, so that the server regenerates those
# bytes before the freeze rather than during it.
REFRESH_LEAD_S = 0.1
# Client: at the refresh, prepare again with the newest checkpoint when it has a range record
# and lies this far past the position the server has regenerated to: the new server then reads
# a window from there instead of every byte since (a download at 3 Gbit/s moves 150 MB in a
# prepare lead of 0.4 s, which the server otherwise reads inside the freeze).
REPREPARE_GAIN_BYTES = 4 * 1024 * 1024
# Server: the last round of checkpoints goes out this long before its gate closes, before the
# client's refresh, so that a refresh can re-prepare with a checkpoint that covers the newest
# response (it must exceed REFRESH_LEAD_S).
LEAVE_PUSH_LEAD_S = REFRESH_LEAD_S + 0.02
# Client: retries of an unanswered request (a datagram lost, a server busy or restarting).
PREPARE_RETRY_S = 1.0
COMMIT_RETRY_S = 0.5  # shorter: the connection is frozen while a COMMIT waits
# Timers due this close together are handled in one wake-up (one look at the sockets).
TIMER_QUANTUM_S = 0.005
# Client: how long PREPARE answers are awaited. Normally until shortly before the old server
# closes its gate (the daemon computes that from the schedule); a roam that starts late waits
# at least LATE_PREPARE_WAIT_S; answers that keep coming are awaited PREPARE_OVERTIME_S more
# (a longer pause beats a reset); never later than HANDOFF_BUDGET_S after the epoch began nor
# COMMIT_MARGIN_S before the new server's window closes, so that the COMMITs still reach it in
# its request window (LATE_REQUEST_S).
PREPARE_WAIT_S = 10.0  # without a schedule-derived deadline (tests, direct calls)
LATE_PREPARE_WAIT_S = 2.0
PREPARE_OVERTIME_S = 3.0
HANDOFF_BUDGET_S = 4.0
COMMIT_MARGIN_S = 0.3
# Client: a connection frozen this long after its hand-over's give-up time (the client's host
# stalled: a stopped or starved process, a VM paused) sends no COMMIT. The give-up time is
# COMMIT_MARGIN_S before the new server's window closes, so the COMMIT would be answered LATE
# and the connection reset; it is held like one whose PREPARE went unanswered instead (ABORT,
# then the next roam, which starts at once since the client is behind the schedule).
MISSED_WINDOW_S = COMMIT_MARGIN_S
DEFAULT_COMMIT_TIMEOUT_S = 5.0  # HANDOFF_BUDGET_S + a retried COMMIT < LATE_REQUEST_S
# Client: a connection opened in the last moments gets its first checkpoint within a round
# trip (the server pushes one when the service's first bytes pass): wait that long for it.
CARRIER_GRACE_S = 0.3
# Client: connections whose PREPARE the new server could not answer within its window (an
# epoch too short for it to prepare them all) wait frozen for the next roam rather than being
# reset, if that roam comes within this long and goes to another server: a pause of about an
# epoch instead of a broken connection. Again at the next roam if need be, while the
# connection has been held less than DEFER_HELD_MAX_S (its checkpoint stays well inside its
# age limit, CHECKPOINT_AGE_FLOOR_S).
DEFER_WITHIN_S = 3.0
DEFER_HELD_MAX_S = 4.0
NO_PREPARE_ANSWER = "no answer to the prepare"
# A COMMIT unanswered may have been restored at the new server (its READY lost), but nothing
# was started there (no GO): the ABORT frees it, the checkpoint still holds, and the connection
# may wait for the next roam like one whose PREPARE went unanswered.
NO_COMMIT_ANSWER = "no answer to the commit"
NEVER_COMMITTED = "prepared, but not frozen before the switch (never committed)"
# ... but that wait ends this long before the hand-over must be over (the new server's window
# for COMMITs), leaving the young connections' PREPARE and COMMIT round trips their time.
NEWCOMER_MARGIN_S = 0.1
# Server: a preparation or commit step that takes longer has failed (a service that stalls).
WORK_TIMEOUT_S = 20.0
# Server: a replayed service silent this long will not produce the missing bytes.
SERVICE_IDLE_S = 5.0
# Server: the same, once the service has answered every replayed request in full under a
# request/response codec (``StreamState.all_answered``): it speaks only when asked, so its
# answers were shorter than the client's (a replica with other data). Not 0: a RESP3 push
# may still be on its way, and waiting 5 s would outlast the client's wait for the answer.
ANSWERED_IDLE_S = 0.2
# Server: a restored socket waits this long for GO, then starts anyway: the client answered
# READY by switching, and only the GO datagram was lost (the client sends GO once, after its
# switch; COMMIT_RETRY_S shows a switch follows READY within a round trip).
GO_TIMEOUT_S = 1.0
# Server: a client still being answered COMMITs of the same roam has not switched yet (it
# switches after its last answer): the wait for GO runs from its newest answer instead, up
# to this long after the restore (a roam of thousands of connections takes seconds here).
GO_WAIT_MAX_S = 5.0
# Server: a re-incarnation whose client never came back is forgotten this long after its
# PREPARE: the client's whole hand-over (prepare ahead, work, overtime, commit) fits in it.
PENDING_TTL_S = PREPARE_AHEAD_S + WORK_TIMEOUT_S + 5.0

assert LEAVE_PUSH_LEAD_S > REFRESH_LEAD_S
assert MAX_PREPARE_LEAD_S < PREPARE_AHEAD_S
assert HANDOFF_BUDGET_S + DEFAULT_COMMIT_TIMEOUT_S <= LATE_REQUEST_S


class HandoverError(errors.RoamError):
    """An event the hand-over's table does not allow in the current state."""


class RemoteError(HandoverError, errors.RemoteError):
    """The peer is at fault: it sent what the protocol does not allow now (refuse it)."""


class LocalError(HandoverError, errors.LocalError):
    """This side is at fault: its executor fed an event out of order (a bug of ours)."""


# -- outputs (pulled by the executor) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``request`` to the new server (client) or ``answer`` to the client (server);
    ``answer is None`` on the server: nothing new to say (a client that frames its requests
    gets a cover answer, so that each request cell has one answer)."""

    request: Request | None = None
    answer: Answer | None = None


@dataclass(frozen=True, slots=True)
class Prepare:
    """Server: open a service connection, replay the PREPARE's bytes, regenerate to ``until``."""

    until: int


@dataclass(frozen=True, slots=True)
class Regenerate:
    """Server: read the replayed service on until ``until`` (a refreshed position)."""

    until: int


@dataclass(frozen=True, slots=True)
class Restore:
    """Server: replay the COMMIT's bytes, regenerate to its position, create the socket."""

    request: Request


@dataclass(frozen=True, slots=True)
class StartRelay:
    """Server: the client has switched: hand the socket and service to a live connection.
    ``client_window``: the client's receive window its GO carried (None: GO's timeout, or a
    client that did not say)."""

    client_window: int | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """Server: cancel any work, close what the re-incarnation holds (silently), free its
    accounting. ``kind`` (failed, expired, aborted, replaced, closed_gate, stopped) and
    ``reason`` say why, for the log."""

    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reset:
    """Client: destroy the connection (the application gets ECONNABORTED, never wrong bytes)."""

    reason: str


Action = Send | Prepare | Regenerate | Restore | StartRelay | Release | Reset


# -- events --------------------------------------------------------------------------------------


class ServerState(Enum):
    PREPARING = "preparing"  # work running: connect, replay, regenerate
    PREPARED = "prepared"  # READY answered; the service connection waits
    COMMIT_QUEUED = "commit queued"  # a COMMIT came while work was running
    COMMITTING = "committing"  # finishing the replay, restoring the socket
    RESTORED = "restored"  # READY answered; the socket waits, silent, for GO
    LIVE = "live"  # relaying (terminal; a repeated COMMIT is still answered)
    FAILED = "failed"  # kept for the COMMIT that may still come (terminal)
    RELEASED = "released"  # aborted, expired, replaced (terminal)


class ServerEvent(Enum):
    PREPARE = "PREPARE"  # a repeated PREPARE: the same re-incarnation
    PREPARE_LATER = "PREPARE for later bytes"  # a refresh after READY: regenerate more
    COMMIT = "COMMIT"
    GO = "GO"
    ABORT = "ABORT"
    WORK_DONE = "work done"
    WORK_SHORT = "work done short"  # the client's position moved on meanwhile: go on
    WORK_FAILED = "work failed"
    TIMEOUT = "timeout"  # the work or the GO took too long
    EXPIRED = "TTL"  # PENDING_TTL_S after the PREPARE: the client never came back
    REPLACED = "replaced"  # a new PREPARE (another checkpoint) for the same connection
    GATE_CLOSED = "gate closed"  # GO (or its timeout) behind a closed gate: never start there


_S = ServerState
_SE = ServerEvent

SERVER_TRANSITIONS: dict[ServerState, dict[ServerEvent, ServerState]] = {
    _S.PREPARING: {
        _SE.PREPARE: _S.PREPARING,  # the answer comes with the work
        _SE.PREPARE_LATER: _S.PREPARING,  # the work goes on to the later position
        _SE.WORK_DONE: _S.PREPARED,
        _SE.WORK_SHORT: _S.PREPARING,
        _SE.WORK_FAILED: _S.FAILED,
        _SE.COMMIT: _S.COMMIT_QUEUED,
        _SE.ABORT: _S.RELEASED,
        _SE.TIMEOUT: _S.FAILED,
        _SE.EXPIRED: _S.RELEASED,
        _SE.REPLACED: _S.RELEASED,
    },
    _S.PREPARED: {
        _SE.PREPARE: _S.PREPARED,  # READY again
        _SE.PREPARE_LATER: _S.PREPARING,
        _SE.COMMIT: _S.COMMITTING,
        _SE.ABORT: _S.RELEASED,
        _SE.EXPIRED: _S.RELEASED,
        _SE.REPLACED: _S.RELEASED,
    },
    _S.COMMIT_QUEUED: {
        _SE.PREPARE: _S.COMMIT_QUEUED,  # late: the COMMIT's position wins
        _SE.PREPARE_LATER: _S.COMMIT_QUEUED,
        _SE.COMMIT: _S.COMMIT_QUEUED,  # a repeat: answered when the work is done
        _SE.WORK_DONE: _S.COMMITTING,
        _SE.WORK_SHORT: _S.COMMITTING,  # the COMMIT's restore reads on to its position
        _SE.WORK_FAILED: _S.FAILED,
        _SE.ABORT: _S.RELEASED,
        _SE.TIMEOUT: _S.FAILED,
        _SE.EXPIRED: _S.RELEASED,
        _SE.REPLACED: _S.RELEASED,
    },
    _S.COMMITTING: {
        _SE.PREPARE: _S.COMMITTING,
        _SE.PREPARE_LATER: _S.COMMITTING,
        _SE.COMMIT: _S.COMMITTING,  # a repeat: answered when the work is done
        _SE.WORK_DONE: _S.RESTORED,
        _SE.WORK_FAILED: _S.FAILED,
        _SE.ABORT: _S.RELEASED,
        _SE.TIMEOUT: _S.FAILED,
        _SE.EXPIRED: _S.RELEASED,
        _SE.REPLACED: _S.RELEASED,
    },
    _S.RESTORED: {
        _SE.PREPARE: _S.RESTORED,  # a stale duplicate, overtaken by the COMMIT: ignored
        _SE.PREPARE_LATER: _S.RESTORED,
        _SE.COMMIT: _S.RESTORED,  # a repeat (its answer was lost): READY again
        _SE.GO: _S.LIVE,
        _SE.TIMEOUT: _S.LIVE,  # GO_TIMEOUT_S: the GO was lost
        _SE.GATE_CLOSED: _S.RELEASED,  # it would never be left (the gate stays closed)
        _SE.ABORT: _S.RELEASED,
        _SE.REPLACED: _S.RELEASED,
    },
    _S.LIVE: {
        _SE.PREPARE: _S.LIVE,  # a stale duplicate: ignored
        _SE.PREPARE_LATER: _S.LIVE,
        _SE.COMMIT: _S.LIVE,  # a repeat whose answers were all lost: READY again
        _SE.GO: _S.LIVE,  # a repeat
        _SE.ABORT: _S.LIVE,  # too late: the client's reset of its socket ends it
    },
    _S.FAILED: {
        _SE.PREPARE: _S.FAILED,  # a repeat: answered with the reason, not worked on again
        _SE.PREPARE_LATER: _S.FAILED,
        _SE.COMMIT: _S.FAILED,  # answered with the reason of the failure
        _SE.ABORT: _S.FAILED,
        _SE.REPLACED: _S.RELEASED,
    },
    _S.RELEASED: {
        _SE.PREPARE: _S.RELEASED,  # a late duplicate after an ABORT: never worked on again
        _SE.PREPARE_LATER: _S.RELEASED,
        _SE.ABORT: _S.RELEASED,  # a repeat
    },
}

# What each machine may start from: a server machine is made by an admitted PREPARE.
SERVER_INITIAL = ServerState.PREPARING
SERVER_FINAL = frozenset({ServerState.LIVE, ServerState.FAILED, ServerState.RELEASED})


def commit_identity(request: Request) -> tuple[int, int, int]:
    """What tells a repeated COMMIT from another: its epoch and the positions it froze."""
    return (request.epoch, request.s2c_received, request.c2s_sent)


@dataclass
class ServerHandover:
    """The server's side of one connection's re-incarnation, from an admitted PREPARE on.

    The executor runs one piece of work at a time (``Prepare``, ``Regenerate``, ``Restore``)
    and reports it with ``work_done(position, now)`` or ``work_failed(...)``."""

    prepare: Request
    created: float
    client_id: int
    state: ServerState = SERVER_INITIAL
    until: int = 0  # the client's position as last reported: regenerate up to here
    position: int = 0  # how far the work has regenerated the service's output
    commit: Request | None = None
    committed: tuple[int, int, int] | None = None  # the COMMIT answered READY: its identity
    failure: tuple[Status, str] | None = None
    answered_prepare: bool = False
    working_since: float | None = None
    restored_at: float | None = None
    commit_received_at: float | None = None  # the first COMMIT: where its hand-over's time goes
    go_deadline: float | None = None  # RESTORED: the GO is waited for until then
    _actions: list[Action] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.until = self.prepare.s2c_received
        self._start_work(Prepare(self.until), self.created)

    # -- inputs ---------------------------------------------------------------------------------

    def receive(self, request: Request, now: float, *, gate_open: bool = True) -> None:
        """A request of this re-incarnation's client (already authenticated and admitted).
        ``gate_open``: whether a connection started now would be inside this server's open
        gate (a GO behind a closed gate releases instead: it would never be left)."""
        if request.phase is Phase.PREPARE:
            self._on_prepare(request, now)
        elif request.phase is Phase.COMMIT:
            self._on_commit(request, now)
        elif request.phase is Phase.GO:
            if self.state is _S.LIVE:
                self._step(_SE.GO, RemoteError)  # a repeat
                return
            self._start_relay(_SE.GO, gate_open, RemoteError, request.window)
        elif request.phase is Phase.ABORT:
            was = self.state
            self._step(_SE.ABORT, RemoteError)
            if self.state is _S.RELEASED and was is not _S.RELEASED:
                self._actions.append(Release("aborted", "aborted by the client"))
        else:  # pragma: no cover - Phase has four members
            raise RemoteError(f"unknown phase {request.phase!r}")

    def work_done(self, position: int, now: float) -> None:
        self.position = position
        self.working_since = None
        previous = self.state
        short = previous is _S.PREPARING and self.position < self.until
        self._step(_SE.WORK_SHORT if short else _SE.WORK_DONE, LocalError)
        if short:  # the client moved on meanwhile: go on
            self._start_work(Regenerate(self.until), now)
            return
        if previous is _S.PREPARING:
            self.answered_prepare = True
            self._actions.append(Send(answer=self._answer(Phase.PREPARE, Status.READY)))
        elif previous is _S.COMMIT_QUEUED:
            assert self.commit is not None
            self._start_work(Restore(self.commit), now)
        elif previous is _S.COMMITTING:
            assert self.commit is not None
            self.committed = commit_identity(self.commit)
            self.restored_at = now
            self.go_deadline = now + GO_TIMEOUT_S
            self._actions.append(Send(answer=self._answer(Phase.COMMIT, Status.READY)))

    def client_still_committing(self, answered_at: float) -> None:
        """The client was answered READY to another COMMIT of this roam at ``answered_at``.
        It switches, and sends GO, only after its last answer: the wait for GO runs from
        there (a restored socket that started early speaks before the client listens), but
        never past ``GO_WAIT_MAX_S`` after this restore."""
        if self.state is _S.RESTORED:
            assert self.restored_at is not None
            assert self.go_deadline is not None
            later = max(self.go_deadline, answered_at + GO_TIMEOUT_S)
            self.go_deadline = min(later, self.restored_at + GO_WAIT_MAX_S)

    def work_failed(self, status: Status, detail: str, now: float) -> None:
        previous = self.state
        self.working_since = None
        self._step(_SE.WORK_FAILED, LocalError)
        self._fail(previous, status, detail)

    def replaced(self) -> None:
        """A new PREPARE (another checkpoint) takes this one's place."""
        self._step(_SE.REPLACED, LocalError)
        self._actions.append(Release("replaced", "replaced by a newer preparation"))

    def handle_timer(self, now: float, *, gate_open: bool = True) -> None:
        timer = self.get_timer()
        if timer is None or now < timer:
            return
        if self.state is _S.RESTORED:
            self._start_relay(_SE.TIMEOUT, gate_open, LocalError)
            return
        # The same sum as ``get_timer``'s: ``now - created >= TTL`` can miss by a rounding
        # when the timer fires exactly at its time (a TIMEOUT then, which PREPARED refuses).
        if now >= self.created + PENDING_TTL_S:
            self._step(_SE.EXPIRED, LocalError)
            self._actions.append(Release("expired", "the client never came back"))
            return
        previous = self.state
        self.working_since = None
        self._step(_SE.TIMEOUT, LocalError)
        if self.state is _S.FAILED:
            self._fail(previous, Status.FAILED, f"timed out after {WORK_TIMEOUT_S:.0f} s")

    # -- outputs --------------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        """What to do now (each returned once)."""
        actions, self._actions = self._actions, []
        return actions

    def get_timer(self) -> float | None:
        if self.state in (_S.LIVE, _S.FAILED, _S.RELEASED):
            return None
        if self.state is _S.RESTORED:
            assert self.go_deadline is not None
            return self.go_deadline
        ttl = self.created + PENDING_TTL_S
        if self.working_since is not None:
            return min(ttl, self.working_since + WORK_TIMEOUT_S)
        return ttl

    @property
    def holds_resources(self) -> bool:
        """Whether the executor still holds a service connection or a socket for it."""
        return self.state not in (_S.LIVE, _S.FAILED, _S.RELEASED)

    def repeats(self, request: Request) -> bool:
        """Whether a PREPARE asks for this same re-incarnation (a retry, a refresh, or a
        duplicate that arrives late): it never starts the work again."""
        mine = self.prepare
        return (
            request.checkpoint == mine.checkpoint
            and request.epoch == mine.epoch
            and request.replay_from == mine.replay_from
            and request.c2s_sent == mine.c2s_sent
        )  # the position may differ either way: a refresh, or an older copy arriving late

    # -- internals ------------------------------------------------------------------------------

    def _on_prepare(self, request: Request, now: float) -> None:
        if not self.repeats(request):
            raise RemoteError(
                f"a PREPARE that does not repeat the one being {self.state.value} "
                "(the executor replaces the re-incarnation instead)"
            )
        later = max(self.until, request.s2c_received) > self.position
        self._step(_SE.PREPARE_LATER if later else _SE.PREPARE, RemoteError)
        if self.state is _S.FAILED:
            assert self.failure is not None
            status, detail = self.failure
            self._actions.append(Send(answer=self._answer(Phase.PREPARE, status, detail)))
            return
        if self.state in (_S.RESTORED, _S.LIVE, _S.RELEASED):
            self._actions.append(Send())  # overtaken by the COMMIT or an ABORT: nothing to say
            return
        was_ready = self.state is _S.PREPARING and self.working_since is None
        self.until = max(self.until, request.s2c_received)
        if was_ready:
            # A refresh after READY: regenerate the extra bytes now, so that the COMMIT has
            # less to do while the client's data is frozen; READY again when done.
            self._start_work(Regenerate(self.until), now)
            return
        if self.state is _S.PREPARED:
            self._actions.append(Send(answer=self._answer(Phase.PREPARE, Status.READY)))
            return
        self._actions.append(Send())  # nothing new yet: the answer comes with the work

    def _on_commit(self, request: Request, now: float) -> None:
        if self.state in (_S.RESTORED, _S.LIVE):
            if commit_identity(request) != self.committed:
                raise RemoteError("a COMMIT with other positions than the one already made")
            self._step(_SE.COMMIT, RemoteError)
            self._actions.append(Send(answer=self._answer(Phase.COMMIT, Status.READY)))
            return
        if self.state is _S.FAILED:
            self._step(_SE.COMMIT, RemoteError)
            assert self.failure is not None
            status, detail = self.failure
            self._actions.append(Send(answer=self._answer(Phase.COMMIT, status, detail)))
            return
        if self.state in (_S.COMMIT_QUEUED, _S.COMMITTING):
            self._step(_SE.COMMIT, RemoteError)
            self._actions.append(Send())  # answered when the work is done
            return
        if request.replay_from != self.prepare.c2s_sent:
            raise RemoteError(
                f"commit replay starts at {request.replay_from}, prepared up to "
                f"{self.prepare.c2s_sent}"
            )
        previous = self.state
        self._step(_SE.COMMIT, RemoteError)
        self.commit = request
        self.commit_received_at = now
        self.until = max(self.until, request.s2c_received)
        if previous is _S.PREPARED:
            self._start_work(Restore(request), now)

    def _start_relay(
        self,
        event: ServerEvent,
        gate_open: bool,
        error: type[HandoverError],
        client_window: int | None = None,
    ) -> None:
        if not gate_open:
            self._step(_SE.GATE_CLOSED, error)
            self._actions.append(Release("closed_gate", "behind a closed gate"))
            return
        self._step(event, error)
        self.restored_at = self.go_deadline = None
        self._actions.append(StartRelay(client_window))

    def _fail(self, previous: ServerState, status: Status, detail: str) -> None:
        self.failure = (status, detail)
        self._actions.append(Release("failed", f"{status.name.lower()}: {detail}"))
        if previous is _S.PREPARING:
            self._actions.append(Send(answer=self._answer(Phase.PREPARE, status, detail)))
        else:  # a COMMIT waits for the outcome
            self._actions.append(Send(answer=self._answer(Phase.COMMIT, status, detail)))

    def _start_work(self, work: Prepare | Regenerate | Restore, now: float) -> None:
        self.working_since = now
        self._actions.append(work)

    def _answer(self, phase: Phase, status: Status, detail: str = "") -> Answer:
        return Answer(phase, self.prepare.client_port, status, detail)

    def _step(self, event: ServerEvent, error: type[HandoverError]) -> None:
        following = SERVER_TRANSITIONS[self.state].get(event)
        if following is None:
            raise error(f"server: {event.value} is not allowed while {self.state.value}")
        self.state = following


# -- the client -----------------------------------------------------------------------------------


class ClientState(Enum):
    PREPARING = "preparing"  # PREPARE sent, no READY yet (retried)
    PREPARED = "prepared"  # READY to the PREPARE
    COMMITTING = "committing"  # frozen; COMMIT sent, no answer yet (retried)
    COMMITTED = "committed"  # READY to the COMMIT: a socket waits at the new server
    MIGRATED = "migrated"  # switched and GO sent (terminal)
    RESET = "reset"  # could not follow: destroyed (terminal)
    CLOSED = "closed"  # ended before the hand-over: nothing to move (terminal)


class ClientEvent(Enum):
    READY = "READY"  # the answer to the current phase's request
    REFUSED = "not READY"  # DIVERGED, REFUSED or FAILED
    REFRESH = "refresh"  # the client's position just before the boundary
    REPREPARE = "refresh with a newer checkpoint"  # the server replaces its preparation
    COMMIT = "commit"  # frozen: the final positions
    NOTHING_TO_COMMIT = "commit without positions"  # frozen, but the replay is incomplete
    MISSED = "frozen too late for the window"  # MISSED_WINDOW_S past the give-up time
    UNVERIFIABLE = "frozen with no checkpoint of the bytes received"  # the server would refuse
    WINDOW_CLOSED = "the window closed before the switch"  # the new server refuses the GO
    SWITCHED = "switched"  # the rewrite points at the new server
    ENDED = "ended"  # the connection closed on its own
    TIMEOUT = "timeout"  # a retry is due
    DEADLINE = "deadline"  # no answer in time: give up (ABORT) and reset


_C = ClientState
_CE = ClientEvent

CLIENT_TRANSITIONS: dict[ClientState, dict[ClientEvent, ClientState]] = {
    _C.PREPARING: {
        _CE.READY: _C.PREPARED,
        _CE.REFUSED: _C.RESET,
        _CE.REFRESH: _C.PREPARING,
        _CE.REPREPARE: _C.PREPARING,
        _CE.TIMEOUT: _C.PREPARING,  # a retry
        _CE.DEADLINE: _C.RESET,
        _CE.ENDED: _C.CLOSED,
        _CE.COMMIT: _C.RESET,  # frozen before READY: "no answer to the prepare"
        _CE.SWITCHED: _C.RESET,
    },
    _C.PREPARED: {
        _CE.READY: _C.PREPARED,  # a refreshed PREPARE answered again
        _CE.REFUSED: _C.RESET,  # a refresh failed at the server
        _CE.REFRESH: _C.PREPARED,
        _CE.REPREPARE: _C.PREPARING,
        _CE.COMMIT: _C.COMMITTING,
        _CE.NOTHING_TO_COMMIT: _C.RESET,
        _CE.MISSED: _C.RESET,
        _CE.UNVERIFIABLE: _C.RESET,
        _CE.ENDED: _C.CLOSED,
        _CE.SWITCHED: _C.RESET,
        _CE.TIMEOUT: _C.PREPARED,
    },
    _C.COMMITTING: {
        _CE.READY: _C.COMMITTED,
        _CE.REFUSED: _C.RESET,
        _CE.TIMEOUT: _C.COMMITTING,  # a retry
        _CE.DEADLINE: _C.RESET,
        _CE.ENDED: _C.CLOSED,
        _CE.SWITCHED: _C.RESET,
    },
    _C.COMMITTED: {
        _CE.READY: _C.COMMITTED,  # a repeated COMMIT's answer
        _CE.SWITCHED: _C.MIGRATED,
        _CE.WINDOW_CLOSED: _C.RESET,  # held for the next roam (``window_closed``)
        _CE.ENDED: _C.COMMITTED,  # the old socket's end is moot: it lives at the new server
        _CE.TIMEOUT: _C.COMMITTED,
    },
    # Late answers (to an earlier phase, or repeats) change nothing once the outcome is known.
    _C.MIGRATED: {_CE.READY: _C.MIGRATED, _CE.REFUSED: _C.MIGRATED, _CE.TIMEOUT: _C.MIGRATED},
    _C.RESET: {_CE.READY: _C.RESET, _CE.REFUSED: _C.RESET, _CE.TIMEOUT: _C.RESET},
    _C.CLOSED: {_CE.READY: _C.CLOSED, _CE.REFUSED: _C.CLOSED, _CE.TIMEOUT: _C.CLOSED},
}

CLIENT_INITIAL = ClientState.PREPARING
CLIENT_FINAL = frozenset({_C.MIGRATED, _C.RESET, _C.CLOSED})


@dataclass
class ClientHandover:
    """The client's side of one connection's hand-over, from its PREPARE on.

    ``deadline`` is when PREPARE answers stop being awaited (the roam's, see the timing
    contract); the COMMIT's answers are awaited ``commit_timeout`` after the COMMIT."""

    request: Request  # the PREPARE as sent (repeats reuse it)
    checkpoint_s2c: int  # the service's position in its checkpoint
    deadline: float
    now: float
    commit_timeout: float = DEFAULT_COMMIT_TIMEOUT_S
    state: ClientState = CLIENT_INITIAL
    reason: str = ""
    failed_as: str = "failed"  # the outcome logged for a reset: failed, diverged, refused...
    # Reset because the new server could not prepare the connection in its window (no answer
    # to the PREPARE by the freeze): nothing of it was created there and its checkpoint still
    # holds, so it may be held for the next roam instead (client_shim.roams.defer_unanswered).
    movable_later: bool = False
    commit_request: Request | None = None
    replayed: int = 0
    _retry_at: float = 0.0
    _commit_deadline: float = 0.0
    _actions: list[Action] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.replayed = len(self.request.replay)
        self._send(self.request, self.now, PREPARE_RETRY_S)

    @property
    def port(self) -> int:
        return self.request.client_port

    @property
    def prepared_sent(self) -> int:
        return self.request.c2s_sent

    @property
    def waiting(self) -> bool:
        """Whether an answer is still awaited (the roam waits for these)."""
        return self.state in (_C.PREPARING, _C.COMMITTING)

    @property
    def final(self) -> bool:
        return self.state in CLIENT_FINAL

    @property
    def outcome(self) -> str:
        """The hand-over's outcome as logged: pending, migrated, closed, failed, or the
        server's status (diverged, refused) or why the connection could not follow."""
        if self.state is _C.MIGRATED:
            return "migrated"
        if self.state is _C.CLOSED:
            return "closed"
        if self.state is _C.RESET:
            return self.failed_as
        return "pending"

    # -- inputs ---------------------------------------------------------------------------------

    def receive(self, answer: Answer, now: float) -> None:
        if answer.client_port != self.port:
            raise LocalError(f"client: an answer for port {answer.client_port} fed to {self.port}")
        expected = Phase.COMMIT if self.state in (_C.COMMITTING, _C.COMMITTED) else Phase.PREPARE
        if answer.phase is not expected:
            if (
                self.state in CLIENT_FINAL
                or (answer.phase is Phase.PREPARE and self.state in (_C.COMMITTING, _C.COMMITTED))
                # This machine sent no COMMIT: the answer is to a COMMIT of the connection's
                # previous hand-over (retried, answered twice, the copy arriving a roam late).
                or (answer.phase is Phase.COMMIT and self.commit_request is None)
            ):
                return  # a late answer to an earlier phase or hand-over: moot
            raise RemoteError(f"client: an answer to {answer.phase.name} while {self.state.value}")
        if answer.status is Status.READY:
            self._step(_CE.READY, RemoteError)
            return
        was = self.state
        self._step(_CE.REFUSED, RemoteError)
        if was not in CLIENT_FINAL:
            # The server released what it held when its work failed; a COMMIT it refused
            # (REFUSED, LATE) leaves the preparation held there: freed at once by the ABORT.
            held = was is _C.COMMITTING and answer.status in (Status.REFUSED, Status.LATE)
            self._give_up(answer.detail, abort=held, outcome=answer.status.name.lower())
            # A LATE one restored nothing there (refused before any work) and may wait for
            # the next roam, as an unanswered PREPARE does: a roam into a short epoch that
            # the hand-over outlasted (hundreds of busy connections) then pauses them for an
            # epoch instead of resetting them. (Tried on 2026-12-05, on a machine three times
            # slower, it made an overloaded pool collapse; docs/benchmarks.md has both runs.)
            self.movable_later = was is _C.COMMITTING and answer.status is Status.LATE

    def refresh(
        self, s2c_received: int, c2s_sent: int, newer: Request | None, newer_s2c: int, now: float
    ) -> None:
        """The client's position just before the boundary. ``newer``: a PREPARE built on the
        newest checkpoint (at service position ``newer_s2c``), if it differs from the one
        sent."""
        reprepare = newer is not None and (
            self.checkpoint_s2c == 0 < s2c_received
            or (
                sealed_has_range(newer.checkpoint)
                and (
                    not sealed_has_range(self.request.checkpoint)
                    or newer_s2c - self.request.s2c_received >= REPREPARE_GAIN_BYTES
                )
            )
        )
        self._step(_CE.REPREPARE if reprepare else _CE.REFRESH, LocalError)
        if reprepare and newer is not None:
            # The response began after the checkpoint the PREPARE carried, which commits to
            # none of it: the new server could not verify what the client now has. Or the
            # newer one has a range record (its response's head had not passed yet, or it is
            # far past what the server regenerated): the new server then reads a window
            # instead of the response from its start or from the first PREPARE's position.
            # Prepare again with the newer one (the server replaces the first).
            self.request = newer
            self.checkpoint_s2c = newer_s2c
            self.replayed = len(newer.replay)
            self._send(newer, now, PREPARE_RETRY_S)
            return
        if c2s_sent == self.request.c2s_sent:
            # Only bytes answering the replayed requests can be regenerated: report the new
            # position only while the client has sent nothing since (a keep-alive client
            # sends the next request at once; then the COMMIT carries both).
            self.request = _with_received(
                self.request, max(s2c_received, self.request.s2c_received)
            )
        self._send(self.request, now, PREPARE_RETRY_S)

    def wait_until(self, deadline: float) -> None:
        """PREPARE answers are awaited until ``deadline`` (known only at the boundary)."""
        self.deadline = deadline

    def freeze(
        self, commit: Request | None, why_not: str, now: float, until: float | None = None
    ) -> None:
        """The connection is frozen: commit with ``commit`` (its final positions), or reset
        because there is none (``why_not``). Its answer is awaited ``commit_timeout``, but not
        past ``until`` (when the new server's window closes: a READY after it would be of no
        use, the switch then holding the connection for the next roam)."""
        if self.state is _C.PREPARING:
            self._step(_CE.COMMIT, LocalError)
            self._hold_for_next_roam(abort=True)
            return
        self._step(_CE.COMMIT if commit is not None else _CE.NOTHING_TO_COMMIT, LocalError)
        if commit is None:
            self._give_up(why_not, abort=True, outcome="unmigratable")
            return
        self.commit_request = commit
        self.replayed += len(commit.replay)
        self._commit_deadline = now + self.commit_timeout
        if until is not None:
            self._commit_deadline = max(now, min(self._commit_deadline, until))
        self._send(commit, now, COMMIT_RETRY_S)

    def missed_window(self, late_by: float) -> None:
        """Frozen ``late_by`` seconds after the hand-over's give-up time (at least
        ``MISSED_WINDOW_S``): no COMMIT, which the new server would refuse as LATE. Nothing was
        restored there, so the connection may wait for the next roam (ABORT frees what the
        server prepared)."""
        self._step(_CE.MISSED, LocalError)
        reason = f"frozen {late_by:.2f} s after the hand-over's give-up time (a stalled host)"
        self._hold_for_next_roam(abort=True, reason=reason)

    def unverifiable(self, received: int) -> None:
        """Frozen with a checkpoint that commits to none of the service's bytes while the
        client has ``received`` of them: a connection prepared before its first bytes, whose
        server had not pushed a checkpoint covering them by the freeze. The new server could
        only refuse its COMMIT (unverifiable) and reset it. Nothing was restored there, and the
        old server's next checkpoint covers those bytes: held for the next roam (the ABORT
        frees the preparation)."""
        self._step(_CE.UNVERIFIABLE, LocalError)
        reason = f"frozen before a checkpoint covered any of the {received} bytes received"
        self._hold_for_next_roam(abort=True, reason=reason)

    def window_closed(self, late_by: float) -> None:
        """Committed, but the switch comes ``late_by`` seconds after the new server's window
        closed (a hand-over longer than the epoch): that server's gate is closed or closing,
        and a GO would meet no socket there, or one it leaves at once. The restored socket
        never spoke (ABORT frees it) and the checkpoint still holds, so the connection may
        wait for the next roam."""
        self._step(_CE.WINDOW_CLOSED, LocalError)
        reason = f"the new server's window closed {late_by:.2f} s before the switch"
        self._hold_for_next_roam(abort=True, reason=reason)

    def ended(self) -> None:
        """The connection closed on its own (its socket is gone)."""
        self._step(_CE.ENDED, LocalError)
        if self.state is _C.CLOSED:
            self.reason = "ended before the hand-over"
            self._actions.append(self._abort_request())

    def switched(self, now: float, window: int | None = None) -> None:
        """The rewrite points at the new server now. ``window``: the connection's receive
        window (bytes; None if the kernel does not say), which GO carries: read in the freeze, or
        after the switch if it was small then (``client_shim.roams.low_window``)."""
        was = self.state
        self._step(_CE.SWITCHED, LocalError)
        if self.state is _C.MIGRATED:
            go = Request(Phase.GO, self.request.epoch, self.port, self.request.vport, 0, 0, 0,
                         b"", b"", window=window)  # fmt: skip
            self._actions.append(Send(request=go))
        elif was is _C.COMMITTING:
            self._hold_for_next_roam(abort=True, reason=NO_COMMIT_ANSWER)
        elif was is _C.PREPARED:  # answered but never frozen: nothing restored there either
            self._hold_for_next_roam(abort=True, reason=NEVER_COMMITTED)
        elif was not in CLIENT_FINAL:  # never frozen: nothing was restored at the new server
            self._hold_for_next_roam(abort=False)

    def handle_timer(self, now: float) -> None:
        timer = self.get_timer()
        if timer is None or now < timer:
            return
        phase = "commit" if self.state is _C.COMMITTING else "prepare"
        deadline = self._commit_deadline if phase == "commit" else self.deadline
        if now >= deadline:
            self._step(_CE.DEADLINE, LocalError)
            if phase == "prepare":
                self._hold_for_next_roam(abort=True)
            else:
                self._hold_for_next_roam(abort=True, reason=NO_COMMIT_ANSWER)
            return
        self._step(_CE.TIMEOUT, LocalError)
        if phase == "prepare":
            self._send(self.request, now, PREPARE_RETRY_S)
        else:
            assert self.commit_request is not None
            self._send(self.commit_request, now, COMMIT_RETRY_S)

    # -- outputs --------------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def get_timer(self) -> float | None:
        if self.state is _C.PREPARING:
            return min(self._retry_at, self.deadline)
        if self.state is _C.COMMITTING:
            return min(self._retry_at, self._commit_deadline)
        return None

    # -- internals ------------------------------------------------------------------------------

    def _send(self, request: Request, now: float, retry: float) -> None:
        self._retry_at = now + retry
        self._actions.append(Send(request=request))

    def _give_up(self, reason: str, *, abort: bool, outcome: str = "failed") -> None:
        """Reset the connection; if the server may hold something for it, tell it (ABORT)."""
        assert self.state is _C.RESET
        self.reason = reason
        self.failed_as = outcome
        if abort:
            self._actions.append(self._abort_request())
        self._actions.append(Reset(reason))

    def _hold_for_next_roam(self, *, abort: bool, reason: str = NO_PREPARE_ANSWER) -> None:
        """Given up for this roam, held for the next: nothing of the connection was started at
        the new server. No answer to the PREPARE (by its deadline, the freeze or the switch),
        one never committed, or restored there but never started (an unanswered COMMIT, a
        switch after the window: the ABORT frees it)."""
        self._give_up(reason, abort=abort)
        self.movable_later = True

    def _abort_request(self) -> Send:
        abort = Request(Phase.ABORT, self.request.epoch, self.port, self.request.vport, 0, 0, 0,
                        b"", b"")  # fmt: skip
        return Send(request=abort)

    def _step(self, event: ClientEvent, error: type[HandoverError]) -> None:
        following = CLIENT_TRANSITIONS[self.state].get(event)
        if following is None:
            raise error(f"client: {event.value} is not allowed while {self.state.value}")
        self.state = following


@dataclass(frozen=True, slots=True)
class NotMoved:
    """A connection of the roam that had no hand-over at all (no checkpoint yet, opened before
    the shim, replay bytes incomplete): it is reset after the switch, unless ``movable_later``
    and held for the next roam (client_shim.roams.defer_unanswered)."""

    port: int
    outcome: str
    reason: str
    replayed: int = 0
    state: ClientState = ClientState.RESET
    # Only its first checkpoint is missing: its server pushes one as it leaves, or as it
    # gets to a connection it accepted late (a busy host), and the next roam may move it.
    movable_later: bool = False


def _with_received(request: Request, s2c_received: int) -> Request:
    return Request(
        request.phase,
        request.epoch,
        request.client_port,
        request.vport,
        request.c2s_sent,
        s2c_received,
        request.replay_from,
        request.checkpoint,
        request.replay,
        request.streamed,
    )


def describe_tables() -> str:
    """Both tables as text, one transition a line."""
    lines = []
    for side, table in (("server", SERVER_TRANSITIONS), ("client", CLIENT_TRANSITIONS)):
        lines.append(f"{side}:")
        for state, moves in table.items():
            for event, following in moves.items():
                lines.append(f"  {state.value:>13} --{event.value}--> {following.value}")
    return "\n".join(lines)


def mermaid(side: str) -> str:
    """One side's table as a mermaid state diagram: docs/protocol.md's diagrams are these
    strings (tests/unit/test_handover.py keeps them equal)."""
    table: dict[Any, dict[Any, Any]] = dict(
        SERVER_TRANSITIONS if side == "server" else CLIENT_TRANSITIONS
    )
    initial = SERVER_INITIAL if side == "server" else CLIENT_INITIAL
    lines = ["stateDiagram-v2", f"    [*] --> {initial.name}"]
    for state, moves in table.items():
        targets: dict[str, list[str]] = {}
        for event, following in moves.items():
            targets.setdefault(following.name, []).append(event.value)
        for following, events in targets.items():
            lines.append(f"    {state.name} --> {following}: {', '.join(events)}")
        if not moves or state in CLIENT_FINAL or state in SERVER_FINAL:
            lines.append(f"    {state.name} --> [*]")
    return "\n".join(lines)
