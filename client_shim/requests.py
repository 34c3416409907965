"""The client's side of the migration port: requests out, answers in, cover between.

Requests are sealed on the client's channel (``migrate.reincarnation``) and sent to a server's
migration port; answers are opened and handed to the roam's hand-over machines. With cover
traffic (``migrate.cover``) requests wait for their slot and every server of the pool gets as
many cells of the same size, so that the wire tells neither which server is next nor when a
hand-over is prepared. The freeze's messages (COMMIT, GO, ABORT) go at once in an urgent slot
(``migrate.cover``: waiting for the grid added up to two slots to every roam's pause), one
per turn of the event loop however many connections commit together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from migrate.channel import Kind, Opener
from migrate.cover import CoverConfig, CoverSchedule, cover, frame_many, unframe_all
from migrate.endpoints import Endpoint
from migrate.errors import RoamError
from migrate.kernel.eventlog import EventLog
from migrate.kernel.udp import datagram_socket
from migrate.registration import Bundle
from migrate.reincarnation import (
    Answer,
    Phase,
    Request,
    answer_opener,
    pack_group,
    packable,
    request_sealer,
    stream_ack_opener,
    stream_sealer,
)
from migrate.replaystream import Ack, FrameReader, Positions, chunks, stream_frame

# Sent during the freeze, when the application waits: never held for the cover grid.
URGENT_PHASES = frozenset({Phase.COMMIT, Phase.GO, Phase.ABORT})

# A replay stream that makes no progress this long has failed (the request is not sent; the
# hand-over's retry tries again, from the acknowledged position).
STREAM_TIMEOUT_S = 3.0


class RequestChannel:
    def __init__(
        self,
        bundle: Bundle,
        log: EventLog,
        clock: Callable[[], float],
        clock_offset: Callable[[], float],
        on_answer: Callable[[Answer, float], None],
        *,
        migration_port: int,
        cover_config: CoverConfig,
    ) -> None:
        self.log = log
        self.clock = clock
        self.clock_offset = clock_offset
        self.deliver = on_answer
        self.migration_port = migration_port
        self.address = str(bundle.address)
        self.sealer = request_sealer(bundle.channel_key, bundle.deployment_id, bundle.client_id)
        self.answers: Opener = answer_opener(
            bundle.channel_key, bundle.deployment_id, bundle.client_id
        )
        self.transport: asyncio.DatagramTransport | None = None
        self.cover_config = cover_config
        self.cover: CoverSchedule[Request] | None = None
        if cover_config.enabled:
            servers = [str(s.address) for s in bundle.servers()]
            self.cover = CoverSchedule(
                servers, cover_config, clock(), packable=packable, pack_group=pack_group
            )
        self.cover_answers = 0
        self._cover_task: asyncio.Task[None] | None = None
        self._urgent: asyncio.Handle | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = datagram_socket()
        sock.bind((self.address, 0))
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _AnswerProtocol(self), sock=sock
        )
        if self.cover is not None:
            self._cover_task = loop.create_task(self._cover_loop())

    def close(self) -> None:
        if self._urgent is not None:
            self._urgent.cancel()
            self._urgent = None
        if self._cover_task is not None:
            self._cover_task.cancel()
            self._cover_task = None
        if self.transport is not None:
            self.transport.close()

    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        now = self.clock()
        try:
            opened = self.answers.open(data, now + self.clock_offset())
            # One answer, cover, or the answers of a packed cell (migrate.gathering).
            answers = [Answer.decode(body) for body in unframe_all(opened.plaintext)]
        except RoamError as error:
            self.log.rejection(  # spoofable from outside: bounded logging (migrate.ratelog)
                "answer_rejected",
                origin=f"{source[0]}:{source[1]}",
                error=type(error).__name__,
                reason=str(error),
            )
            return
        self.answers.accept(opened)
        if not answers:
            self.cover_answers += 1
        for answer in answers:
            self.deliver(answer, now)

    def send(self, target: Endpoint, request: Request) -> None:
        assert self.transport is not None
        if self.cover is not None:
            # Sealed when its slot comes; a request sent again (the same phase for the same
            # connection) replaces the one still queued instead of queuing behind it.
            self.cover.put(str(target.address), request, key=(request.phase, request.client_port))
            if request.phase in URGENT_PHASES and self._urgent is None:
                # After the other sends of this turn (1000 COMMITs): one slot for them all.
                self._urgent = asyncio.get_running_loop().call_soon(self._send_urgent)
            return
        message = self.sealer.seal(
            Kind.REINCARNATE_REQUEST, request.encode(), self.clock() + self.clock_offset()
        )
        try:
            self.transport.sendto(message, (str(target.address), self.migration_port))
        except OSError as error:  # a full socket buffer: lost like a datagram, and retried
            self.log.event("request_send_failed", level="warning", reason=str(error))

    def send_slot(self, now: float) -> int:
        """Send the cover slot due at ``now`` (if any): a cell to every server, real requests
        in place of cover where queued. Sealed now, so that each is fresh when it leaves."""
        assert self.cover is not None
        return self._send_cells(self.cover.take(now), now)

    def flush_urgent(self) -> None:
        """Send the queued urgent requests now, not at the loop's next turn: the caller has
        queued its whole burst (a freeze's COMMITs, the GOs after the switch), and whatever
        else the loop has ready would otherwise go first, inside the pause."""
        if self._urgent is not None:
            self._urgent.cancel()
            self._send_urgent()

    def _send_urgent(self) -> None:
        self._urgent = None
        if self.cover is not None and self.transport is not None:
            self._send_cells(self.cover.take_urgent(), self.clock())
            if self.cover.queued():
                # A burst wider than a slot (1000 COMMITs): the rest in the next loop turn,
                # not on the grid.
                self._urgent = asyncio.get_running_loop().call_soon(self._send_urgent)

    def _send_cells(self, cells: list[tuple[str, tuple[Request, ...]]], now: float) -> int:
        assert self.transport is not None
        cell = self.cover_config.cell
        sent = 0
        for server, requests in cells:
            plaintext = (
                frame_many([request.encode() for request in requests], cell)
                if requests
                else cover(cell)
            )
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

    def cover_status(self) -> dict[str, Any]:
        if self.cover is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "rate": self.cover_config.rate,
            "cell_bytes": self.cover_config.cell,
            "slots": self.cover.slots,
            "urgent_slots": self.cover.urgent_slots,
            "cells_sent": self.cover.cells,
            "packed": self.cover.packed,
            "queued": self.cover.queued(),
            "dropped": self.cover.dropped,
            "replaced": self.cover.replaced,
            "answers": self.cover_answers,
        }


class ReplayStreams:
    """The client's replay streams (migrate.replaystream): one TCP connection per server,
    chunks sealed like requests, acknowledgements opened like answers."""

    def __init__(self, channel: RequestChannel, bundle: Bundle, log: EventLog) -> None:
        self.channel = channel
        self.sealer = stream_sealer(bundle.channel_key, bundle.deployment_id, bundle.client_id)
        self.acks = stream_ack_opener(bundle.channel_key, bundle.deployment_id, bundle.client_id)
        self.log = log
        self.positions = Positions()
        self.streams: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.sent_bytes = 0  # replay bytes sent on streams (re-sent per roam included)
        self.failures = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def send(self, target: Endpoint, request: Request) -> None:
        """Send ``request`` to ``target``: a streamed one's bytes go on the replay stream first
        (in a task) and the datagram once the server acknowledged them. Lost like a datagram
        if either fails (the hand-over's retry sends it again)."""
        if request.streamed:
            self._spawn(self._push_then_send(target, request))
        else:
            self._send_datagram(target, request)

    def top_up(self, target: Endpoint, request: Request, data: bytes | None) -> None:
        """Stream ``data``, the bytes the application wrote since ``request`` (a streamed
        PREPARE), so that the COMMIT, during the freeze, carries only the last few."""
        if data:
            self._spawn(
                self.push_bytes(
                    target, request.epoch, request.client_port, request.vport,
                    request.c2s_sent, data,
                )
            )  # fmt: skip

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_then_send(self, target: Endpoint, request: Request) -> None:
        if await self.push(target, request):
            self._send_datagram(target, request)

    def _send_datagram(self, target: Endpoint, request: Request) -> None:
        try:
            self.channel.send(target, request)
        except (RoamError, OSError) as error:  # lost like a datagram: retried
            self.log.event("request_send_failed", level="warning", reason=str(error))

    async def push(self, target: Endpoint, request: Request) -> bool:
        """Make ``target`` hold the streamed part of ``request``; whether it does."""
        server = str(target.address)
        port = request.client_port
        start, end = request.replay_from, request.replay_from + request.streamed
        data = request.replay[: request.streamed]
        pushed = await self.push_bytes(target, request.epoch, port, request.vport, start, data)
        return pushed and self.positions.covers(server, port, start, end)

    async def push_bytes(
        self, target: Endpoint, epoch: int, port: int, vport: int, start: int, data: bytes
    ) -> bool:
        """Send what ``target`` has not acknowledged of ``data`` (the bytes from ``start``)."""
        server = str(target.address)
        end = start + len(data)
        lock = self.locks.setdefault(server, asyncio.Lock())
        async with lock:
            base, send_from = self.positions.plan(server, port, start, end)
            if send_from >= end:
                return True
            try:
                await asyncio.wait_for(
                    self._send(
                        server, epoch, port, vport, base, send_from, data[send_from - start :], end
                    ),
                    STREAM_TIMEOUT_S + len(data) / 10e6,
                )
            except (TimeoutError, OSError, RoamError) as error:
                self.failures += 1
                self.log.event("replay_stream_failed", level="warning", server=server,
                               port=port, reason=str(error) or type(error).__name__)  # fmt: skip
                self._close(server)
                return False
            return True

    async def _send(
        self, server: str, epoch: int, port: int, vport: int, base: int, start: int,
        data: bytes, end: int,
    ) -> None:  # fmt: skip
        stream = self.streams.get(server)
        if stream is None:
            stream = await asyncio.open_connection(
                server, self.channel.migration_port, local_addr=(self.channel.address, 0)
            )
            self.streams[server] = stream
        reader, writer = stream
        clock = self.channel.clock
        for chunk in chunks(epoch, port, vport, base, start, data):
            sealed = self.sealer.seal(
                Kind.REINCARNATE_REQUEST, chunk.encode(), clock() + self.channel.clock_offset()
            )
            writer.write(stream_frame(sealed))
            self.sent_bytes += len(chunk.data)
            await writer.drain()
        frames = FrameReader()
        while not self.positions.covers(server, port, start, end):
            data_in = await reader.read(65536)
            if not data_in:
                raise RoamError("the server closed the replay stream")
            for message in frames.feed(data_in):
                opened = self.acks.open(message, clock() + self.channel.clock_offset())
                self.acks.accept(opened)
                self.positions.on_ack(server, Ack.decode(opened.plaintext))

    def _close(self, server: str) -> None:
        self.positions.forget(server)
        stream = self.streams.pop(server, None)
        if stream is not None:
            stream[1].close()

    def close(self) -> None:
        for server in list(self.streams):
            self._close(server)

    def status(self) -> dict[str, int]:
        return {"streams": len(self.streams), "bytes_sent": self.sent_bytes,
                "failures": self.failures}  # fmt: skip


class _AnswerProtocol(asyncio.DatagramProtocol):
    def __init__(self, channel: RequestChannel) -> None:
        self.channel = channel

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.channel.on_datagram(data, (str(addr[0]), int(addr[1])))
