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
from migrate.cover import CoverConfig, CoverSchedule, cover, frame, unframe
from migrate.endpoints import Endpoint
from migrate.errors import RoamError
from migrate.kernel.eventlog import EventLog
from migrate.kernel.udp import datagram_socket
from migrate.registration import Bundle
from migrate.reincarnation import Answer, Phase, Request, answer_opener, request_sealer

# Sent during the freeze, when the application waits: never held for the cover grid.
URGENT_PHASES = frozenset({Phase.COMMIT, Phase.GO, Phase.ABORT})


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
            self.cover = CoverSchedule(servers, cover_config, clock())
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
            body = unframe(opened.plaintext)
            answer = Answer.decode(body) if body is not None else None
        except RoamError as error:
            self.log.rejection(  # spoofable from outside: bounded logging (migrate.ratelog)
                "answer_rejected",
                origin=f"{source[0]}:{source[1]}",
                error=type(error).__name__,
                reason=str(error),
            )
            return
        self.answers.accept(opened)
        if answer is None:
            self.cover_answers += 1
            return
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

    def _send_urgent(self) -> None:
        self._urgent = None
        if self.cover is not None and self.transport is not None:
            self._send_cells(self.cover.take_urgent(), self.clock())
            if self.cover.queued():
                # A burst wider than a slot (1000 COMMITs): the rest in the next loop turn,
                # not on the grid.
                self._urgent = asyncio.get_running_loop().call_soon(self._send_urgent)

    def _send_cells(self, cells: list[tuple[str, Request | None]], now: float) -> int:
        assert self.transport is not None
        cell = self.cover_config.cell
        sent = 0
        for server, request in cells:
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
            "queued": self.cover.queued(),
            "dropped": self.cover.dropped,
            "replaced": self.cover.replaced,
            "answers": self.cover_answers,
        }


class _AnswerProtocol(asyncio.DatagramProtocol):
    def __init__(self, channel: RequestChannel) -> None:
        self.channel = channel

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.channel.on_datagram(data, (str(addr[0]), int(addr[1])))
