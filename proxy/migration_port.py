"""The migration port of a server: opening requests, admitting them, sealing answers.

Every datagram on the port is opened with its client's key (``migrate.reincarnation``), and
every phase is checked before it reaches a hand-over machine: the client is not revoked, sends
from its registered address and is not blocked for its rate contract (``check_sender``); a
PREPARE or COMMIT is admitted for an epoch this server serves, within the request window, with
a checkpoint of the pool that commits to its replay bytes (``admit``). Answers are sealed for
the client and, to a client that frames its requests (migrate.cover), sent as one cell of
``ANSWER_CELL_BYTES``: cover answers and real ones look alike, and none is larger than the
request that caused it (no amplification).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from enum import Enum

from migrate.channel import Kind, Opened, Opener, Sealer
from migrate.checkpoint import CheckpointKeys
from migrate.cover import (
    ANSWER_CELL_BYTES,
    ENVELOPE_BYTES,
    MIN_CELL_BYTES,
    cover,
    frame,
    frame_many,
    is_framed,
    unframe_all,
)
from migrate.errors import (
    InconsistentUpdateError,
    MalformedMessageError,
    RoamError,
    WindowClosedError,
)
from migrate.gathering import Gatherer, Gathering, fit_answers
from migrate.handover import Send, ServerHandover
from migrate.registration import ClientRecord
from migrate.reincarnation import (
    LATE_REQUEST_S,
    PREPARE_AHEAD_S,
    Admitted,
    Answer,
    Phase,
    Request,
    admit,
    answer_sealer,
    check_client_source,
    client_id_of,
    in_request_window,
    pack_group,
    request_opener,
    stream_ack_sealer,
    stream_opener,
)
from migrate.replaystream import (
    MAX_FRAME_BYTES,
    PER_CLIENT_RUNS,
    TOTAL_RUNS,
    Chunk,
    FrameReader,
    ReplayBuffers,
    stream_frame,
)
from proxy.livecontext import LiveContext

# Replay streams open at once (each holds a socket and at most a frame); idle ones are closed.
MAX_STREAMS = 256
STREAM_IDLE_S = 10.0

# Epochs a request may be from the current one (far more than PREPARE_AHEAD_S and
# LATE_REQUEST_S span with any sane epoch length; bounds the schedule walk a request costs).
MAX_EPOCH_DISTANCE = 256

Key = tuple[str, int]


class MigrationPort:
    def __init__(
        self,
        context: LiveContext,
        keys: CheckpointKeys,
        counts: dict[str, int],
        connections: Callable[[], Collection[Key]],
    ) -> None:
        self.context = context
        self.keys = keys
        self.counts = counts
        self.connections = connections
        self.openers: dict[int, Opener] = {}
        self.answer_sealers: dict[int, Sealer] = {}
        # Clients that frame their requests (migrate.cover) get one answer cell (of
        # ANSWER_CELL_BYTES, or a packed cell's answers together) per request cell.
        self.framed_clients: set[int] = set()
        # The answers owed to packed cells of PREPAREs or COMMITs (migrate.gathering).
        self.gatherer: Gatherer[tuple[ClientRecord, tuple[str, int]]] = Gatherer()
        self.transport: asyncio.DatagramTransport | None = None
        self.stream_openers: dict[int, Opener] = {}
        self.ack_sealers: dict[int, Sealer] = {}
        per_client = max(PER_CLIENT_RUNS * context.max_replay, 16 * 1024 * 1024)
        self.buffers = ReplayBuffers(
            context.max_replay, per_client, max(TOTAL_RUNS * context.max_replay, per_client)
        )
        self.streams = 0
        self.counts.setdefault("streamed_bytes", 0)
        self.counts.setdefault("streams_refused", 0)

    # -- the replay stream (migrate.replaystream) -------------------------------------------

    async def serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One client's replay stream: sealed chunks in, sealed acknowledgements out. Any
        refusal closes the stream with one (rate-limited) log line; nothing is stored."""
        peer = writer.get_extra_info("peername")
        source = (str(peer[0]), int(peer[1])) if peer else ("?", 0)
        if self.streams >= MAX_STREAMS:
            self.counts["streams_refused"] += 1
            writer.close()
            return
        self.streams += 1
        frames = FrameReader(MAX_FRAME_BYTES)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), STREAM_IDLE_S)
                if not data:
                    return
                for message in frames.feed(data):
                    writer.write(stream_frame(self.on_chunk(message, source)))
                await writer.drain()
        except RoamError as error:
            self.counts["streams_refused"] += 1
            self.reject(source, error)
        except (TimeoutError, OSError):
            pass
        finally:
            self.streams -= 1
            writer.close()

    def on_chunk(self, message: bytes, source: tuple[str, int]) -> bytes:
        """Store one sealed chunk; its sealed acknowledgement."""
        context = self.context
        client_id = client_id_of(message)
        found = context.pool.clients.by_id(client_id)
        if found is None:
            raise RoamError(f"unknown client id {client_id}")
        record = context.pool.record(found)
        opener = self.stream_openers.get(client_id)
        if opener is None:
            opener = stream_opener(record.channel_key, context.deployment_id, client_id)
            self.stream_openers[client_id] = opener
        opened = opener.open(message, context.clock())
        chunk = Chunk.decode(opened.plaintext)
        check_client_source(record, source[0])
        context.pool.check_client_allowed(record, max(context.epoch(), 1))
        pool = context.pool
        if record.client_id in pool.blocks and record.client_id in pool.blocked(context.epoch()):
            raise RoamError(f"client {record.name!r} is blocked here (over its rate contract)")
        if abs(chunk.epoch - context.epoch()) > MAX_EPOCH_DISTANCE:
            raise RoamError(f"replay chunk for epoch {chunk.epoch}, far from the current one")
        ack = self.buffers.add(client_id, chunk, context.clock())
        opener.accept(opened)
        self.counts["streamed_bytes"] += len(chunk.data)
        sealer = context.sealer(self.ack_sealers, stream_ack_sealer, record)
        return sealer.seal(Kind.REINCARNATE_READY, ack.encode(), context.clock())

    def with_streamed(self, record: ClientRecord, request: Request) -> Request:
        """A request whose first replay bytes came on the stream, with them put back."""
        if not request.streamed:
            return request
        start = request.replay_from
        data = self.buffers.slice(
            record.client_id, request.client_port, start, start + request.streamed
        )
        if data is None:
            raise RoamError(
                f"replay bytes [{start}, {start + request.streamed}) were not streamed here "
                f"(held: {self.buffers.describe(record.client_id, request.client_port)})"
            )
        return request.with_streamed(data)

    def open(
        self, data: bytes, source: tuple[str, int]
    ) -> tuple[ClientRecord, Opener, Opened, list[Request]] | None:
        """The requests in ``data`` (one, or the GOs and ABORTs of a packed cell), checked for
        their sender; None for cover (answered here)."""
        pool = self.context.pool
        client_id = client_id_of(data)
        found = pool.clients.by_id(client_id)
        if found is None:
            raise RoamError(f"unknown client id {client_id}")
        record = pool.record(found)
        opener = self.openers.get(client_id)
        if opener is None:
            opener = request_opener(record.channel_key, self.context.deployment_id, client_id)
            self.openers[client_id] = opener
        opened = opener.open(data, self.context.clock())
        framed = is_framed(opened.plaintext)
        if framed and len(data) < MIN_CELL_BYTES:
            # Framed answers are ANSWER_CELL_BYTES: never more than the request (no
            # amplification, even by an authentic client towards its own address).
            raise MalformedMessageError(f"a framed request of {len(data)} bytes is too small")
        requests = [Request.decode(body) for body in unframe_all(opened.plaintext)]
        if len({pack_group(request) for request in requests}) > 1:
            # Their answers could not be one cell (cover's one answer per cell).
            phases = sorted({request.phase.name for request in requests})
            raise MalformedMessageError(
                f"a packed cell mixes {' and '.join(phases)}: a cell holds PREPAREs, COMMITs, "
                "or GOs and ABORTs"
            )
        for request in requests:
            self.check_sender(record, source[0], request)
        if framed and source[0] == str(record.address):
            self.framed_clients.add(record.client_id)
        if not requests:
            self.on_cover(record, opener, opened, source)
            return None
        return record, opener, opened, requests

    # -- answers -----------------------------------------------------------------------------

    def send(self, record: ClientRecord, answer: Answer | None, target: tuple[str, int]) -> None:
        """Seal and send ``answer``; ``None``: a cover answer, to a client that frames only
        (each of its requests gets one answer of one size). An answer a packed cell waits for
        joins its neighbours' instead (``gather``)."""
        cell = self.gatherer.absorb(record.client_id, answer)
        if cell is not None:
            if cell.answerable and not self.gatherer.working:
                self.answer_cell(cell)
            return
        framed = record.client_id in self.framed_clients
        if self.transport is None or (answer is None and not framed):
            return
        sealer = self.context.sealer(self.answer_sealers, answer_sealer, record)
        if answer is None:
            body = cover(ANSWER_CELL_BYTES)
        else:
            body = frame(answer.encode(), ANSWER_CELL_BYTES) if framed else answer.encode()
        message = sealer.seal(Kind.REINCARNATE_READY, body, self.context.clock())
        self.transport.sendto(message, target)

    def gather(
        self, record: ClientRecord, requests: list[Request], source: tuple[str, int], cell: Opened
    ) -> Gathering[tuple[ClientRecord, tuple[str, int]]]:
        """A packed cell, about to be worked on request by request: what they answer, now or
        when their work ends, is sent as one answer cell, no larger than the cell."""
        return self.gatherer.begin(
            record.client_id,
            requests[0].phase,
            [request.client_port for request in requests],
            (record, source),
            len(cell.plaintext) + ENVELOPE_BYTES,
            self.context.clock(),
        )

    def answer_from(
        self, done: ServerHandover, request: Request, record: ClientRecord, source: Key
    ) -> None:
        """Feed a finished machine a repeated request: it only answers (nothing to execute)."""
        done.receive(request, self.context.clock())
        for action in done.actions():
            if isinstance(action, Send):
                self.send(record, action.answer, source)

    def answer_cell(self, cell: Gathering[tuple[ClientRecord, tuple[str, int]]]) -> None:
        """Send a packed cell's answers in one answer cell: cover if no request had more to
        say than "nothing new", nothing if every one was refused."""
        if not self.gatherer.done(cell):
            return
        record, target = cell.to
        if self.transport is None or not (cell.answers or cell.said_nothing):
            return
        if cell.answers:
            body = frame_many(fit_answers(cell.answers, cell.budget), ANSWER_CELL_BYTES)
        else:
            body = cover(ANSWER_CELL_BYTES)
        sealer = self.context.sealer(self.answer_sealers, answer_sealer, record)
        message = sealer.seal(Kind.REINCARNATE_READY, body, self.context.clock())
        self.transport.sendto(message, target)

    def answer_due(self, now: float) -> None:
        """Answer the packed cells that waited long enough for their slowest request."""
        for cell in self.gatherer.due(now):
            self.answer_cell(cell)

    def on_cover(
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
        self.send(record, None, source)

    def reject(self, source: tuple[str, int], error: RoamError) -> None:
        self.counts["refused"] += 1
        # Spoofable from outside (and repeatable by an insider): bounded logging
        # (migrate.ratelog), never one line per datagram.
        self.context.log.rejection(
            "reincarnation_rejected",
            origin=f"{source[0]}:{source[1]}",
            error=type(error).__name__,
            reason=str(error),
        )

    # -- admission ---------------------------------------------------------------------------

    def check_sender(self, record: ClientRecord, source: str, request: Request) -> None:
        """Checks of every phase: the client is not revoked, sends from its address, and is not
        blocked here for exceeding its rate contract."""
        check_client_source(record, source)
        pool = self.context.pool
        if (
            request.phase is not Phase.ABORT
            and record.client_id in pool.blocks  # cheap first: blocks are rare
            and record.client_id in pool.blocked(self.context.epoch())
        ):
            raise RoamError(
                f"client {record.name!r} is blocked here (over its rate contract) until the "
                "service roams"
            )

    def admit(
        self, opened: Opened, request: Request, record: ClientRecord, source: str
    ) -> Admitted:
        context = self.context
        schedule = context.pool.schedule
        now = context.clock()
        current = context.epoch()
        not_served: RoamError | None = None
        try:
            # From a little before the epoch (prepare) to a little after its start (the
            # commit of a hand-over that started late), and at no other time of the epoch.
            if abs(request.epoch - current) > MAX_EPOCH_DISTANCE:
                # Far from now: refused before the schedule is walked that far (a walk of
                # thousands of epochs would stall every connection of this server).
                raise RoamError(f"epoch {request.epoch} is too far from the current {current}")
            start = schedule.start_of(request.epoch)
            server = (
                schedule.server_for(request.epoch)
                if context.assigned is None  # k of N: the client's own server in the epoch
                else context.assigned(request.epoch, record.client_id)
            )
            serves = (str(server.address), server.port) == context.listen
            if serves and not in_request_window(start, now):
                raise RoamError(
                    f"epoch {request.epoch} starts {start - now:+.1f} s from now: requests "
                    f"for it are taken from {PREPARE_AHEAD_S:.0f} s before its start to "
                    f"{LATE_REQUEST_S:.0f} s after"
                )
            # Never for an epoch whose window has closed (see ``behind_closed_gate``); the
            # windows of the epochs after it that this server also serves count as its own.
            if serves and now >= (closes := schedule.served_until(request.epoch, now)):
                raise WindowClosedError(
                    f"the window of epoch {request.epoch} on this server closed "
                    f"{now - closes:.1f} s ago"
                )
            length = schedule.epoch(request.epoch).length
        except WindowClosedError as error:
            serves, length, not_served = False, 0.0, error
        except RoamError as error:
            serves, length = False, 0.0
            not_served = InconsistentUpdateError(str(error))
        # Revoked or past its subscription (and lease) at the running epoch: refused, like
        # at the gate.
        context.pool.check_client_allowed(record, max(current, 1))
        granted = record.grant_for(current, context.chain_length)
        return admit(
            opened,
            request,
            record,
            source,
            granted,
            serves,
            self.keys.candidates(request.epoch),
            context.deployment_id,
            now=now,
            epoch_length=length,
            # The replay sends a checkpoint's session state first (proxy.replay).
            replays_state=True,
            not_served=not_served,
        )

    def behind_closed_gate(self, epoch: int) -> bool:
        """Whether a connection for ``epoch`` would be created behind a closed gate: the
        epoch's window has closed, or it has opened and the gate is closed all the same (a
        reactive roam). Just before the window opens (a client's clock a little ahead) the
        gate is still closed but is about to open: that is not behind it."""
        schedule = self.context.pool.schedule
        now = self.context.clock()
        try:
            window = schedule.window(epoch)
            # The epochs right after it on this server keep the gate open (windows merge).
            closes = schedule.served_until(epoch, now)
        except RoamError:
            return True
        return now >= closes or (window.opens <= now and not self.context.gate_open())

    def start_behind_closed_gate(self, epoch: int) -> bool:
        """Whether a restored connection for ``epoch`` must not start now (at its GO, or the
        GO's timeout): ``behind_closed_gate``, unless the gate has not closed yet. The shim's
        tick closes it, and leaves every connection, a few ms after the window (later on a
        busy host); a GO in between is of a hand-over that ended at the boundary, whose client
        has switched here. Refused, its connection would meet no socket here, and the client a
        RST, until the gate closed; started, it is left with the others, its checkpoint pushed
        first, and the client's next roam moves it. Not with k of N, where a client's
        connections are left while the gate stays open."""
        if self.context.client_leaving_at is None and self.context.gate_open():
            return False
        return self.behind_closed_gate(epoch)

    def describe_clash(self, key: Key) -> str:
        """Which socket already holds the 4-tuple a re-incarnation needs (for the log)."""
        from migrate.kernel import sockdiag

        try:
            found = sockdiag.lookup(self.context.listen, key)
        except (OSError, RoamError):
            return ""
        if found is None:
            return "; no such socket any more"
        known = key in self.connections()
        return (
            f"; it is in state {found.state} (inode {found.inode}), "
            f"{'a connection of ours' if known else 'not a connection we track'}"
        )


def count_states(states: Iterable[Enum]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state.value] = counts.get(state.value, 0) + 1
    return counts


class MigrationProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.on_datagram(data, (str(addr[0]), int(addr[1])))
