"""Live migration on the server (``--migration live``): the executor of the hand-over.

Theory of operation: ``proxy.checkpoints`` relays every accepted connection and pushes its
checkpoints to the client. This module serves the migration port: each datagram is opened with
the client's key, checked (``_check_sender``, ``_admit``: migrate.reincarnation and the
per-client meter of migrate.admission), and fed to the re-incarnation's ``ServerHandover``
(migrate.handover), which decides everything else. The actions it returns are executed here:
the work (``proxy.replay``) runs as a task whose end is fed back, answers are sealed and sent,
a restored socket becomes a live connection at ``StartRelay``, and ``Release`` frees what a
re-incarnation held. Timers (the work's, GO's, the pending TTL) are the machines' own, looked at
every checkpoint round.
"""

from __future__ import annotations

import asyncio
import contextlib

from migrate.admission import MigrationMeter
from migrate.channel import Opened, Opener
from migrate.checkpoint import stream_hash_key
from migrate.errors import AuthenticationError, RoamError, WindowClosedError
from migrate.gowait import CommitAnswers
from migrate.handover import (
    DEFAULT_COMMIT_TIMEOUT_S,
    PENDING_TTL_S,
    Release,
    Restore,
    Send,
    ServerHandover,
    ServerState,
    StartRelay,
    commit_identity,
)
from migrate.handover import Prepare as PrepareWork
from migrate.handover import Regenerate as RegenerateWork
from migrate.kernel.orphans import destroy_orphans
from migrate.kernel.udp import bind_exclusive, datagram_socket
from migrate.rangeplan import regeneration_bytes
from migrate.registration import ClientRecord
from migrate.reincarnation import Answer, Phase, Request, Status
from proxy.checkpoints import CheckpointPusher, log_internal_error
from proxy.livecontext import LiveContext
from proxy.migration_port import MigrationPort, MigrationProtocol, count_states
from proxy.relay import RelayFactory
from proxy.replay import Replayer
from proxy.work import Key, Pending, Work, Workshop

MAX_FINISHED_KEPT = 4096  # failed and aborted preparations remembered (bounded memory)
UNCOMMITTED = (ServerState.PREPARING, ServerState.PREPARED)  # a COMMIT still changes these


