"""Live migration on the server: checkpoints out, re-incarnations in (``--migration live``).

Theory of operation:

* Every accepted connection is relayed in copy mode so that ``migrate.streamstate`` sees
  both byte streams. Right after accept the shim reads the handshake's sequence numbers and
  options through TCP_REPAIR (``accept_facts``).
* Checkpoints go to the client periodically (each connection on its own phase, from its
  start), at every request boundary the codec finds, and once more 120 ms before this server
  stops being the active one. Each is sealed with the pool's checkpoint key, wrapped in a
  carrier sealed for the client, and sent as one TCP segment on the connection's own 5-tuple,
  marked with the carrier option and numbered *before* the server's ISN, so that a client
  without the shim would discard it as an old duplicate.
* Re-incarnation requests (``migrate.reincarnation``) arrive on the migration port. A PREPARE
  that passes ``admit`` opens a fresh connection to the service (from the client's address),
  replays the log and regenerates the response up to the client's position, checking the
  commitment; a COMMIT finishes the replay and creates the client-facing socket with
  TCP_REPAIR at the client's sequence numbers; a GO (the client has switched its rewrite)
  starts the relay. Until GO the new socket stays silent: a segment reaching the client before
  its switch would be answered with a RST.
* When the gate closes behind the service, the connections still here have moved on: their
  sockets are closed in repair mode, which sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from migrate.admission import PREPARING_PER_CLIENT, MigrationMeter
from migrate.channel import Kind, Opened, Opener, Sealer
from migrate.checkpoint import (
    Carrier,
    Checkpoint,
    CheckpointKeys,
    TcpSnapshot,
    carrier_sealer,
    seal_carrier,
    seal_checkpoint,
)
from migrate.cover import ANSWER_CELL_BYTES, MIN_CELL_BYTES, cover, frame, is_framed, unframe
from migrate.errors import (
    AuthenticationError,
    MalformedMessageError,
    RevokedClientError,
    RoamError,
)
from migrate.kernel import orphans, rawtcp, tcp_repair
from migrate.kernel.udp import bind_exclusive, datagram_socket
from migrate.registration import ClientRecord
from migrate.reincarnation import (
    LATE_REQUEST_S,
    PREPARE_AHEAD_S,
    Admitted,
    Answer,
    Phase,
    Request,
    Status,
    admit,
    answer_sealer,
    client_id_of,
    in_request_window,
    request_opener,
)
from migrate.streamstate import StreamState
from proxy.relay import Copy, EndReason, Relay, RelayOutcome, close_abortively
from proxy.transparent import connect_plain, connect_transparent

if TYPE_CHECKING:
    from proxy.daemon import ServerShim

SEQ_MOD = 2**32
DEFAULT_CHECKPOINT_PERIOD = 0.5
BOUNDARY_MIN_GAP = 0.02
CHECKPOINT_RETRY_S = 0.05  # at most one boundary checkpoint per connection per 20 ms
LEAVE_PUSH_LEAD = 0.12  # push a last round of checkpoints this long before leaving
TS_MARGIN_MS = 250
PREPARE_TIMEOUT_S = 20.0
GO_TIMEOUT_S = 1.0
# Epochs a request may be from the current one (far more than PREPARE_AHEAD_S and
# LATE_REQUEST_S span with any sane epoch length; bounds the schedule walk a request costs).
MAX_EPOCH_DISTANCE = 256
REGENERATE_BUFFER_BYTES = 256 * 1024
SERVICE_IDLE_S = 5.0  # a replayed service silent this long will not produce what is missing
PREPARE_CONCURRENCY = 8
# How long a prepared re-incarnation waits for its COMMIT and GO before it is forgotten.
PENDING_TTL_S = PREPARE_AHEAD_S + PREPARE_TIMEOUT_S + 5.0
MIGRATION_PORT = 47476
MAX_FAILURES_KEPT = 4096  # failed preparations remembered for their COMMIT (bounded memory)
# A re-incarnated connection counts its checkpoints on from the presented one plus this much,
# so that its carriers outrank whatever the previous server pushed after that checkpoint
# (during the hand-over, and after the switch until its gate closed): the client keeps the
# new server's checkpoints and ignores the old server's late ones.
INCARNATION_COUNTER_STRIDE = 2**32


@dataclass(frozen=True, slots=True)
class AcceptFacts:
    server_isn: int
    client_isn: int
    mss: int
    snd_wscale: int
    rcv_wscale: int
    sack: bool
    timestamps: bool


def accept_facts(sock: socket.socket) -> AcceptFacts:
    """The handshake's ISNs and options of a just-accepted socket, read in repair mode."""
    try:
        # A consistent pair: the client's first request may arrive while they are read (a
        # burst of accepts), and a receive sequence read before it with a queue read after it
        # would put the client's ISN one request too early (every later re-incarnation of the
        # connection would then expect those bytes again, and stall).
        state, queues = tcp_repair.read_snapshot(sock)
    finally:
        tcp_repair.leave_repair(sock)
    return AcceptFacts(
        server_isn=(state.send_seq - 1 - len(queues.send)) % SEQ_MOD,
        client_isn=(state.recv_seq - 1 - len(queues.recv)) % SEQ_MOD,
        mss=state.mss,
        snd_wscale=state.snd_wscale,
        rcv_wscale=state.rcv_wscale,
        sack=state.sack,
        timestamps=state.timestamps,
    )


