"""The work of a re-incarnation on the new server: replay, regenerate, verify, restore.

``ServerHandover`` (migrate.handover) decides what to do; this module does it on real sockets:
a fresh connection to the service (from the client's address when transparent), the client's
replayed bytes into it, the service's output read up to the client's position and checked
against the checkpoint's commitment, and finally the client-facing socket created with
TCP_REPAIR at the client's sequence numbers. Bytes the client already has are dropped as they
arrive; those beyond its position are kept, to be sent first once the connection is live.

An HTTP response with a strong validator and byte ranges is regenerated from the client's
position instead of its start (``migrate.rangeplan``): the request is replayed with ``Range``
and ``If-Range``, the 206's head is checked and dropped, and the body bytes in the checkpoint's
window are compared with its hash; a 200 (If-Range fell back) is read from the start and
verified as any other response.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import socket
from collections.abc import Awaitable, Callable

from migrate.checkpoint import Checkpoint
from migrate.codec import state_replies
from migrate.errors import RoamError
from migrate.handover import SERVICE_IDLE_S
from migrate.kernel import sockdiag, tcp_repair
from migrate.rangeplan import (
    FromFreshPoint,
    Partial,
    Plan,
    RangeDiverged,
    RangePlan,
    check_answer,
    head_length,
)
from migrate.rangeplan import plan as plan_regeneration
from migrate.reincarnation import Request, Status
from migrate.streamstate import StreamState
from proxy.relay import close_abortively

SEQ_MOD = 2**32
TS_MARGIN_MS = 250  # a restored socket's timestamps run this far ahead of the checkpoint's
REGENERATE_BUFFER_BYTES = 256 * 1024
HALF_OPEN_RETRIES = 3  # half-open entries dropped per restore before giving up


class Diverged(Exception):
    """The replayed service did not answer with the same bytes."""


def failure_of(error: Exception) -> tuple[Status, str] | None:
    """The answer to a step that raised ``error``; None for a bug of ours (not the network's,
    the service's or the client's)."""
    if isinstance(error, Diverged):
        return Status.DIVERGED, str(error)
    if isinstance(error, OSError | TimeoutError | RoamError):
        return Status.FAILED, f"{type(error).__name__}: {error}"
    return None


class Replayer:
    """One re-incarnation's service connection and regenerated stream."""

    def __init__(self, checkpoint: Checkpoint, prepare: Request) -> None:
        self.checkpoint = checkpoint
        self.prepare = prepare
        self.stream = StreamState(
            checkpoint.codec,
            c2s_start=checkpoint.c2s_fresh,
            s2c_start=checkpoint.s2c_fresh,
            state=checkpoint.state,
        )
        self.service: socket.socket | None = None
        self.unsent = bytearray()
        self.verified = False
        self.sock: socket.socket | None = None  # the restored client-facing socket
        self.s2c_base = 0  # the client's position when the socket was created
        self.half_open_cleared = 0  # spoofed half-open entries dropped to restore
        self.plan: Plan = (
            plan_regeneration(checkpoint, prepare.replay, prepare.s2c_received)
            if checkpoint.codec == "http"
            else FromFreshPoint(f"the {checkpoint.codec} codec")
        )
        self.window: hashlib._Hash | None = None  # the range's window, hashed as it is read
        self.regenerated = 0  # service bytes read (after a range's head)

    async def start(self, connect: Callable[[], Awaitable[socket.socket]], until: int) -> int:
        """Connect the service, replay the PREPARE's bytes, regenerate to ``until``."""
        self.service = await connect()
        if self.checkpoint.state:
            await self._restore_session()
        self.stream.feed_c2s(self.prepare.replay)
        loop = asyncio.get_running_loop()
        if isinstance(self.plan, RangePlan):
            await loop.sock_sendall(self.service, self.plan.request)
            rest = await self._range_head(self.plan)
            self._take(rest, until)
        else:
            await loop.sock_sendall(self.service, self.prepare.replay)
        return await self.regenerate(until)

    @property
    def by_range(self) -> bool:
        """Whether the response is regenerated from a range (so far as its head was read)."""
        return isinstance(self.plan, RangePlan)

    async def _range_head(self, chosen: RangePlan) -> bytes:
        """Read and check the replica's head to the range request; returns the bytes read
        after it. A 200 (the same validator, ranges ignored) turns this into a regeneration
        from the start: its head is then part of the response."""
        assert self.service is not None
        loop = asyncio.get_running_loop()
        head = bytearray()
        buffer = bytearray(64 * 1024)
        while (length := self._head_length(head)) is None:
            try:
                async with asyncio.timeout(SERVICE_IDLE_S):
                    received = await loop.sock_recv_into(self.service, buffer)
            except TimeoutError:
                raise Diverged("the service did not answer the range request") from None
            if not received:
                raise Diverged("the service closed instead of answering the range request")
            head += memoryview(buffer)[:received]
        try:
            answer = check_answer(bytes(head[:length]), chosen)
        except RangeDiverged as error:
            raise Diverged(str(error)) from None
        if isinstance(answer, Partial):
            self.stream.resume_range(chosen.record, chosen.s2c_start)
            self.window = hashlib.sha256()
            return bytes(head[length:])
        self.plan = FromFreshPoint("the replica ignored the range request")
        return bytes(head)

    @staticmethod
    def _head_length(head: bytearray) -> int | None:
        try:
            return head_length(head)
        except RangeDiverged as error:
            raise Diverged(str(error)) from None

    async def _restore_session(self) -> None:
        """A session's state first (a redis AUTH, SELECT, HELLO...: migrate.resp): sent to the
        fresh service connection, its replies read and dropped (the client had them long
        ago), and refused if the service no longer accepts it."""
        assert self.service is not None
        loop = asyncio.get_running_loop()
        state = self.checkpoint.state
        await loop.sock_sendall(self.service, state)
        replies = state_replies(self.checkpoint.codec, state)
        buffer = bytearray(64 * 1024)
        while not replies.done:
            try:
                async with asyncio.timeout(SERVICE_IDLE_S):
                    received = await loop.sock_recv_into(self.service, buffer)
            except TimeoutError:
                raise Diverged("the service did not answer the session's state") from None
            if not received:
                raise Diverged("the service closed while the session's state was restored")
            used = replies.feed(memoryview(buffer)[:received])
            if replies.refused is not None:
                raise Diverged(f"the service refused the session's state: {replies.refused}")
            if used != received:
                # Nothing else was sent yet: anything more is not an answer to the state.
                raise Diverged("the service sent more than the session's replies")

    async def regenerate(self, until: int) -> int:
        """Read the replayed service until ``until``, the client's position, and at least to
        the checkpoint's position, where the commitment is checked. Returns the position."""
        checkpoint = self.checkpoint
        stream = self.stream
        assert self.service is not None
        # Bytes already read beyond the old ``until`` that the client has by now.
        unsent_from = stream.s2c_pos - len(self.unsent)
        del self.unsent[: max(0, min(len(self.unsent), until - unsent_from))]
        # The checkpoint commits to none of the service's bytes and the connection never
        # completed an exchange either (a young connection whose newer checkpoint had not
        # reached its client): nothing checks the regenerated bytes the client already has.
        # Safe only if the client is exactly at the end of a regenerated exchange: what it has
        # is then whole (from the old server) and what follows starts a new exchange on both
        # sides. Inside a response, a replica answering differently would splice two answers.
        # (After a completed exchange, bytes past the fresh point belong to later exchanges of
        # a service that has answered identically so far.)
        unchecked = checkpoint.s2c_pos == checkpoint.s2c_fresh == 0 < until
        goal = until if self.verified else max(until, checkpoint.s2c_pos)
        self._verify()
        loop = asyncio.get_running_loop()
        # One reused buffer per step: many re-incarnations regenerate at once, and a fresh
        # allocation per read (what sock_recv does) costs more than the read.
        buffer = memoryview(bytearray(min(REGENERATE_BUFFER_BYTES, max(1, goal - stream.s2c_pos))))
        while stream.s2c_pos < goal:
            view = buffer[: min(len(buffer), max(1, goal - stream.s2c_pos))]
            try:
                async with asyncio.timeout(SERVICE_IDLE_S):
                    received = await loop.sock_recv_into(self.service, view)
            except TimeoutError:
                raise Diverged(
                    f"the service stopped after {stream.s2c_pos} bytes, short of {goal}"
                ) from None
            if not received:
                raise Diverged(
                    f"the service closed after {stream.s2c_pos} bytes; the checkpoint has "
                    f"{checkpoint.s2c_pos}"
                )
            self._take(view[:received], until)
        if unchecked and not any(c.s2c == until for c in stream.candidates[1:]):
            raise Diverged(
                f"unverifiable: the checkpoint covers none of the {until} bytes the client has, "
                "and the replayed service's answer does not end there"
            )
        return stream.s2c_pos

    def _take(self, chunk: bytes | memoryview, until: int) -> None:
        """Regenerated bytes: fed to the stream state, those the client lacks kept, the
        commitment checked exactly at the checkpoint's position on the way."""
        stream = self.stream
        checkpoint = self.checkpoint
        view = memoryview(chunk)
        self.regenerated += len(view)
        while view:
            start = stream.s2c_pos
            cut = len(view)
            if not self.verified and start < checkpoint.s2c_pos:
                cut = min(cut, checkpoint.s2c_pos - start)
            piece, view = view[:cut], view[cut:]
            if self.window is not None and not self.verified:
                window_start = checkpoint.range.window_start if checkpoint.range else start
                self.window.update(piece[max(0, window_start - start) :])
            stream.feed_s2c(piece)
            if stream.s2c_pos > until:
                self.unsent += piece[max(0, until - start) :]
            self._verify()

    def _verify(self) -> None:
        """Compare the regenerated bytes with the checkpoint's commitment, exactly at the
        checkpoint's position (which may be the fresh point itself: nothing to compare): the
        whole response's hash, or the window's for a range."""
        checkpoint = self.checkpoint
        stream = self.stream
        if self.verified or stream.s2c_pos != checkpoint.s2c_pos:
            return
        if self.window is not None:
            assert checkpoint.range is not None
            if self.window.digest() != checkpoint.range.window_hash:
                raise Diverged(
                    "the replica's body differs from the client's in the "
                    f"{checkpoint.s2c_pos - checkpoint.range.window_start} bytes before the "
                    "checkpoint's position (the same validator)"
                )
        else:
            fresh_hash = stream.candidates[0].s2c_hash
            if fresh_hash is None or fresh_hash.digest() != checkpoint.s2c_hash:
                raise Diverged(
                    "the replayed service answered with different bytes (from "
                    f"{checkpoint.s2c_fresh} to {checkpoint.s2c_pos}, after "
                    f"{checkpoint.c2s_pos - checkpoint.c2s_fresh} request bytes"
                    f"{'' if fresh_hash is not None else '; no hash kept from the fresh point'})"
                )
        self.verified = True

    async def commit(self, request: Request, listen: tuple[str, int], now: float) -> int:
        """Replay the COMMIT's bytes, regenerate to its position, restore the client socket."""
        assert self.service is not None
        if request.replay_from != self.stream.c2s_pos:
            raise RoamError(
                f"commit replay starts at {request.replay_from}, prepared up to "
                f"{self.stream.c2s_pos}"
            )
        if request.replay:
            self.stream.feed_c2s(request.replay)
            await asyncio.get_running_loop().sock_sendall(self.service, request.replay)
        position = await self.regenerate(request.s2c_received)
        self.sock = self._restore(request, listen, now)
        self.s2c_base = request.s2c_received
        return position

    def _restore(self, request: Request, listen: tuple[str, int], now: float) -> socket.socket:
        checkpoint = self.checkpoint
        tcp = checkpoint.tcp
        tsval = None
        if tcp.timestamps:
            elapsed_ms = int(max(0.0, now - checkpoint.taken_at) * 1000)
            tsval = (tcp.ts_val + elapsed_ms + TS_MARGIN_MS) % SEQ_MOD
        state = tcp_repair.state_from_positions(
            local=listen,
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
        for attempt in range(HALF_OPEN_RETRIES + 1):
            try:
                return tcp_repair.restore_socket(state)
            except tcp_repair.TcpRepairError as error:
                # A SYN spoofed with this 4-tuple (or the client's own, long before) left a
                # half-open entry that holds it: drop that entry and try again, a bounded
                # number of times (an outsider could keep sending them).
                if error.errno != errno.EADDRNOTAVAIL or attempt == HALF_OPEN_RETRIES:
                    raise
                if not sockdiag.clear_half_open(state.local, state.remote):
                    raise
                self.half_open_cleared += 1
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Free what is held, silently: the restored socket never spoke."""
        if self.service is not None:
            close_abortively(self.service)
            self.service = None
        if self.sock is not None:
            with contextlib.suppress(OSError):
                tcp_repair.enter_repair(self.sock)
            self.sock.close()
            self.sock = None

    def hand_over(self) -> tuple[socket.socket, socket.socket, bytes]:
        """The restored socket, the service and the bytes to send first, now owned by a live
        connection (``close`` frees nothing any more)."""
        assert self.sock is not None
        assert self.service is not None
        taken = (self.sock, self.service, bytes(self.unsent))
        self.sock = self.service = None
        return taken
