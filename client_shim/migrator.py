"""Live migration on the client: keep checkpoints, hand connections over at each roam.

Theory of operation: the client shim's capture chains (``client_shim.rules``) copy, through
NFLOG, the client's SYNs and data segments to the VIP and the carriers the server pushes; the
``ConnectionStore`` turns them into, per connection, the newest sealed checkpoint and the
client's bytes from its fresh point on.

A roam to a new server, make-before-break (ARCHITECTURE.md):

1. ``prepare`` (shortly before the boundary): for each live connection (sock_diag lists the
   client's sockets to the VIP) a PREPARE goes to the new server with the checkpoint, the
   client's positions and its replay bytes. The new server replays and regenerates meanwhile.
2. ``commit`` (at the boundary): the connections' outgoing data is frozen and nothing more is
   taken from the old server, so the positions read now are final; a COMMIT carries them and
   the replay bytes added since. Each READY means a socket waits, silent, at the new server.
3. The kernel rewrite is pointed at the new server and the freeze lifted in one transaction;
   then a GO per connection lets the new server speak. The client's TCP resends what the old
   server never acknowledged; the application sees a pause.

A connection that cannot follow (no checkpoint yet, unmigratable, diverged, refused, no
answer) is reset cleanly with SOCK_DESTROY: the application gets ECONNABORTED, never wrong
bytes. Every hand-over is logged with its outcome, the pause and the bytes replayed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from client_shim.rules import finished_script, freeze_script, switch_script
from migrate.channel import Kind, Opener
from migrate.checkpoint import carrier_opener, open_carrier
from migrate.connstore import ConnectionStore, TrackedConnection
from migrate.cover import CoverConfig, CoverSchedule, cover, frame, unframe
from migrate.endpoints import Endpoint
from migrate.errors import RoamError
from migrate.kernel import nft, sockdiag
from migrate.kernel.eventlog import EventLog
from migrate.kernel.nflog import NflogReader
from migrate.kernel.rawtcp import is_carrier, parse_ipv4_tcp
from migrate.kernel.udp import datagram_socket
from migrate.registration import Bundle
from migrate.reincarnation import (
    Answer,
    Phase,
    Request,
    Status,
    answer_opener,
    request_sealer,
)

DEFAULT_PREPARE_LEAD = 0.15
# The new server regenerates a connection's response up to the client's position before it is
# ready; give it that long, at a conservative replay speed, on top of the base lead.
REGENERATE_BYTES_PER_S = 60e6
PREPARE_SECONDS_PER_CONNECTION = 0.02  # a service connection, a replay, a few round trips
MAX_PREPARE_LEAD = 4.0
DEFAULT_COMMIT_TIMEOUT = 5.0
PREPARE_WAIT_S = 10.0
PREPARE_RETRY_S = 1.0
REFRESH_LEAD = 0.1
PREPARE_OVERTIME_S = 3.0  # at most this much longer while PREPARE answers keep coming
LATE_PREPARE_WAIT_S = 2.0
# A hand-over stops waiting for PREPARE answers this long after its epoch began, leaving time
# to COMMIT within the servers' window (migrate.reincarnation.LATE_REQUEST_S, 10 s).
HANDOFF_BUDGET_S = 4.0
COMMIT_RETRY_S = 0.5  # the last position report goes out this long before the boundary
CARRIER_GRACE_S = 0.3
MIGRATION_PORT = 47476
MAX_ROAM_RECORDS = 50


def acked_bytes(info: sockdiag.TcpSocketInfo) -> int:
    """Client bytes the server acknowledged (a connecting socket's count includes its SYN)."""
    return max(0, info.bytes_acked - 1)


@dataclass
class Handoff:
    port: int
    prepared_sent: int = 0  # c2s position covered by the PREPARE
    outcome: str = "pending"
    detail: str = ""
    replayed: int = 0
    prepare: asyncio.Future[Answer] | None = None
    commit: asyncio.Future[Answer] | None = None
    request: Request | None = None  # the PREPARE as first sent (repeats reuse it)
    checkpoint_s2c: int = 0  # the service's position in that PREPARE's checkpoint
    commit_request: Request | None = None


@dataclass
class RoamRecord:
    epoch: int
    server: str
    started: float
    switched: float = 0.0
    connections: dict[int, Handoff] = field(default_factory=dict)

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
        }


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
        prepare_lead: float = DEFAULT_PREPARE_LEAD,
        commit_timeout: float = DEFAULT_COMMIT_TIMEOUT,
        migration_port: int = MIGRATION_PORT,
        cover_config: CoverConfig | None = None,
    ) -> None:
        self.bundle = bundle
        self.table = table
        self.group = nflog_group
        self.log = log
        self.clock = clock
        self.clock_offset = clock_offset
        self.prepare_lead = prepare_lead
        self.commit_timeout = commit_timeout
        self.migration_port = migration_port
        self.client_address = str(bundle.address)
        self.vip = (str(bundle.vip), bundle.service_port)
        self.pool = {(str(s.address), s.port) for s in bundle.servers()}
        self.store = ConnectionStore()
        self.carriers: Opener = carrier_opener(
            bundle.channel_key, bundle.deployment_id, bundle.client_id
        )
        self.sealer = request_sealer(bundle.channel_key, bundle.deployment_id, bundle.client_id)
        self.answers: Opener = answer_opener(
            bundle.channel_key, bundle.deployment_id, bundle.client_id
        )
        self.reader: NflogReader | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[tuple[int, int], asyncio.Future[Answer]] = {}
        self.roams: list[RoamRecord] = []
        self.rejected_carriers = 0
        self.capture_losses = 0
        # Cover traffic (migrate.cover): requests wait for their slot, and every server of the
        # pool gets as many cells of the same size, so that the wire does not tell which
        # server is next, nor when a hand-over is prepared.
        self.cover_config = cover_config if cover_config is not None else CoverConfig()
        self.cover: CoverSchedule[Request] | None = None
        if self.cover_config.enabled:
            servers = [str(s.address) for s in bundle.servers()]
            self.cover = CoverSchedule(servers, self.cover_config, clock())
        self.cover_answers = 0
        self._cover_task: asyncio.Task[None] | None = None

    # -- capture -----------------------------------------------------------------------------

    def drain_capture(self) -> None:
        """Everything captured so far, however much is queued. A roam's decisions need it: a
        connection whose SYN copy still waits behind a burst (1000 connects in a second fill
        more than one read) would look like one opened before the shim, and be reset."""
        assert self.reader is not None
        self.on_capture()
        while self.reader.backlog:
            self.on_capture()

    def on_capture(self) -> None:
        """The reader's callback: what one bounded read returns (the loop calls again)."""
        assert self.reader is not None
        lost = self.reader.missed + self.reader.overflowed
        now = self.clock()
        for packet in self.reader.read():
            try:
                segment = parse_ipv4_tcp(packet.payload)
            except RoamError as error:
                self.log.event("capture_malformed", level="warning", reason=str(error))
                continue
            if segment is None:
                continue
            if (segment.dst, segment.dport) == self.vip and segment.src == self.client_address:
                if segment.syn and not segment.ack_flag:
                    self.store.on_syn(segment.sport, segment.seq, now)
                else:
                    self.store.on_segment(
                        segment.sport, segment.seq, segment.payload, segment.fin, now
                    )
            elif (segment.src, segment.sport) in self.pool and is_carrier(segment):
                self._on_carrier(segment.payload, segment.dport, now)
        if self.reader.missed + self.reader.overflowed != lost:
            # Some copies were lost: any connection may have a hole in its replay bytes.
            self.capture_losses += 1
            for conn in self.store.connections.values():
                if conn.unmigratable is None:
                    self.store._give_up(conn, "the capture lost packets (NFLOG overflow)")
            self.log.event("capture_lost_packets", level="warning")

    def _on_carrier(self, data: bytes, port: int, now: float) -> None:
        try:
            opened, carrier = open_carrier(self.carriers, data, now + self.clock_offset())
            if carrier.client_port != port:
                raise RoamError(f"carrier for port {carrier.client_port} arrived on {port}")
        except RoamError as error:
            self.rejected_carriers += 1
            # Spoofable from outside: bounded logging (migrate.ratelog).
            self.log.rejection("carrier_rejected", error=type(error).__name__, reason=str(error))
            return
        self.carriers.accept(opened)
        self.store.on_carrier(carrier, now)

    # -- answers -----------------------------------------------------------------------------

    def on_answer(self, data: bytes, source: tuple[str, int]) -> None:
        try:
            opened = self.answers.open(data, self.clock() + self.clock_offset())
            body = unframe(opened.plaintext)
            if body is None:
                self.answers.accept(opened)
                self.cover_answers += 1
                return
            answer = Answer.decode(body)
        except RoamError as error:
            self.log.rejection(  # spoofable from outside: bounded logging (migrate.ratelog)
                "answer_rejected",
                origin=f"{source[0]}:{source[1]}",
                error=type(error).__name__,
                reason=str(error),
            )
            return
        self.answers.accept(opened)
        future = self.waiting.pop((answer.phase, answer.client_port), None)
        if future is not None and not future.done():
            future.set_result(answer)

    def _send(
        self, target: Endpoint, request: Request, expect_answer: bool = True
    ) -> asyncio.Future[Answer] | None:
        assert self.transport is not None
        future: asyncio.Future[Answer] | None = None
        if expect_answer and request.phase in (Phase.PREPARE, Phase.COMMIT):
            future = asyncio.get_running_loop().create_future()
            self.waiting[(request.phase, request.client_port)] = future
        if self.cover is not None:
            # Sealed when its slot comes; a request sent again (the same phase for the same
            # connection) replaces the one still queued instead of queuing behind it.
            self.cover.put(str(target.address), request, key=(request.phase, request.client_port))
        else:
            message = self.sealer.seal(
                Kind.REINCARNATE_REQUEST, request.encode(), self.clock() + self.clock_offset()
            )
            self.transport.sendto(message, (str(target.address), self.migration_port))
        return future

    def send_slot(self, now: float) -> int:
        """Send the cover slot due at ``now`` (if any): a cell to every server, real requests
        in place of cover where queued. Sealed now, so that each is fresh when it leaves."""
        assert self.cover is not None
        assert self.transport is not None
        cell = self.cover_config.cell
        sent = 0
        for server, request in self.cover.take(now):
            plaintext = cover(cell) if request is None else frame(request.encode(), cell)
            message = self.sealer.seal(
                Kind.REINCARNATE_REQUEST, plaintext, now + self.clock_offset()
            )
            try:
                self.transport.sendto(message, (server, self.migration_port))
            except OSError as error:  # a full socket buffer: lost, like any datagram
                self.log.event("cover_send_failed", level="warning", reason=str(error))
            sent += 1
        return sent

    async def _cover_loop(self) -> None:
        assert self.cover is not None
        while True:
            await asyncio.sleep(self.cover.due_in(self.clock()))
            try:
                self.send_slot(self.clock())
            except Exception as error:  # a bug of ours must not silence the hand-overs
                self.log.event("internal_error", level="error", where="cover", reason=repr(error))

    # -- a roam ------------------------------------------------------------------------------

    def _sockets_and_capture(self) -> dict[int, sockdiag.TcpSocketInfo]:
        """The live sockets, then every copy captured until now. In this order: the kernel
        logs a segment's copy before it sends it, so each socket listed has its SYN and every
        byte it counts as sent in the capture by then. (Capture first, and a connection
        opened in between would look like one opened before the shim, and be reset.)"""
        sockets = self._live_sockets()
        self.drain_capture()
        return sockets

    def _live_sockets(self) -> dict[int, sockdiag.TcpSocketInfo]:
        found, present = {}, set()
        for info in sockdiag.tcp_sockets(dst=self.vip):
            if info.src[0] != self.client_address:
                continue
            present.add(info.src[1])
            if info.state == "ESTABLISHED":
                found[info.src[1]] = info
        # A dump is not a snapshot: it comes in several messages, and the kernel resumes its
        # walk of the socket hash between them, so sockets created or moved meanwhile can be
        # missed. Forgetting a live connection here would reset it at the next roam, so each
        # tracked connection the dump did not show is asked for exactly (one lookup each,
        # only for those) before it is believed gone.
        for port in [p for p in self.store.connections if p not in present]:
            exact = sockdiag.lookup((self.client_address, port), self.vip)
            if exact is None:
                continue
            present.add(port)
            if exact.state == "ESTABLISHED":
                found[port] = exact
        # Forget connections the kernel no longer has at all (a handshake in progress is kept).
        gone = self.store.expire(present)
        if gone:
            self.log.event("connections_ended", ports=gone[:50], count=len(gone))
        return found

    def _request(
        self, phase: Phase, epoch: int, port: int, info: sockdiag.TcpSocketInfo, start: int
    ) -> Request | None:
        conn = self.store.connections.get(port)
        if conn is None or conn.carrier is None or conn.unmigratable is not None:
            return None
        replay = self.store.replay_bytes(port, start)
        if replay is None:
            return None
        return Request(
            phase,
            epoch,
            port,
            self.bundle.service_port,
            start + len(replay),
            info.bytes_received,
            start,
            conn.carrier.sealed,
            replay,
        )

    def suggested_lead(self, base: float) -> float:
        """How early to prepare: the base lead plus the time the new server needs to
        regenerate every connection up to the client's position (all of them: it serves them
        all), at a conservative replay speed."""
        try:
            sockets = self._live_sockets()
        except (RoamError, OSError):
            return base
        total = sum(info.bytes_received for info in sockets.values())
        work = total / REGENERATE_BYTES_PER_S + len(sockets) * PREPARE_SECONDS_PER_CONNECTION
        return min(MAX_PREPARE_LEAD, base + work)

    def prepare(self, epoch: int, target: Endpoint) -> RoamRecord:
        """Send a PREPARE for every live connection; returns the roam's record."""
        record = RoamRecord(epoch, str(target), self.clock())
        for port, info in self._sockets_and_capture().items():
            conn = self.store.connections.get(port)
            if conn is not None and conn.unmigratable is None and not _verifiable(conn, info):
                continue  # too new for a usable checkpoint: handled at the commit, as a newcomer
            handoff = Handoff(port)
            record.connections[port] = handoff
            if conn is None or conn.carrier is None or conn.unmigratable is not None:
                handoff.outcome = "unmigratable"
                handoff.detail = (
                    conn.unmigratable
                    if conn is not None and conn.unmigratable
                    else "no checkpoint yet"
                    if conn is not None
                    else "opened before the shim"
                )
                continue
            self._prepare_one(handoff, target, info, conn, epoch)
        return record

    def _prepare_one(
        self,
        handoff: Handoff,
        target: Endpoint,
        info: sockdiag.TcpSocketInfo,
        conn: TrackedConnection,
        epoch: int,
    ) -> None:
        """Send the PREPARE of one connection, with its latest checkpoint."""
        assert conn.carrier is not None
        request = self._request(Phase.PREPARE, epoch, handoff.port, info, conn.carrier.c2s_fresh)
        if request is None or request.c2s_sent < acked_bytes(info):
            handoff.outcome, handoff.detail = "unmigratable", "replay bytes are incomplete"
            return
        handoff.prepared_sent = request.c2s_sent
        handoff.replayed = len(request.replay)
        handoff.request = request
        handoff.checkpoint_s2c = conn.carrier.s2c_pos
        self.store.pin(handoff.port, request.c2s_sent)
        try:
            handoff.prepare = self._send(target, request)
        except (RoamError, OSError) as error:
            handoff.outcome, handoff.detail = "failed", str(error)

    async def commit(
        self,
        record: RoamRecord,
        target: Endpoint,
        prepare_deadline: float | None = None,
        give_up_at: float | None = None,
    ) -> None:
        """Freeze, commit, switch, GO; reset what could not follow. Records every outcome.

        PREPAREs are waited for until ``prepare_deadline`` (the old server stops serving soon
        after the boundary: waiting longer would stall every connection, ready or not), and
        late ones a little longer, but never past ``give_up_at``: the new server takes COMMITs
        for its epoch only until shortly after the epoch began."""
        deadline = (
            prepare_deadline if prepare_deadline is not None else (self.clock() + PREPARE_WAIT_S)
        )
        overtime_limit = deadline + PREPARE_OVERTIME_S
        if give_up_at is not None:
            deadline = min(deadline, give_up_at)
            overtime_limit = min(overtime_limit, give_up_at)
        # Connections opened since the PREPAREs went out: prepare them now, while the old
        # server still serves (waiting a moment for the first checkpoint of the newest).
        sockets = self._sockets_and_capture()
        await self._await_carriers(sockets)
        self._newcomers(record, sockets, target, opened_before=self.clock())
        live = {p: h for p, h in record.connections.items() if h.outcome == "pending"}
        # Wait for the new server's regeneration while the old server still serves. All
        # connections at once: the waits overlap, the slowest one bounds the total.
        answers = await asyncio.gather(
            *(self._await_prepare(record, handoff, target, deadline) for handoff in live.values())
        )
        late = [h for h, a in zip(live.values(), answers, strict=True) if a is None]
        if late:
            await self._overtime(late, overtime_limit, target)
        # A connection that ended while its preparation was awaited (the download finished,
        # the server sent its FIN) needs no answer: it is closed, not failed.
        still_open = self._live_sockets() if late else {}
        for handoff, first in zip(live.values(), answers, strict=True):
            answer = first
            if answer is None and handoff.prepare is not None and handoff.prepare.done():
                answer = handoff.prepare.result()
            if answer is None and handoff.port not in still_open:
                handoff.outcome, handoff.detail = "closed", "ended before the hand-over"
                continue
            self._settle(handoff, answer, "prepare")
        record.started = self.clock()
        ready = {p: h for p, h in live.items() if h.outcome == "pending"}
        nft.apply(
            freeze_script(
                self.table, self.bundle.vip, self.bundle.service_port, list(ready), target
            )
        )
        try:
            # The copies of everything sent before the freeze are queued by now: take them all
            # before reading positions (the reader's callback may not have run yet).
            sockets = self._sockets_and_capture()
            await self._await_carriers(sockets)
            # Connections opened in the last moments, still with the old server.
            newcomers = self._newcomers(record, sockets, target, opened_before=record.started)
            if newcomers:
                nft.apply(
                    freeze_script(
                        self.table,
                        self.bundle.vip,
                        self.bundle.service_port,
                        list(newcomers),
                        target,
                    )
                )
                sockets = self._sockets_and_capture()
                answers = await asyncio.gather(
                    *(self._wait(h.prepare, self.commit_timeout) for h in newcomers.values())
                )
                for handoff, answer in zip(newcomers.values(), answers, strict=True):
                    self._settle(handoff, answer, "prepare")
                    if handoff.outcome == "pending":
                        ready[handoff.port] = handoff
            commits = []
            for port, handoff in ready.items():
                info = sockets.get(port)
                if info is None:
                    # Closed meanwhile (the server finished and sent its FIN): nothing to move,
                    # and nothing to reset either.
                    handoff.outcome, handoff.detail = "closed", "ended before the hand-over"
                    continue
                request = self._request(
                    Phase.COMMIT, record.epoch, port, info, handoff.prepared_sent
                )
                if request is None or request.c2s_sent < acked_bytes(info):
                    handoff.outcome, handoff.detail = "unmigratable", "replay bytes incomplete"
                    continue
                handoff.replayed += len(request.replay)
                handoff.commit_request = request
                handoff.commit = self._send(target, request)
                commits.append(handoff)
            answers = await asyncio.gather(*(self._await_commit(h, target) for h in commits))
            for handoff, answer in zip(commits, answers, strict=True):
                self._settle(handoff, answer, "commit")
        finally:
            nft.apply(switch_script(self.table, self.bundle.vip, self.bundle.service_port, target))
            record.switched = self.clock()
        finished = [p for p, h in record.connections.items() if h.outcome == "closed"]
        if finished:
            nft.apply(finished_script(self.table, self.bundle.vip, finished))
        for port, handoff in record.connections.items():
            if handoff.outcome == "migrated":
                go = Request(
                    Phase.GO, record.epoch, port, self.bundle.service_port, 0, 0, 0, b"", b""
                )
                self._send(target, go)
            elif handoff.outcome != "closed":
                self._reset(port, handoff)
            self.store.pin(port, None)
        self._log_roam(record)

    async def _await_prepare(
        self, record: RoamRecord, handoff: Handoff, target: Endpoint, deadline: float
    ) -> Answer | None:
        """The PREPARE's answer; sent again every ``PREPARE_RETRY_S`` while none comes (a lost
        datagram, a server still starting), until ``deadline``."""
        while True:
            wait = min(PREPARE_RETRY_S, max(0.0, deadline - self.clock()))
            answer = await self._wait(handoff.prepare, wait)
            if answer is not None or self.clock() >= deadline or handoff.prepare is None:
                return answer
            self._resend_prepare(handoff, target, self._live_sockets())

    async def _await_commit(self, handoff: Handoff, target: Endpoint) -> Answer | None:
        """The COMMIT's answer, sending it again every ``COMMIT_RETRY_S`` (a datagram lost in a
        burst); the server answers a repeat without doing the work twice."""
        deadline = self.clock() + self.commit_timeout
        while True:
            wait = min(COMMIT_RETRY_S, max(0.0, deadline - self.clock()))
            answer = await self._wait(handoff.commit, wait)
            if answer is not None or self.clock() >= deadline:
                return answer
            if handoff.commit_request is not None:
                handoff.commit = self._send(target, handoff.commit_request)

    async def _overtime(self, late: list[Handoff], limit: float, target: Endpoint) -> None:
        """Past the deadline, keep waiting (and asking) for late PREPAREs until ``limit``: the
        new server may be working through a burst, or just (re)starting. A longer pause beats
        resetting the connections; the bound keeps a dead server from stalling everyone."""
        while self.clock() < limit:
            waiting = [h for h in late if h.prepare is not None and not h.prepare.done()]
            if not waiting:
                return
            await asyncio.wait(
                {h.prepare for h in waiting if h.prepare is not None},
                timeout=min(PREPARE_RETRY_S, max(0.0, limit - self.clock())),
            )
            sockets = self._live_sockets()
            for handoff in waiting:
                if handoff.prepare is not None and not handoff.prepare.done():
                    self._resend_prepare(handoff, target, sockets)

    def _resend_prepare(
        self,
        handoff: Handoff,
        target: Endpoint,
        sockets: dict[int, sockdiag.TcpSocketInfo],
    ) -> None:
        """The same PREPARE (same checkpoint, same replay bytes: the server recognises it as a
        repeat and carries on) with the client's current position. A PREPARE already answered
        READY stays answered: the repeat only lets the server regenerate ahead of the COMMIT."""
        info = sockets.get(handoff.port)
        conn = self.store.connections.get(handoff.port)
        if handoff.request is None or info is None or conn is None:
            return
        if (
            handoff.checkpoint_s2c == 0 < info.bytes_received
            and conn.carrier is not None
            and conn.carrier.sealed != handoff.request.checkpoint
            and _verifiable(conn, info)
        ):
            # The response began after the checkpoint the PREPARE carried, which commits to
            # none of it: the new server could not verify what the client now has. A newer
            # checkpoint does: prepare again with it (the server replaces the first one).
            self._prepare_one(handoff, target, info, conn, handoff.request.epoch)
            return
        if conn.sent == handoff.prepared_sent:
            # Only bytes answering the replayed requests can be regenerated: report the new
            # position only while the client has sent nothing since (keep-alive clients send
            # the next request at once; then the COMMIT carries both).
            handoff.request = replace(handoff.request, s2c_received=info.bytes_received)
        answered = handoff.prepare is not None and handoff.prepare.done()
        sent = self._send(target, handoff.request, expect_answer=not answered)
        if not answered:
            handoff.prepare = sent

    def refresh(self, record: RoamRecord, target: Endpoint) -> None:
        """Just before the boundary: tell the new server how far each client has got, so it
        regenerates those bytes now rather than during the freeze."""
        sockets = self._sockets_and_capture()
        for handoff in record.connections.values():
            if handoff.outcome == "pending":
                self._resend_prepare(handoff, target, sockets)

    def _newcomers(
        self,
        record: RoamRecord,
        sockets: dict[int, sockdiag.TcpSocketInfo],
        target: Endpoint,
        opened_before: float,
    ) -> dict[int, Handoff]:
        """Prepare, now, the connections opened with the old server after the PREPAREs; those
        opened since ``opened_before`` (the freeze) already talk to the new server."""
        found = {}
        for port, info in sockets.items():
            if port in record.connections:
                continue
            conn = self.store.connections.get(port)
            if conn is not None and conn.opened_at >= opened_before:
                continue
            handoff = Handoff(port)
            record.connections[port] = handoff
            if conn is None or conn.carrier is None or conn.unmigratable is not None:
                handoff.outcome = "unmigratable"
                handoff.detail = "no checkpoint yet" if conn is not None else "not captured"
                continue
            self._prepare_one(handoff, target, info, conn, record.epoch)
            if handoff.outcome == "pending":
                found[port] = handoff
        return found

    async def _await_carriers(self, sockets: dict[int, sockdiag.TcpSocketInfo]) -> None:
        """Connections opened just now get their first checkpoint within a round trip: wait
        that long (bounded) rather than reset them."""
        deadline = self.clock() + CARRIER_GRACE_S
        while self.clock() < deadline:
            waiting = [
                port
                for port, info in sockets.items()
                if (conn := self.store.connections.get(port)) is not None
                and conn.unmigratable is None
                and not _verifiable(conn, info)
            ]
            if not waiting:
                return
            await asyncio.sleep(0.01)

    async def _wait(self, future: asyncio.Future[Answer] | None, timeout: float) -> Answer | None:
        if future is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None

    def _settle(self, handoff: Handoff, answer: Answer | None, step: str) -> None:
        if answer is None:
            handoff.outcome, handoff.detail = "failed", f"no answer to the {step}"
        elif answer.status is Status.READY:
            handoff.outcome = "migrated" if step == "commit" else "pending"
        else:
            handoff.outcome = answer.status.name.lower()
            handoff.detail = answer.detail

    def _reset(self, port: int, handoff: Handoff) -> None:
        if handoff.outcome == "pending":
            handoff.outcome = "failed"
        try:
            sockdiag.destroy((self.client_address, port), self.vip)
        except (RoamError, OSError) as error:
            handoff.detail += f"; reset failed: {error}"
        self.store.forget(port)

    def _log_roam(self, record: RoamRecord) -> None:
        pause_ms = round((record.switched - record.started) * 1000, 3)
        for port, handoff in record.connections.items():
            self.log.event(
                "handoff",
                epoch=record.epoch,
                server=record.server,
                port=port,
                outcome=handoff.outcome,
                detail=handoff.detail,
                bytes_replayed=handoff.replayed,
                pause_ms=pause_ms,
            )
        self.roams.append(record)
        del self.roams[:-MAX_ROAM_RECORDS]
        self.log.event("roam", **record.summary())

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.reader = NflogReader.open(self.group)
        loop.add_reader(self.reader.fileno(), self.on_capture)
        sock = datagram_socket()
        sock.bind((self.client_address, 0))
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _AnswerProtocol(self), sock=sock
        )
        if self.cover is not None:
            self._cover_task = loop.create_task(self._cover_loop())

    def close(self) -> None:
        if self._cover_task is not None:
            self._cover_task.cancel()
            self._cover_task = None
        if self.reader is not None:
            asyncio.get_running_loop().remove_reader(self.reader.fileno())
            self.reader.close()
            self.reader = None
        if self.transport is not None:
            self.transport.close()

    def status(self) -> dict[str, Any]:
        return {
            "tracked_connections": len(self.store.connections),
            "carriers_stored": self.store.carriers_stored,
            "carriers_rejected": self.rejected_carriers,
            "carriers_ignored": self.store.carriers_ignored,
            "carriers_ignored_by_reason": dict(self.store.ignored_by_reason),
            "capture_losses": self.capture_losses,
            "cover": self._cover_status(),
            "roams": [record.summary() for record in self.roams[-10:]],
        }

    def _cover_status(self) -> dict[str, Any]:
        if self.cover is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "rate": self.cover_config.rate,
            "cell_bytes": self.cover_config.cell,
            "slots": self.cover.slots,
            "cells_sent": self.cover.cells,
            "queued": self.cover.queued(),
            "dropped": self.cover.dropped,
            "replaced": self.cover.replaced,
            "answers": self.cover_answers,
        }


def _verifiable(conn: TrackedConnection, info: sockdiag.TcpSocketInfo) -> bool:
    """Whether ``conn`` holds a checkpoint a new server can verify a replay against: one that
    commits to some of the service's output, unless the client has received none yet. (The
    server pushes one as soon as the service's first bytes pass.)"""
    carrier = conn.carrier
    return carrier is not None and (carrier.s2c_pos > 0 or info.bytes_received == 0)


class _AnswerProtocol(asyncio.DatagramProtocol):
    def __init__(self, migrator: Migrator) -> None:
        self.migrator = migrator

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.migrator.on_answer(data, (str(addr[0]), int(addr[1])))