class LiveConnection:
    """One migratable connection on this server: relay, stream state, checkpoint schedule."""

    def __init__(
        self,
        live: LiveMode,
        client: socket.socket,
        service: socket.socket,
        peer: tuple[str, int],
        facts: AcceptFacts,
        record: ClientRecord | None,
        *,
        conn_id: bytes,
        stream: StreamState,
        counter: int = 0,
        s2c_base: int = 0,
        syn_adjust: int = 1,
        committed: tuple[int, int, int] | None = None,
    ) -> None:
        self.live = live
        self.peer = peer
        self.facts = facts
        self.record = record
        self.conn_id = conn_id
        self.stream = stream
        self.counter = counter
        self.s2c_base = s2c_base  # s2c position of the socket's first byte
        self.syn_adjust = syn_adjust  # tcpi_bytes_acked counts the SYN on accepted sockets
        self.client = client
        now = live.clock()
        self.started = now
        self.next_due = now  # the first checkpoint goes out at once
        self.last_sent = 0.0
        self.pushed_s2c = -1  # the service's position in the last checkpoint pushed
        # For a re-incarnated connection, the COMMIT that made it (see ``commit_identity``).
        self.committed = committed
        self.sealer = live.carrier_sealer(record) if record is not None else None
        self.relay = Relay(
            client,
            service,
            client_to_service=Copy(stream.feed_c2s),
            service_to_client=Copy(stream.feed_s2c),
        )

    def s2c_acked(self) -> int:
        info = tcp_repair.read_tcp_info(self.client)
        return self.s2c_base + max(0, info.bytes_acked - self.syn_adjust)

    def snapshot(self, now: float) -> Checkpoint:
        ts_val = 0
        if self.facts.timestamps:
            ts_val = tcp_repair.read_timestamp(self.client)
        tcp = TcpSnapshot(
            self.facts.server_isn,
            self.facts.client_isn,
            self.facts.mss,
            self.facts.snd_wscale,
            self.facts.rcv_wscale,
            self.facts.sack,
            self.facts.timestamps,
            ts_val,
        )
        self.counter += 1
        return self.stream.checkpoint(
            conn_id=self.conn_id,
            client=self.peer,
            vport=self.live.vport,
            epoch=self.live.current_epoch(),
            counter=self.counter,
            now=now,
            tcp=tcp,
            s2c_acked=self.s2c_acked(),
        )

    def push(self, now: float) -> None:
        """Send a checkpoint to the client on the connection's own 5-tuple."""
        if self.sealer is None or self.relay.ended:
            return
        checkpoint = self.snapshot(now)
        sealed = seal_checkpoint(
            checkpoint,
            self.live.checkpoint_keys.for_epoch(checkpoint.epoch),
            self.live.deployment_id,
            os.urandom,
        )
        message = seal_carrier(self.sealer, Carrier.of(checkpoint, sealed), now)
        listen = self.live.listen
        packet = rawtcp.build_ipv4_tcp(
            listen[0],
            self.peer[0],
            listen[1],
            self.peer[1],
            # Entirely before the server's first byte: an old duplicate to a client's TCP.
            (self.facts.server_isn - len(message)) % SEQ_MOD,
            (self.facts.client_isn + 1 + self.stream.c2s_pos) % SEQ_MOD,
            rawtcp.ACK | rawtcp.PSH,
            1024,
            [rawtcp.carrier_option()],
            message,
        )
        self.live.raw.send(packet)
        self.last_sent = now
        self.pushed_s2c = checkpoint.s2c_pos
        self.live.checkpoints_sent += 1
        period = self.live.period
        # Keep the connection's own phase: due times are start + k * period.
        elapsed = now - self.started
        self.next_due = self.started + (int(elapsed / period) + 1) * period

    def due(self, now: float) -> bool:
        if now >= self.next_due:
            return True
        # A checkpoint from before the service's first byte commits to none of its output: a
        # re-incarnation from it could not be verified. Push one as soon as bytes flowed,
        # rather than a period later, so that young connections can move too.
        first_bytes = self.pushed_s2c == 0 < self.stream.s2c_pos
        return (self.stream.boundary_due or first_bytes) and (
            now - self.last_sent >= BOUNDARY_MIN_GAP
        )

    def leave_silently(self) -> None:
        """This connection lives elsewhere now: close the client side without a word."""
        with contextlib.suppress(OSError):
            tcp_repair.enter_repair(self.client)
        self.relay.abort()


@dataclass
class Pending:
    """A re-incarnation between PREPARE and GO."""

    admitted: Admitted
    stream: StreamState
    service: socket.socket | None = None
    unsent: bytearray = field(default_factory=bytearray)
    verified: bool = False
    sock: socket.socket | None = None
    s2c_base: int = 0  # the client's position when the socket was created
    reply_to: tuple[str, int] = ("", 0)
    answer: Answer | None = None  # the PREPARE's answer, once known
    committing: bool = False
    until: int = 0  # the client's position as last reported: regenerate up to here
    connection: LiveConnection | None = None
    created: float = 0.0
    task: asyncio.Task[None] | None = None
    committed: tuple[int, int, int] | None = None  # the COMMIT answered READY: its identity
    client_id: int = 0  # the client whose PREPARE made it: only it may COMMIT, GO or ABORT

    def repeats(self, admitted: Admitted) -> bool:
        """Whether ``admitted`` asks for the same re-incarnation as this one (a retry)."""
        mine = self.admitted
        return (
            self.sock is None
            and mine.checkpoint.conn_id == admitted.checkpoint.conn_id
            and mine.checkpoint.counter == admitted.checkpoint.counter
            and mine.request.epoch == admitted.request.epoch
            and mine.request.s2c_received <= admitted.request.s2c_received
        )


def commit_identity(request: Request) -> tuple[int, int, int]:
    """What tells a repeated COMMIT from another: its epoch and the positions it froze."""
    return (request.epoch, request.s2c_received, request.c2s_sent)


class Diverged(Exception):
    """The replayed service did not answer with the same bytes."""