class LiveMode:
    """Checkpoints and re-incarnations for one server shim."""

    name = "live"

    def __init__(self, context: LiveContext) -> None:
        self.context = context
        self.pusher = CheckpointPusher(context)
        self.meter = MigrationMeter(context.max_pending_per_client, context.max_replay)
        self.pending: dict[Key, Pending] = {}
        # Failed and aborted re-incarnations, for the repeats that may still come (bounded).
        self.finished: dict[Key, ServerHandover] = {}
        self.commit_answers = CommitAnswers()  # the wait for GO (migrate.gowait)
        self.counts = dict.fromkeys(
            ("admitted", "ready", "diverged", "refused", "failed", "repeated", "cover"), 0
        )
        self.port = MigrationPort(
            context, self.pusher.keys, self.counts, self.pusher.connections.keys
        )
        self.workshop = Workshop(context, self.meter, self.port, self.counts, self.pusher.evict)
        self._task: asyncio.Task[None] | None = None
        self._stream_server: asyncio.Server | None = None

    # -- the migration-mode interface (proxy.modes) -------------------------------------------

    leave_event = "connections_left"

    def relay_factory(self) -> RelayFactory:
        return self.pusher.relay_factory

    def leave(self) -> int:
        """The gate closed behind the service: drop every connection silently. Prepared
        re-incarnations stay: they are for a later epoch on this server."""
        return self.pusher.leave()

    async def start(self) -> None:
        context = self.context
        # A dead predecessor's connections on our address (no instance in unit tests).
        instance = context.instance
        if instance and (
            destroyed := await asyncio.to_thread(destroy_orphans, context.listen, instance)
        ):
            context.log.event("orphans_destroyed", count=destroyed)
        sock = datagram_socket()
        try:
            bind_exclusive(
                sock, (context.listen[0], context.migration_port), "re-incarnation requests"
            )
        except RoamError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self.port.transport, _ = await loop.create_datagram_endpoint(
            lambda: MigrationProtocol(self.on_datagram), sock=sock
        )
        # The replay stream (migrate.replaystream): TCP on the migration port's number.
        self._stream_server = await asyncio.start_server(
            self.port.serve_stream, context.listen[0], context.migration_port
        )
        self._task = loop.create_task(self._round_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for key in list(self.pending):
            self._release(key, self.pending[key], Release("stopped", "the shim stops"))
        if self._stream_server is not None:
            self._stream_server.close()
        if self.port.transport is not None:
            self.port.transport.close()
        self.pusher.close()

    def status(self) -> dict[str, object]:
        return {
            "pending": len(self.pending),
            "replay_stream_held": self.port.buffers.total,
            "pending_by_state": count_states(p.machine.state for p in self.pending.values()),
            # Per client id: what the meter holds (issue 12, finding 3).
            "pending_by_client": {
                str(client): self.meter.pending_of(client)
                for client in sorted(self.meter.clients)
                if self.meter.pending_of(client)
            },
            **self.pusher.status(),
            **self.counts,
        }

    # -- rounds: checkpoints and the machines' timers ---------------------------------------

    async def _round_loop(self) -> None:
        while True:
            await asyncio.sleep(self.pusher.next_round_in(self.context.clock()))
            try:
                now = self.context.clock()
                self.pusher.round(now)
                self.handle_timers(now)
            except Exception as error:  # a bug of ours must not stop every connection's pushes
                log_internal_error(self.context, "checkpoints", error)

    def handle_timers(self, now: float) -> None:
        # Streamed replay bytes nobody's hand-over took (the client gave up before its PREPARE).
        self.port.buffers.expire(now, PENDING_TTL_S)
        self.port.answer_due(now)  # packed cells waiting for a slow request's answer
        for key, pending in list(self.pending.items()):
            timer = pending.machine.get_timer()
            if timer is not None and now >= timer:
                if self.commit_answers.postpone(pending.machine, now):
                    continue  # its client is still being answered: it has not switched yet
                gate = not self.port.start_behind_closed_gate(pending.machine.prepare.epoch)
                if pending.machine.state is ServerState.RESTORED:
                    # The client switched long ago, but its GO never came: started anyway.
                    self.context.log.event(
                        "go_timeout", level="warning", client=f"{key[0]}:{key[1]}"
                    )
                pending.machine.handle_timer(now, gate_open=gate)
                self._execute(key, pending)

    # -- datagrams ---------------------------------------------------------------------------

    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        try:
            opened = self.port.open(data, source)
            if opened is None:
                return  # cover, answered with cover
            record, opener, message, requests = opened
            if len(requests) > 1:
                self._on_packed(record, message, opener, requests, source)
                return
            request = requests[0]
            key = (source[0], request.client_port)
            request = self.port.with_streamed(record, request)
            self._on_request(key, record, message, opener, request, source)
        except RoamError as error:
            self.port.reject(source, error)

    def _on_packed(
        self,
        record: ClientRecord,
        opened: Opened,
        opener: Opener,
        requests: list[Request],
        source: tuple[str, int],
    ) -> None:
        """A packed cell (migrate.cover): one replay record, each request worked on as if it
        came alone, one answer cell (cover for GOs and ABORTs; PREPAREs' or COMMITs' answers,
        now or when their work ends, gathered: migrate.gathering)."""
        opener.accept(opened)
        gatherer = self.port.gatherer
        cell = self.port.gather(record, requests, source, opened)
        for request in requests:
            gatherer.enter(cell, request.client_port)
            try:
                streamed = self.port.with_streamed(record, request)
                key = (source[0], request.client_port)
                self._on_request(key, record, opened, opener, streamed, source)
            except RoamError as error:  # one refused request does not stop its neighbours
                gatherer.refused(cell, request.client_port)
                self.port.reject(source, error)
            finally:
                gatherer.leave()
        if cell.complete:
            self.port.answer_cell(cell)

    def _on_request(
        self,
        key: Key,
        record: ClientRecord,
        opened: Opened,
        opener: Opener,
        request: Request,
        source: tuple[str, int],
    ) -> None:
        pending = self._bound_pending(key, record, request)  # refused before recorded as seen
        if request.phase is Phase.PREPARE:
            self._on_prepare(key, pending, opened, opener, request, record, source)
            return
        if request.phase is Phase.COMMIT:
            self.commit_answers.note(record.client_id, request.epoch, self.context.clock())
            self._on_commit(key, pending, opened, opener, request, record, source)
            return
        opener.accept(opened)
        try:
            self._go_or_abort(key, record, request, pending)
        finally:
            self.port.send(record, None, source)  # nobody waits for it; cover has one

    def _bound_pending(self, key: Key, record: ClientRecord, request: Request) -> Pending | None:
        pending = self.pending.get(key)
        if pending is not None and pending.machine.client_id != record.client_id:
            # Bound to the client of the PREPARE: nobody else commits, starts or aborts it.
            raise AuthenticationError(
                f"{request.phase.name} from client {record.client_id} for a re-incarnation "
                f"prepared by client {pending.machine.client_id}"
            )
        return pending

    def _go_or_abort(
        self, key: Key, record: ClientRecord, request: Request, pending: Pending | None
    ) -> None:
        machine = pending.machine if pending is not None else self._live_machine(key, record)
        if machine is None:
            return  # nobody waits for an answer to a GO or ABORT
        gate = pending is None or not self.port.start_behind_closed_gate(request.epoch)
        machine.receive(request, self.context.clock(), gate_open=gate)
        if pending is not None:
            self._execute(key, pending)

    def _on_prepare(
        self,
        key: Key,
        existing: Pending | None,
        opened: Opened,
        opener: Opener,
        request: Request,
        record: ClientRecord,
        source: tuple[str, int],
    ) -> None:
        # A refusal (RoamError) is not answered: answers name no request, and an outsider can
        # replay the client's captured PREPARE, from its spoofed address, to a server that
        # refuses it; an authentic REFUSED would then fail the client's real preparation of
        # that connection (tests/system/test_crafted_server.py caught it).
        now = self.context.clock()
        admitted = self.port.admit(opened, request, record, source[0])
        checkpoint = admitted.checkpoint
        if existing is not None and existing.machine.repeats(request):
            self.meter.extend(
                record.client_id,
                replay_bytes=0,
                regenerate_bytes=max(0, request.s2c_received - existing.machine.until),
                now=now,
            )
            opener.accept(opened)
            existing.reply_to = source
            existing.machine.receive(request, now)
            self._execute(key, existing)
            return
        done = self._done_machine(key, record) if existing is None else None
        if done is not None and done.repeats(request):
            # A late copy of a PREPARE whose re-incarnation failed, was aborted or went live:
            # answered from the outcome, never worked on again.
            opener.accept(opened)
            self.port.answer_from(done, request, record, source)
            return
        held = existing.admitted.checkpoint if existing is not None else None
        if (
            held is not None
            and held.conn_id == checkpoint.conn_id
            and checkpoint.counter < held.counter
        ):
            raise RoamError(
                f"checkpoint {checkpoint.counter} is older than the one being prepared "
                f"({held.counter})"
            )
        replayer = Replayer(
            checkpoint,
            request,
            stream_hash_key(self.context.group_key, checkpoint.conn_id),
            replay_limit=self.context.max_replay,
            range_bodies=self.context.range_bodies,
        )
        self.meter.admit(
            record.client_id,
            key,
            replay_bytes=len(request.replay),
            # Up to the client's claim, and at least to the checkpoint's position; from the
            # client's position's window when a range is replayed (what is read, not the
            # position: a client 200 MiB into a download costs a window).
            regenerate_bytes=regeneration_bytes(
                checkpoint, request.replay, request.s2c_received, replayer.plan
            ),
            rate_kbit=record.rate_kbit,
            now=now,
        )
        opener.accept(opened)
        if existing is not None:
            existing.machine.replaced()
            self._execute(key, existing, keep_accounted=True)
        self.finished.pop(key, None)
        self.counts["admitted"] += 1
        machine = ServerHandover(request, now, record.client_id)
        pending = Pending(machine, admitted, replayer, record, source)
        self.pending[key] = pending
        self._execute(key, pending)

    def _on_commit(
        self,
        key: Key,
        pending: Pending | None,
        opened: Opened,
        opener: Opener,
        request: Request,
        record: ClientRecord,
        source: tuple[str, int],
    ) -> None:
        machine = pending.machine if pending is not None else None
        try:
            # The COMMIT's checkpoint, epoch and window are checked like a PREPARE's, and the
            # gate must be open: a connection created behind a closed gate would never leave.
            admitted = self.port.admit(opened, request, record, source[0])
            if self.port.behind_closed_gate(request.epoch):
                raise RoamError("this server's gate is closed: no connection is created here")
            if pending is not None and machine is not None:
                if admitted.checkpoint.conn_id != pending.admitted.checkpoint.conn_id:
                    raise AuthenticationError(
                        "the COMMIT's checkpoint is of another connection than its PREPARE's"
                    )
                if machine.state in UNCOMMITTED:
                    self.meter.extend(
                        record.client_id,
                        replay_bytes=len(request.replay),
                        regenerate_bytes=pending.replayer.commit_reads(
                            request, admitted.checkpoint, machine.until
                        ),
                        now=self.context.clock(),
                    )
        except RoamError as error:
            if machine is not None and machine.state in UNCOMMITTED:
                late = isinstance(error, WindowClosedError)  # the client may hold it for later
                status = Status.LATE if late else Status.REFUSED
                answer = Answer(Phase.COMMIT, key[1], status, str(error))
                self.port.send(record, answer, source)
            raise
        opener.accept(opened)
        if pending is not None and machine is not None:
            pending.reply_to = source
            pending.commit_checkpoint = admitted.checkpoint
            try:
                machine.receive(request, self.context.clock())
            except RoamError as error:
                answer = Answer(Phase.COMMIT, key[1], Status.FAILED, str(error))
                self.port.send(record, answer, source)
                raise
            self._execute(key, pending)
            return
        # Gone live (a repeat whose answers were lost), or failed (answered with the reason).
        done = self._done_machine(key, record)
        if done is not None and (
            done.state is ServerState.RELEASED
            or (done.state is ServerState.LIVE and done.committed != commit_identity(request))
        ):
            done = None  # another COMMIT than the one done: nothing is prepared for it
        if done is not None:
            if done.state is ServerState.LIVE:
                self.counts["repeated"] += 1
                self.context.log.event(
                    "commit_repeated", client=f"{key[0]}:{key[1]}", epoch=request.epoch
                )
            self.port.answer_from(done, request, record, source)
            return
        answer = Answer(Phase.COMMIT, key[1], Status.FAILED, "no prepared re-incarnation")
        self.port.send(record, answer, source)

    def _done_machine(self, key: Key, record: ClientRecord) -> ServerHandover | None:
        """The finished re-incarnation of ``key`` (live, failed or aborted), if this client's."""
        done = self._live_machine(key, record) or self.finished.get(key)
        return done if done is not None and done.client_id == record.client_id else None

    def _live_machine(self, key: Key, record: ClientRecord) -> ServerHandover | None:
        connection = self.pusher.connections.get(key)
        if connection is None or connection.handover is None:
            return None
        if connection.handover.client_id != record.client_id:
            return None
        return connection.handover

    # -- executing the machine's actions -----------------------------------------------------

    def _execute(self, key: Key, pending: Pending, *, keep_accounted: bool = False) -> None:
        for action in pending.machine.actions():
            if isinstance(action, Send):
                self.port.send(pending.record, action.answer, pending.reply_to)
            elif isinstance(action, PrepareWork | RegenerateWork | Restore):
                pending.task = asyncio.get_running_loop().create_task(
                    self._work(key, pending, action)
                )
            elif isinstance(action, StartRelay):
                self._start_relay(key, pending, action.client_window)
            elif isinstance(action, Release):
                self._release(key, pending, action, keep_accounted=keep_accounted)

    async def _work(self, key: Key, pending: Pending, work: Work) -> None:
        if await self.workshop.run(key, pending, work):
            self.commit_answers.saw(pending.machine)  # restored: its READY is answered now
            self._execute(key, pending)

    def _start_relay(self, key: Key, pending: Pending, client_window: int | None) -> None:
        """GO (or its timeout): the restored socket becomes a live connection."""
        del self.pending[key]
        self.meter.release(key)
        # Kept a little: a repeated COMMIT (its READY lost) still finds its streamed bytes.
        self.port.buffers.retire(
            pending.machine.client_id, key[1], self.context.clock(), DEFAULT_COMMIT_TIMEOUT_S
        )
        sock, service, unsent = pending.replayer.hand_over(client_window)
        self.pusher.reincarnated(
            key,
            pending.replayer.checkpoint,  # the COMMIT's, if the replay started again from it
            pending.admitted.record,
            (sock, service, unsent),
            pending.replayer.stream,
            pending.replayer.s2c_base,
            pending.machine,
            pending.replayer.work(),
        )

    def _release(
        self, key: Key, pending: Pending, release: Release, *, keep_accounted: bool = False
    ) -> None:
        """Free what a re-incarnation held (silently: its socket never spoke)."""
        if self.pending.get(key) is pending:
            del self.pending[key]
            if not keep_accounted:
                self.meter.release(key)
                self.port.buffers.drop(pending.machine.client_id, key[1])
        task = pending.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        pending.replayer.close()
        client = f"{key[0]}:{key[1]}"
        log = self.context.log
        if release.kind in ("failed", "aborted"):
            self.finished[key] = pending.machine
            while len(self.finished) > MAX_FINISHED_KEPT:
                del self.finished[next(iter(self.finished))]
        if release.kind == "failed" and pending.machine.failure is not None:
            status, detail = pending.machine.failure
            log.event(
                "reincarnation_failed",
                level="warning",
                client=client,
                status=status.name.lower(),
                reason=detail,
            )
        elif release.kind == "expired":
            log.event("reincarnation_expired", client=client)
        elif release.kind == "closed_gate":
            log.event("reincarnation_refused_closed_gate", client=client)
        elif release.kind == "aborted":
            log.event("reincarnation_aborted", client=client)