class LiveMode:
    """Checkpoints and re-incarnations for one server shim."""

    def __init__(self, shim: ServerShim, clock: Callable[[], float] = time.time) -> None:
        self.shim = shim
        self.clock = clock
        options = shim.options
        self.listen = (str(options.listen.address), options.listen.port)
        self.vport = shim.deployment.service_port
        self.deployment_id = shim.deployment.deployment_id
        self.sender = shim.deployment.servers.index(options.listen)
        self.checkpoint_keys = CheckpointKeys(shim.secret.group_key)
        # What each client holds and may still ask of this port (issue 12, finding 3).
        self.meter = MigrationMeter(options.max_pending_per_client)
        # Preparations of one client running at once: never every slot, so that another
        # client's hand-over always finds slots (acquired before ``prepare_slots``).
        self.client_slots: dict[int, asyncio.Semaphore] = {}
        self.period = options.checkpoint_period
        self.raw = rawtcp.RawTcpSender()
        self.connections: dict[tuple[str, int], LiveConnection] = {}
        self.pending: dict[tuple[str, int], Pending] = {}
        # Why the latest preparation of a connection failed, for its COMMIT (oldest first).
        self.failures: dict[tuple[str, int], tuple[Status, str]] = {}
        self.openers: dict[int, Opener] = {}
        self.answer_sealers: dict[int, Sealer] = {}
        self.carrier_sealers: dict[int, Sealer] = {}
        # Re-incarnations prepared at once. A legacy service may have a short accept queue
        # (python's http.server listens with a backlog of 5): a burst of connects beyond it
        # waits for SYN retransmissions, seconds, instead of a few milliseconds here.
        self.prepare_slots = asyncio.Semaphore(PREPARE_CONCURRENCY)
        self.checkpoints_sent = 0
        self.counts = {
            "admitted": 0,
            "ready": 0,
            "diverged": 0,
            "refused": 0,
            "failed": 0,
            "repeated": 0,
            "cover": 0,
        }
        # Clients that frame their requests (migrate.cover) get every answer as one cell of
        # ANSWER_CELL_BYTES, and one answer per request: the next server's answers look like
        # every other server's answers to cover.
        self.framed_clients: set[int] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._leave_pushed: float | None = None

    # -- helpers -----------------------------------------------------------------------------

    def current_epoch(self) -> int:
        return self.shim.epoch or 0

    def carrier_sealer(self, record: ClientRecord) -> Sealer:
        """One sealer per client, shared by all its connections: nonces are (sender, counter)
        under the client's key, so two sealers of the same client could repeat a nonce."""
        sealer = self.carrier_sealers.get(record.client_id)
        if sealer is None:
            sealer = carrier_sealer(
                record.channel_key, self.deployment_id, record.client_id, self.sender
            ).keep_counters(self.shim.counter_floor)
            self.carrier_sealers[record.client_id] = sealer
        return sealer

    def _record_for(self, address: str) -> ClientRecord | None:
        import ipaddress

        for client in self.shim.pool.clients.by_address(ipaddress.ip_address(address)):
            record = self.shim.pool.record(client)
            if not record.revoked:
                return record
        return None

    # -- accepted connections ----------------------------------------------------------------

    def relay_factory(
        self, client: socket.socket, service: socket.socket, peer: tuple[str, int]
    ) -> Relay:
        facts = accept_facts(client)
        connection = LiveConnection(
            self,
            client,
            service,
            peer,
            facts,
            self._record_for(peer[0]),
            conn_id=os.urandom(16),
            stream=StreamState(self.shim.options.codec),
        )
        if not self.shim.gate_open:
            # Accepted before the gate closed but only now past the service's connect (a burst
            # at the end of the epoch): the client has moved on. Kept, it would stand in the
            # way (the same 4-tuple) when the service comes back here.
            connection.leave_silently()
            self.shim.log.event("connection_left", client=f"{peer[0]}:{peer[1]}", late=True)
            return connection.relay
        self._adopt(connection)
        return connection.relay

    def _adopt(self, connection: LiveConnection) -> None:
        key = connection.peer
        self.connections[key] = connection

        def ended(future: asyncio.Future[RelayOutcome]) -> None:
            if self.connections.get(key) is connection:
                del self.connections[key]
            if future.cancelled():
                return
            outcome = future.result()
            if outcome.reason is EndReason.RESET:
                self.shim.log.event(
                    "connection_reset",
                    client=f"{key[0]}:{key[1]}",
                    side=outcome.failed_side,
                    reason=repr(outcome.error),
                )
            if outcome.reason is EndReason.OBSERVER_FAILED:
                # A bug of ours, not the network's: say so loudly.
                self.shim.log.event(
                    "connection_failed",
                    level="error",
                    client=f"{key[0]}:{key[1]}",
                    reason=repr(outcome.error),
                )

        connection.relay.closed.add_done_callback(ended)

    # -- checkpoints -------------------------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            try:
                self._checkpoint_round()
            except Exception as error:  # a bug of ours must not stop every connection's pushes
                self.shim.log.event(
                    "internal_error",
                    level="error",
                    where="checkpoints",
                    reason=repr(error),
                    trace=traceback.format_exc(limit=6),
                )

    def _checkpoint_round(self) -> None:
        now = self.clock()
        leaving = self.shim.leaving_at()
        # A last round just before leaving: the client's refresh (client_shim.migrator
        # REFRESH_LEAD) re-prepares a connection whose PREPARE carried a checkpoint from before
        # the response began with the newest one, and needs it by then. Its burst of carriers
        # dates the roam 120 ms early (docs/protocol.md section 9).
        push_all = (
            leaving is not None
            and leaving - LEAVE_PUSH_LEAD <= now
            and self._leave_pushed != leaving
        )
        if push_all:
            self._leave_pushed = leaving
        self.expire_pending(now)
        for connection in list(self.connections.values()):
            if push_all or connection.due(now):
                try:
                    connection.push(now)
                except (OSError, RoamError) as error:
                    self.shim.log.event(
                        "checkpoint_failed",
                        level="warning",
                        client=f"{connection.peer[0]}:{connection.peer[1]}",
                        reason=str(error),
                    )
                    # Soon again: a connection without a recent checkpoint cannot move.
                    connection.next_due = now + min(self.period, CHECKPOINT_RETRY_S)

    def leave(self) -> int:
        """The gate closed behind the service: drop every connection silently (and those still
        being accepted, as they come: see ``relay_factory``). Prepared re-incarnations stay:
        they are for a later epoch on this server."""
        count = 0
        for connection in list(self.connections.values()):
            connection.leave_silently()
            count += 1
        self.connections.clear()
        return count

    def expire_pending(self, now: float) -> None:
        """Forget re-incarnations whose client never came back (bounded memory and sockets)."""
        for key, pending in list(self.pending.items()):
            if now - pending.created > PENDING_TTL_S:
                self.shim.log.event("reincarnation_expired", client=f"{key[0]}:{key[1]}")
                self._drop_pending(key)

    # -- re-incarnation ----------------------------------------------------------------------

    def _answer(self, record: ClientRecord, answer: Answer, source: tuple[str, int]) -> None:
        sealer = self.answer_sealers.get(record.client_id)
        if sealer is None:
            sealer = answer_sealer(
                record.channel_key, self.deployment_id, record.client_id, self.sender
            ).keep_counters(self.shim.counter_floor)
            self.answer_sealers[record.client_id] = sealer
        body = answer.encode()
        if record.client_id in self.framed_clients:
            body = frame(body, ANSWER_CELL_BYTES)
        if self._transport is not None:
            self._transport.sendto(sealer.seal(Kind.REINCARNATE_READY, body, self.clock()), source)

    def _answer_cover(self, record: ClientRecord, source: tuple[str, int]) -> None:
        """A cover answer, the size of any other answer, to a client that frames."""
        if record.client_id not in self.framed_clients:
            return
        sealer = self.answer_sealers.get(record.client_id)
        if sealer is None:
            sealer = answer_sealer(
                record.channel_key, self.deployment_id, record.client_id, self.sender
            )
            self.answer_sealers[record.client_id] = sealer
        if self._transport is not None:
            message = sealer.seal(Kind.REINCARNATE_READY, cover(ANSWER_CELL_BYTES), self.clock())
            self._transport.sendto(message, source)

    def _on_cover(
        self, record: ClientRecord, opener: Opener, opened: Opened, source: tuple[str, int]
    ) -> None:
        """Cover from a client: nothing to do but answer with cover (only at the client's
        registered address, never to a revoked client; smaller than the cell: no
        amplification). It holds nothing and counts against no bound on preparations."""
        if record.revoked or source[0] != str(record.address):
            self.counts["refused"] += 1
            return
        opener.accept(opened)  # a replayed cover cell is not answered twice
        self.counts["cover"] += 1
        self._answer_cover(record, source)

    def _reject(self, origin: str, error: RoamError) -> None:
        self.counts["refused"] += 1
        # Spoofable from outside (and repeatable by an insider): bounded logging
        # (migrate.ratelog), never one line per datagram.
        self.shim.log.rejection(
            "reincarnation_rejected",
            origin=origin,
            error=type(error).__name__,
            reason=str(error),
        )

    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        origin = f"{source[0]}:{source[1]}"
        try:
            client_id = client_id_of(data)
            record = self.shim.pool.clients.by_id(client_id)
            if record is None:
                raise RoamError(f"unknown client id {client_id}")
            record = self.shim.pool.record(record)
            opener = self.openers.get(client_id)
            if opener is None:
                opener = request_opener(record.channel_key, self.deployment_id, client_id)
                self.openers[client_id] = opener
            opened = opener.open(data, self.clock())
            framed = is_framed(opened.plaintext)
            if framed and len(data) < MIN_CELL_BYTES:
                # Framed answers are ANSWER_CELL_BYTES: never more than the request (no
                # amplification, even by an authentic client towards its own address).
                raise MalformedMessageError(f"a framed request of {len(data)} bytes is too small")
            body = unframe(opened.plaintext)
            if body is not None:
                request = Request.decode(body)
                # Every phase is the client's own, from its address, while it may be served
                # here.
                self._check_sender(record, source[0], request)
        except RoamError as error:
            self._reject(origin, error)
            return
        if framed and source[0] == str(record.address):
            self.framed_clients.add(record.client_id)
        if body is None:
            self._on_cover(record, opener, opened, source)
            return
        key = (source[0], request.client_port)
        pending = self.pending.get(key)
        if pending is not None and pending.client_id != record.client_id:
            # Bound to the client of the PREPARE: nobody else commits, starts or aborts it.
            self._reject(
                origin,
                AuthenticationError(
                    f"{request.phase.name} from client {record.client_id} for a re-incarnation "
                    f"prepared by client {pending.client_id}"
                ),
            )
            return
        if request.phase is Phase.PREPARE:
            self._on_prepare(key, pending, opened, opener, request, record, source)
            return
        if request.phase is Phase.COMMIT:
            self._on_commit(key, pending, opened, opener, request, record, source)
            return
        opener.accept(opened)
        if framed:
            self._answer_cover(record, source)  # nobody waits for it; cover has one
        if pending is None:
            return  # nobody waits for the answer to a GO or an ABORT
        if request.phase is Phase.ABORT:
            self._drop_pending(key)
            return
        # GO: the client has switched; start relaying.
        self._go(key, pending)

    def _check_sender(self, record: ClientRecord, source: str, request: Request) -> None:
        """Checks of every phase: the client is not revoked, sends from its address, and is not
        blocked here for exceeding its rate contract."""
        if record.revoked:
            raise RevokedClientError(f"client {record.name!r} is revoked")
        if source != str(record.address):
            raise AuthenticationError(
                f"request for client {record.name!r} came from {source}, not its address "
                f"{record.address}"
            )
        pool = self.shim.pool
        if (
            request.phase is not Phase.ABORT
            and record.client_id in pool.blocks  # cheap first: blocks are rare
            and record.client_id in pool.blocked(self.current_epoch())
        ):
            raise RoamError(
                f"client {record.name!r} is blocked here (over its rate contract) until the "
                "service roams"
            )

    def _on_prepare(
        self,
        key: tuple[str, int],
        existing: Pending | None,
        opened: Opened,
        opener: Opener,
        request: Request,
        record: ClientRecord,
        source: tuple[str, int],
    ) -> None:
        origin = f"{source[0]}:{source[1]}"
        now = self.clock()
        try:
            admitted = self._admit(opened, request, record, source[0])
            checkpoint = admitted.checkpoint
            if existing is not None and existing.repeats(admitted):
                self.meter.extend(
                    record.client_id,
                    replay_bytes=0,
                    regenerate_bytes=max(0, request.s2c_received - existing.until),
                    now=now,
                )
            else:
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
                self.meter.admit(
                    record.client_id,
                    key,
                    replay_bytes=len(request.replay),
                    # Up to the client's claim, and at least to the checkpoint's position.
                    regenerate_bytes=max(request.s2c_received, checkpoint.s2c_pos)
                    - checkpoint.s2c_fresh,
                    rate_kbit=record.rate_kbit,
                    now=now,
                )
        except RoamError as error:
            self._reject(origin, error)
            return
        opener.accept(opened)
        if existing is not None and existing.repeats(admitted):
            # The client asked again: no answer yet, or it was lost, or its position moved
            # on (a refresh just before the boundary). Keep the work going and extend it.
            existing.reply_to = source
            existing.until = max(existing.until, request.s2c_received)
            running = existing.task is not None and not existing.task.done()
            if running and record.client_id in self.framed_clients:
                # Its answer comes when the work is done; this one gets cover, so that each
                # request has one answer, as cover has.
                self._answer_cover(record, source)
            elif not running and existing.answer is not None:
                if existing.answer.status is Status.READY and existing.until > (
                    existing.stream.s2c_pos
                ):
                    existing.answer = None
                    existing.task = asyncio.get_running_loop().create_task(
                        self._top_up(key, existing, record)
                    )
                else:
                    self._answer(record, existing.answer, source)
            return
        self._drop_pending(key, keep_accounted=True)
        self.failures.pop(key, None)
        self.counts["admitted"] += 1
        prepared = Pending(
            admitted,
            StreamState(),
            created=now,
            reply_to=source,
            until=request.s2c_received,
            client_id=record.client_id,
        )
        self.pending[key] = prepared
        prepared.task = asyncio.get_running_loop().create_task(self._prepare(key, prepared, record))

    def _on_commit(
        self,
        key: tuple[str, int],
        pending: Pending | None,
        opened: Opened,
        opener: Opener,
        request: Request,
        record: ClientRecord,
        source: tuple[str, int],
    ) -> None:
        origin = f"{source[0]}:{source[1]}"
        try:
            # The COMMIT's checkpoint, epoch and window are checked like a PREPARE's, and the
            # gate must be open: a connection created behind a closed gate would never leave.
            admitted = self._admit(opened, request, record, source[0])
            if self._behind_closed_gate(request.epoch):
                raise RoamError("this server's gate is closed: no connection is created here")
            if pending is not None:
                if admitted.checkpoint.conn_id != pending.admitted.checkpoint.conn_id:
                    raise AuthenticationError(
                        "the COMMIT's checkpoint is of another connection than its PREPARE's"
                    )
                if pending.sock is None and not pending.committing:
                    self.meter.extend(
                        record.client_id,
                        replay_bytes=len(request.replay),
                        regenerate_bytes=max(0, request.s2c_received - pending.until),
                        now=self.clock(),
                    )
        except RoamError as error:
            self._reject(origin, error)
            if pending is not None and not pending.committing and pending.sock is None:
                self._answer(
                    record, Answer(Phase.COMMIT, key[1], Status.REFUSED, str(error)), source
                )
            return
        opener.accept(opened)
        if pending is None:
            live = self.connections.get(key)
            if live is not None and live.committed == commit_identity(request):
                # A repeated COMMIT whose first answer was lost, arriving after the connection
                # went live here (the GO, or GO_TIMEOUT_S): it is done; say so again, or the
                # client would reset a connection that has moved.
                self.counts["repeated"] += 1
                self.shim.log.event(
                    "commit_repeated", client=f"{key[0]}:{key[1]}", epoch=request.epoch
                )
                self._answer(record, Answer(Phase.COMMIT, key[1], Status.READY, ""), source)
                return
            status, detail = self.failures.get(key, (Status.FAILED, "no prepared re-incarnation"))
            self._answer(record, Answer(request.phase, request.client_port, status, detail), source)
            return
        asyncio.get_running_loop().create_task(self._commit(key, pending, request, record, source))

    def _admit(
        self, opened: Opened, request: Request, record: ClientRecord, source: str
    ) -> Admitted:
        schedule = self.shim.pool.schedule
        now = self.clock()
        current = self.current_epoch()
        try:
            # From a little before the epoch (prepare) to a little after its start (the
            # commit of a hand-over that started late), and at no other time of the epoch.
            me = self.shim.options.listen
            if abs(request.epoch - current) > MAX_EPOCH_DISTANCE:
                # Far from now: refused before the schedule is walked that far (a walk of
                # thousands of epochs would stall every connection of this server).
                raise RoamError(f"epoch {request.epoch} is too far from the current {current}")
            start = schedule.start_of(request.epoch)
            serves = schedule.server_for(request.epoch) == me
            if serves and not in_request_window(start, now):
                raise RoamError(
                    f"epoch {request.epoch} starts {start - now:+.1f} s from now: requests "
                    f"for it are taken from {PREPARE_AHEAD_S:.0f} s before its start to "
                    f"{LATE_REQUEST_S:.0f} s after"
                )
            # Never for an epoch whose window has closed, and a connection is created (COMMIT)
            # only while this server's gate is open: one created behind a closed gate would
            # never be left, and would stand in the way when the service comes back here.
            serves = serves and now < schedule.window(request.epoch).closes
            length = schedule.epoch(request.epoch).length
        except RoamError:
            serves, length = False, 0.0
        # Revoked or past its subscription (and lease) at the running epoch: refused, like
        # at the gate.
        self.shim.pool.check_client_allowed(record, max(current, 1))
        granted = record.grant_for(current, self.shim.deployment.chain_length)
        return admit(
            opened,
            request,
            record,
            source,
            granted,
            serves,
            self.checkpoint_keys.candidates(request.epoch),
            self.deployment_id,
            now=now,
            epoch_length=length,
        )

    def _behind_closed_gate(self, epoch: int) -> bool:
        """Whether a connection for ``epoch`` would be created behind a closed gate: the
        epoch's window has closed, or it has opened and the gate is closed all the same (a
        reactive roam). Just before the window opens (a client's clock a little ahead) the
        gate is still closed but is about to open: that is not behind it."""
        try:
            window = self.shim.pool.schedule.window(epoch)
        except RoamError:
            return True
        now = self.clock()
        return now >= window.closes or (window.opens <= now and not self.shim.gate_open)

    def _drop_pending(
        self, key: tuple[str, int], only: Pending | None = None, *, keep_accounted: bool = False
    ) -> None:
        """Forget the re-incarnation under ``key`` and free what it holds (silently: its
        socket, if any, never spoke). With ``only``, free that one, and unlist it only if it
        is still the one under ``key`` (a retry may have replaced it). ``keep_accounted``: a
        new preparation of the same client takes its place in the meter."""
        pending = only if only is not None else self.pending.get(key)
        if pending is None:
            return
        if self.pending.get(key) is pending:
            del self.pending[key]
            if not keep_accounted:
                self.meter.release(key)
        current = asyncio.current_task()
        if pending.task is not None and not pending.task.done() and pending.task is not current:
            pending.task.cancel()
        if pending.service is not None and pending.connection is None:
            close_abortively(pending.service)
            pending.service = None
        if pending.sock is not None and pending.connection is None:
            with contextlib.suppress(OSError):
                tcp_repair.enter_repair(pending.sock)
            pending.sock.close()
            pending.sock = None

    async def _connect_service(self, client_address: str) -> socket.socket:
        service = (str(self.shim.options.service.address), self.shim.options.service.port)
        if self.shim.options.transparent:
            return await connect_transparent(service, client_address)
        return await connect_plain(service)

    async def _regenerate(self, pending: Pending, until: int) -> None:
        """Read the replayed service until ``until``, the client's position, and at least to
        the checkpoint's position, where the commitment is checked. Bytes the client already
        has are dropped as they arrive; only those beyond ``until`` are kept, to send first."""
        checkpoint = pending.admitted.checkpoint
        loop = asyncio.get_running_loop()
        assert pending.service is not None
        stream = pending.stream
        # Bytes already read beyond the old ``until`` that the client has by now.
        unsent_from = stream.s2c_pos - len(pending.unsent)
        del pending.unsent[: max(0, min(len(pending.unsent), until - unsent_from))]
        if checkpoint.s2c_pos == checkpoint.s2c_fresh == 0 < until:
            # The checkpoint commits to none of the service's bytes and the connection never
            # completed an exchange either: nothing has ever been checked against a replay, so
            # a service that answers differently here would go unnoticed. (After a completed
            # exchange, bytes past the fresh point belong to later exchanges of a service
            # that has answered identically so far.)
            raise Diverged(
                f"unverifiable: the checkpoint covers none of the {until - checkpoint.s2c_fresh} "
                "bytes the client has"
            )
        goal = until if pending.verified else max(until, checkpoint.s2c_pos)
        self._verify(pending)
        # One reused buffer: many re-incarnations regenerate at once, and a fresh allocation
        # per read (what sock_recv does) costs more than the read.
        buffer = memoryview(bytearray(REGENERATE_BUFFER_BYTES))
        while stream.s2c_pos < goal:
            limit = goal - stream.s2c_pos
            if not pending.verified:
                # Stop exactly at the checkpoint's position to compare the hashes there.
                limit = min(limit, checkpoint.s2c_pos - stream.s2c_pos) or limit
            view = buffer[: min(len(buffer), max(1, limit))]
            try:
                async with asyncio.timeout(SERVICE_IDLE_S):
                    received = await loop.sock_recv_into(pending.service, view)
            except TimeoutError:
                raise Diverged(
                    f"the service stopped after {stream.s2c_pos} bytes, short of {goal}"
                ) from None
            chunk = view[:received]
            if not received:
                raise Diverged(
                    f"the service closed after {stream.s2c_pos} bytes; the checkpoint has "
                    f"{checkpoint.s2c_pos}"
                )
            start = stream.s2c_pos
            stream.feed_s2c(chunk)
            if stream.s2c_pos > until:
                pending.unsent += chunk[max(0, until - start) :]
            self._verify(pending)

    @staticmethod
    def _verify(pending: Pending) -> None:
        """Compare the regenerated bytes with the checkpoint's commitment, exactly at the
        checkpoint's position (which may be the fresh point itself: nothing to compare)."""
        checkpoint = pending.admitted.checkpoint
        stream = pending.stream
        if pending.verified or stream.s2c_pos != checkpoint.s2c_pos:
            return
        if stream.candidates[0].s2c_hash.digest() != checkpoint.s2c_hash:
            raise Diverged("the replayed service answered with different bytes")
        pending.verified = True

    async def _prepare(self, key: tuple[str, int], pending: Pending, record: ClientRecord) -> None:
        admitted = pending.admitted
        checkpoint, request = admitted.checkpoint, admitted.request
        loop = asyncio.get_running_loop()
        status, detail = Status.READY, ""
        mine = self.client_slots.get(pending.client_id)
        if mine is None:
            mine = self.client_slots[pending.client_id] = asyncio.Semaphore(PREPARING_PER_CLIENT)
        held_from: float | None = None
        try:
            async with asyncio.timeout(PREPARE_TIMEOUT_S), mine, self.prepare_slots:
                held_from = self.clock()
                pending.service = await self._connect_service(key[0])
                pending.stream = StreamState(
                    checkpoint.codec,
                    c2s_start=checkpoint.c2s_fresh,
                    s2c_start=checkpoint.s2c_fresh,
                )
                pending.stream.feed_c2s(request.replay)
                await loop.sock_sendall(pending.service, request.replay)
                await self._catch_up(pending)
        except Exception as error:
            status, detail = self._failure(error)
        finally:
            if held_from is not None:
                self.meter.used_service(pending.client_id, self.clock() - held_from, self.clock())
        if status is not Status.READY:
            self._fail_pending(key, pending, status, detail)
        else:
            self.shim.log.event(
                "prepared",
                client=f"{key[0]}:{key[1]}",
                regenerated=pending.stream.s2c_pos - checkpoint.s2c_fresh,
                seconds=round(self.clock() - pending.created, 4),
            )
        pending.answer = Answer(Phase.PREPARE, key[1], status, detail)
        self._answer(record, pending.answer, pending.reply_to)

    def _failure(self, error: Exception) -> tuple[Status, str]:
        """The answer to a re-incarnation step that raised ``error``."""
        if isinstance(error, Diverged):
            return Status.DIVERGED, str(error)
        if isinstance(error, OSError | TimeoutError | RoamError):
            return Status.FAILED, f"{type(error).__name__}: {error}"
        # A bug of ours: answer, log loudly, keep serving.
        self.shim.log.event(
            "internal_error", level="error", where="re-incarnation", reason=repr(error)
        )
        return Status.FAILED, f"internal error: {error!r}"

    def _fail_pending(
        self, key: tuple[str, int], pending: Pending, status: Status, detail: str
    ) -> None:
        """A preparation failed: log it, free it, and keep the reason for the COMMIT that may
        still come (the client may have had a READY before a refresh failed)."""
        self.counts["diverged" if status is Status.DIVERGED else "failed"] += 1
        self.shim.log.event(
            "reincarnation_failed",
            level="warning",
            client=f"{key[0]}:{key[1]}",
            status=status.name.lower(),
            reason=detail,
        )
        self._drop_pending(key, only=pending)
        self.failures[key] = (status, detail)
        while len(self.failures) > MAX_FAILURES_KEPT:
            del self.failures[next(iter(self.failures))]

    async def _catch_up(self, pending: Pending) -> None:
        """Regenerate up to the client's latest known position; it may move on meanwhile
        (a refreshed PREPARE), so go on until it stands still."""
        while True:
            until = pending.until
            await self._regenerate(pending, until)
            if pending.until == until:
                return

    async def _top_up(self, key: tuple[str, int], pending: Pending, record: ClientRecord) -> None:
        """A refreshed PREPARE after READY: regenerate the extra bytes, then say READY again,
        so that the COMMIT has less to do while the client's data is frozen."""
        status, detail = Status.READY, ""
        try:
            async with asyncio.timeout(PREPARE_TIMEOUT_S):
                await self._catch_up(pending)
        except Exception as error:
            status, detail = self._failure(error)
        if status is not Status.READY:
            self._fail_pending(key, pending, status, detail)
        pending.answer = Answer(Phase.PREPARE, key[1], status, detail)
        self._answer(record, pending.answer, pending.reply_to)

    async def _commit(
        self,
        key: tuple[str, int],
        pending: Pending,
        request: Request,
        record: ClientRecord,
        source: tuple[str, int],
    ) -> None:
        loop = asyncio.get_running_loop()
        checkpoint = pending.admitted.checkpoint
        status, detail = Status.READY, ""
        if pending.sock is not None:
            # A repeated COMMIT (its answer was lost): the socket is waiting; say so again.
            self._answer(record, Answer(Phase.COMMIT, key[1], Status.READY, ""), source)
            return
        if pending.committing:
            return  # the first COMMIT is being worked on and will be answered
        pending.committing = True
        try:
            if pending.task is not None and not pending.task.done():
                await pending.task
            if self.pending.get(key) is not pending:
                failed = self.failures.get(key)
                raise RoamError(
                    f"the prepare step failed ({failed[1]})"
                    if failed is not None
                    else "the prepare step was replaced"
                )

            if request.replay_from != pending.stream.c2s_pos:
                raise RoamError(
                    f"commit replay starts at {request.replay_from}, prepared up to "
                    f"{pending.stream.c2s_pos}"
                )
            assert pending.service is not None
            if request.replay:
                pending.stream.feed_c2s(request.replay)
                await loop.sock_sendall(pending.service, request.replay)
            await self._regenerate(pending, request.s2c_received)
            pending.sock = self._restore(request, checkpoint)
            pending.s2c_base = request.s2c_received
            pending.committed = commit_identity(request)
        except Exception as error:
            status, detail = self._failure(error)
            if isinstance(error, OSError) and error.errno == errno.EADDRNOTAVAIL:
                detail += self._describe_clash(key)
        if status is Status.READY:
            self.counts["ready"] += 1
            asyncio.get_running_loop().call_later(GO_TIMEOUT_S, self._go, key, pending)
        else:
            self._fail_pending(key, pending, status, detail)
        self._answer(record, Answer(Phase.COMMIT, key[1], status, detail), source)

    def _describe_clash(self, key: tuple[str, int]) -> str:
        """Which socket already holds the 4-tuple a re-incarnation needs (for the log)."""
        from migrate.kernel import sockdiag

        try:
            found = sockdiag.lookup(self.listen, key)
        except (OSError, RoamError):
            return ""
        if found is None:
            return "; no such socket any more"
        known = key in self.connections
        return (
            f"; it is in state {found.state} (inode {found.inode}), "
            f"{'a connection of ours' if known else 'not a connection we track'}"
        )

    def _restore(self, request: Request, checkpoint: Checkpoint) -> socket.socket:
        tcp = checkpoint.tcp
        tsval = None
        if tcp.timestamps:
            elapsed_ms = int(max(0.0, self.clock() - checkpoint.taken_at) * 1000)
            tsval = (tcp.ts_val + elapsed_ms + TS_MARGIN_MS) % SEQ_MOD
        state = tcp_repair.state_from_positions(
            local=self.listen,
            remote=(checkpoint.client[0], checkpoint.client[1]),
            server_isn=tcp.server_isn,
            client_isn=tcp.client_isn,
            bytes_to_client=request.s2c_received,
            bytes_from_client=request.c2s_sent,
            mss=tcp.mss,
            snd_wscale=tcp.snd_wscale,
            rcv_wscale=tcp.rcv_wscale,
            sack=tcp.sack,
            tsval=tsval,
        )
        return tcp_repair.restore_socket(state)

    def _go(self, key: tuple[str, int], pending: Pending) -> None:
        if self.pending.get(key) is not pending or pending.sock is None:
            return
        if pending.connection is not None:
            return
        if self._behind_closed_gate(pending.admitted.request.epoch):
            # Behind a closed gate the connection would never be left (see ``leave``).
            self.shim.log.event("reincarnation_refused_closed_gate", client=f"{key[0]}:{key[1]}")
            self._drop_pending(key)
            return
        del self.pending[key]
        self.meter.release(key)
        checkpoint = pending.admitted.checkpoint
        facts = AcceptFacts(
            checkpoint.tcp.server_isn,
            checkpoint.tcp.client_isn,
            checkpoint.tcp.mss,
            checkpoint.tcp.snd_wscale,
            checkpoint.tcp.rcv_wscale,
            checkpoint.tcp.sack,
            checkpoint.tcp.timestamps,
        )
        sock = pending.sock
        assert pending.service is not None
        unsent = bytes(pending.unsent)
        connection = LiveConnection(
            self,
            sock,
            pending.service,
            key,
            facts,
            pending.admitted.record,
            conn_id=checkpoint.conn_id,
            stream=pending.stream,
            counter=checkpoint.counter + INCARNATION_COUNTER_STRIDE,
            s2c_base=pending.s2c_base,
            syn_adjust=0,
            committed=pending.committed,
        )
        pending.connection = connection
        # Adopted at once: if the service leaves again right away, ``leave`` finds it too.
        self._adopt(connection)
        # What was regenerated beyond the client's position goes out first, through the relay,
        # so that a slow client holds back only this connection.
        connection.relay.start(to_client_first=unsent)
        self.shim.log.event(
            "reincarnated",
            client=f"{key[0]}:{key[1]}",
            s2c=connection.s2c_base,
            c2s=connection.stream.c2s_pos,
            unsent=len(unsent),
        )
        connection.push(self.clock())

    # -- lifecycle ---------------------------------------------------------------------------

    def destroy_orphans(self) -> int:
        """Abort connections a dead predecessor left on our address (``migrate.kernel.orphans``)."""
        assert self.shim.instance is not None  # started before live mode
        return orphans.destroy_orphans(self.listen, self.shim.instance)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        destroyed = await asyncio.to_thread(self.destroy_orphans)
        if destroyed:
            self.shim.log.event("orphans_destroyed", count=destroyed)
        sock = datagram_socket()
        try:
            bind_exclusive(
                sock, (self.listen[0], self.shim.options.migration_port), "re-incarnation requests"
            )
        except RoamError:
            sock.close()
            raise
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _MigrationProtocol(self), sock=sock
        )
        self._task = loop.create_task(self._checkpoint_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for key in list(self.pending):
            self._drop_pending(key)
        if self._transport is not None:
            self._transport.close()
        self.raw.close()

    def status(self) -> dict[str, object]:
        return {
            "live_connections": len(self.connections),
            "pending": len(self.pending),
            # Per client id: what the meter holds (issue 12, finding 3).
            "pending_by_client": {
                str(client): self.meter.pending_of(client)
                for client in sorted(self.meter.clients)
                if self.meter.pending_of(client)
            },
            "checkpoints_sent": self.checkpoints_sent,
            **self.counts,
        }


class _MigrationProtocol(asyncio.DatagramProtocol):
    def __init__(self, live: LiveMode) -> None:
        self.live = live

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.live.on_datagram(data, (str(addr[0]), int(addr[1])))
