"""Live connections on the server and the checkpoints they push to their client.

Theory of operation: every accepted connection is relayed so that ``migrate.streamstate``
sees both byte streams: copied through Python (the default, ``--live-relay copy``), each chunk
shown to the stream state right after its send in the same callback (``proxy.relay.Copy``),
or spliced, each read teed into a side pipe whose copy the stream state reads before the bytes
are forwarded (``proxy.relay.Splice(observer=...)``). Checkpoints are taken from the loop, never
between a send and its showing, so a checkpoint never commits to less than what went through
(with observer threads, to what they covered, under the relay's lock). The handshake's
sequence numbers and options are read through TCP_REPAIR (``accept_facts``) right after
accept, or, when the relay copies and so counts what it read and wrote, at the first
checkpoint. Checkpoints go
to the client periodically (each connection on its own phase, from its start), at every request
boundary the codec finds, and once more ``LEAVE_PUSH_LEAD_S`` before this server stops being the
active one. Each is sealed with the pool's checkpoint key, wrapped in a carrier sealed for the
client, and sent as one TCP segment on the connection's own 5-tuple, marked with the carrier
option and numbered *before* the server's ISN, so that a client without the shim would discard
it as an old duplicate. When the gate closes behind the service, the connections still here
have moved on: their sockets are closed in repair mode, which sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import ipaddress
import os
import socket
import termios
import traceback
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from migrate.channel import Sealer
from migrate.checkpoint import (
    Carrier,
    Checkpoint,
    CheckpointKeys,
    TcpSnapshot,
    carrier_sealer,
    key_range,
    seal_carrier,
    seal_checkpoint,
    stream_hash_key,
)
from migrate.errors import RoamError
from migrate.handover import (
    HANDOFF_BUDGET_S,
    LEAVE_PUSH_LEAD_S,
    MAX_PREPARE_LEAD_S,
    ServerHandover,
)
from migrate.kernel import rawtcp, tcp_repair
from migrate.kernel import sockopts as so
from migrate.rangeplan import WINDOW_BYTES
from migrate.registration import ClientRecord
from migrate.reincarnation import CHECKPOINT_AGE_FLOOR_S
from migrate.replaystream import TOTAL_RUNS
from migrate.streamstate import StreamState, over_total, verifies_nothing
from proxy.livecontext import LiveContext
from proxy.relay import Copy, EndReason, Mode, Relay, RelayOutcome, Skip, Splice

SEQ_MOD = 2**32
BOUNDARY_MIN_GAP_S = 0.02  # at most one boundary checkpoint per connection per 20 ms
CHECKPOINT_RETRY_S = 0.05  # a failed push is tried again this soon
# A connection accepted this close to the service's leaving (after the leave round, or so
# shortly before it that its first periodic push would come after the boundary) gets its
# first checkpoint at once: without one its client cannot move it ("no checkpoint yet").
# Only then: elsewhere an accept costs no carrier.
ACCEPT_PUSH_WINDOW_S = LEAVE_PUSH_LEAD_S + 0.5
ROUND_PERIOD_S = 0.02  # how often due checkpoints (and hand-over timers) are looked at
# The last round at the boundary (``CheckpointPusher.round``) pushes only connections this far
# past their last checkpoint (fast downloads: a thousand small exchanges push nothing more),
# and counts as at the boundary this early (the loop's sleep may end a hair before it).
LAST_ROUND_MIN_BYTES = 1 << 20
LAST_ROUND_EARLY_S = 0.002
# How often the live connections' replay logs are added up against their total bound
# (TOTAL_RUNS x --max-replay): between two looks they grow by what clients send in this time.
LOG_TOTAL_PERIOD_S = 0.1
# An idle connection's checkpoint (nothing moved since the last, no fresh point waiting for an
# acknowledgement) is sent again only this often. A PREPARE goes out at most MAX_PREPARE_LEAD_S
# before the boundary and its COMMIT, with the newest checkpoint, at most HANDOFF_BUDGET_S
# after: each carries one at most this old then (the leave round pushes every connection's
# just before the boundary besides), well within the age limit (at least the floor).
IDLE_REFRESH_S = CHECKPOINT_AGE_FLOOR_S / 5
assert IDLE_REFRESH_S + max(MAX_PREPARE_LEAD_S, HANDOFF_BUDGET_S) < CHECKPOINT_AGE_FLOOR_S
# A re-incarnated connection counts its checkpoints on from the presented one plus this much,
# so that its carriers outrank whatever the previous server pushed after that checkpoint
# (during the hand-over, and after the switch until its gate closed): the client keeps the
# new server's checkpoints and ignores the old server's late ones.
INCARNATION_COUNTER_STRIDE = 2**32


def observed_modes(
    stream: StreamState, *, zero_copy: bool = False, observer_thread: bool = False
) -> tuple[Mode, Mode]:
    """The relay's two directions (client to service, service to client), both shown to
    ``stream``: copied through Python (the default), or spliced with a tee for the stream
    state (``zero_copy``: alone, no faster on this machine while the stream state's own work
    dominates). ``observer_thread`` feeds the stream state from a thread per bulk direction
    (``--live-relay splice-thread``: 1.1-1.45x the downloads of copy, docs/benchmarks.md); it
    then lags the forwarded bytes (by a bound), which a checkpoint may: it commits to what the
    stream state covered, read under the relay's ``observer_lock``."""
    if zero_copy:
        # The service's bytes a checkpoint needs no more (a Range-capable body that no hash
        # covers, but its window) are dropped in the kernel, never read.
        skip = Skip(stream.skippable, stream.skip_s2c, keep=WINDOW_BYTES)
        return (
            Splice(observer=stream.feed_c2s, observer_thread=observer_thread),
            Splice(observer=stream.feed_s2c, observer_thread=observer_thread, skip=skip),
        )
    return Copy(stream.feed_c2s), Copy(stream.feed_s2c)


def accept_facts(sock: socket.socket, *, read: int = 0, written: int = 0) -> TcpSnapshot:
    """The handshake's ISNs and options of an accepted socket, read in repair mode (its
    timestamp clock is read again for each checkpoint); ``read`` and ``written``: the bytes
    the relay has read from it and written to it so far (none right after accept).

    Only what a checkpoint needs (not the queues' bytes, nor the windows and addresses a
    whole ``tcp_repair.read_snapshot`` reads). The sequence numbers count every byte since
    the handshake: the next the server writes is its ISN + 1 + ``written``, the next it
    expects is the client's ISN + 1 + ``read`` + what its receive queue holds. A consistent
    pair: the client's bytes may arrive while they are read, and a receive sequence read
    before them with a queue length read after them would put the client's ISN one request
    too early (every later re-incarnation of the connection would then expect those bytes
    again, and stall); so the receive sequence is read again after the length, until it stood
    still. Both ends' FINs count in the sequence numbers too: the socket must be established
    before and after (``TcpRepairError`` otherwise: the connection is ending)."""
    _check_established(sock)
    fd = sock.fileno()
    tcp_repair.enter_repair(sock)
    try:
        # In repair mode TCP_MAXSEG is mss_clamp, the peer's announced MSS.
        mss = _get_u32(sock, so.TCP_MAXSEG)
        _select_queue(sock, so.TCP_SEND_QUEUE)
        send_seq = _get_u32(sock, so.TCP_QUEUE_SEQ)
        _select_queue(sock, so.TCP_RECV_QUEUE)
        recv_seq = _get_u32(sock, so.TCP_QUEUE_SEQ)
        for _ in range(tcp_repair.SNAPSHOT_ATTEMPTS):
            recv_len = _ioctl_int(fd, termios.FIONREAD)
            again = _get_u32(sock, so.TCP_QUEUE_SEQ)
            if again == recv_seq:
                break
            recv_seq = again
        else:
            raise tcp_repair.TcpRepairError(
                errno.EAGAIN,
                f"the receive queue kept changing over {tcp_repair.SNAPSHOT_ATTEMPTS} reads",
            )
        _select_queue(sock, so.TCP_NO_QUEUE)
    finally:
        tcp_repair.leave_repair(sock)
    info = _check_established(sock)  # no FIN came in meanwhile (it moves the receive sequence)
    wscale = bool(info.options & so.TCPI_OPT_WSCALE)
    return TcpSnapshot(
        server_isn=(send_seq - 1 - written) % SEQ_MOD,
        client_isn=(recv_seq - 1 - recv_len - read) % SEQ_MOD,
        mss=mss,
        snd_wscale=info.snd_wscale if wscale else 0,
        rcv_wscale=info.rcv_wscale if wscale else 0,
        sack=bool(info.options & so.TCPI_OPT_SACK),
        timestamps=bool(info.options & so.TCPI_OPT_TIMESTAMPS),
        ts_val=0,
    )


def _check_established(sock: socket.socket) -> tcp_repair.TcpInfo:
    info = tcp_repair.read_tcp_info(sock)
    if info.state != so.TCP_ESTABLISHED:
        raise tcp_repair.TcpRepairError(
            errno.ENOTCONN, f"only established sockets can be read (tcpi_state {info.state})"
        )
    return info


# A new connection's client address, parsed once per address (5 µs a connection otherwise).
_ip_address = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


def _get_u32(sock: socket.socket, option: int) -> int:
    value: int = so.U32.unpack(sock.getsockopt(socket.SOL_TCP, option, so.U32.size))[0]
    return value


def _select_queue(sock: socket.socket, queue: int) -> None:
    sock.setsockopt(socket.SOL_TCP, so.TCP_REPAIR_QUEUE, so.S32.pack(queue))


def _ioctl_int(fd: int, request: int) -> int:
    value: int = so.S32.unpack(fcntl.ioctl(fd, request, so.S32.pack(0)))[0]
    return value


class LiveConnection:
    """One migratable connection on this server: relay, stream state, checkpoint schedule."""

    def __init__(
        self,
        pusher: CheckpointPusher,
        client: socket.socket,
        service: socket.socket,
        peer: tuple[str, int],
        facts: TcpSnapshot | None,
        record: ClientRecord | None,
        *,
        conn_id: bytes,
        stream: StreamState,
        counter: int = 0,
        s2c_base: int = 0,
        syn_adjust: int = 1,
        handover: ServerHandover | None = None,
    ) -> None:
        self.pusher = pusher
        self.peer = peer
        self._facts = facts  # None: read at the first checkpoint (``facts``)
        self.record = record
        self.conn_id = conn_id
        self.stream = stream
        self.counter = counter
        self.s2c_base = s2c_base  # s2c position of the socket's first byte
        self.syn_adjust = syn_adjust  # tcpi_bytes_acked counts the SYN on accepted sockets
        self.client = client
        now = pusher.context.clock()
        self.started = now
        self.next_due = now  # the first checkpoint goes out at once
        self.last_sent = 0.0
        self.pushed_s2c = -1  # the service's position in the last checkpoint pushed
        # What the last checkpoint covered: (c2s, s2c, key range) if no later fresh point
        # waited for the client's acknowledgement then (else None: the next one may differ).
        self.pushed_idle: tuple[int, int, int] | None = None
        # For a re-incarnated connection, the hand-over that made it (it answers a repeated
        # COMMIT whose answers were all lost).
        self.handover = handover
        self.codec_reported = self.unmigratable_reported = False
        self.sealer = pusher.carrier_sealer(record) if record is not None else None
        stream.acked = self._acked_now
        c2s, s2c = observed_modes(
            stream, zero_copy=pusher.zero_copy, observer_thread=pusher.observer_thread
        )
        self.relay = Relay(client, service, client_to_service=c2s, service_to_client=s2c)

    @property
    def facts(self) -> TcpSnapshot:
        """The handshake's sequence numbers and options. An accepted connection whose relay
        copies reads them at its first checkpoint, with the relay's counts of the bytes read
        and written since (``accept_facts``), not before its relay starts: that was 12 system
        calls, 40 µs, between the client's connect and its first request's forwarding."""
        facts = self._facts
        if facts is None:
            read = self.relay.bytes_read_from_client
            if read is None:  # a spliced relay: its pipes hold bytes no count says
                raise RoamError("the connection's facts were not read at accept")
            written = self.relay.bytes_service_to_client
            facts = self._facts = accept_facts(self.client, read=read, written=written)
        return facts

    def _read_facts(self) -> bool:
        """Read ``facts`` now; False, and no checkpoint from then on, if the connection is
        ending already (a FIN came or went before its first checkpoint: a hand-over would not
        move it, and its sequence numbers no longer tell the ISNs)."""
        try:
            _ = self.facts
        except tcp_repair.TcpRepairError as error:
            if error.errno != errno.ENOTCONN:
                raise
            self.sealer = None
            return False
        return True

    def _acked_now(self) -> int:
        """For the stream state, between checkpoints (-1: unknown, nothing is settled)."""
        try:
            return self.s2c_acked()
        except OSError:
            return -1

    def s2c_acked(self) -> int:
        info = tcp_repair.read_tcp_info(self.client)
        return self.s2c_base + max(0, info.bytes_acked - self.syn_adjust)

    def snapshot(self, now: float) -> Checkpoint:
        ts_val = tcp_repair.read_timestamp(self.client) if self.facts.timestamps else 0
        tcp = replace(self.facts, ts_val=ts_val)
        self.counter += 1
        context = self.pusher.context
        s2c_acked = self.s2c_acked()
        # Observer threads (if any) feed the stream state under this lock: the checkpoint then
        # commits to one consistent state, possibly behind what was forwarded (never ahead).
        with self.relay.observer_lock:
            return self.stream.checkpoint(
                conn_id=self.conn_id,
                client=self.peer,
                vport=context.vport,
                epoch=context.epoch(),
                counter=self.counter,
                now=now,
                tcp=tcp,
                s2c_acked=s2c_acked,
            )

    def push(self, now: float) -> None:
        """Send a checkpoint to the client on the connection's own 5-tuple."""
        if self.sealer is None or self.relay.ended:
            return
        if self._facts is None and not self._read_facts():
            return
        self._report_codec()
        checkpoint = self.snapshot(now)
        pusher = self.pusher
        if verifies_nothing(checkpoint):
            # The client keeps its previous checkpoint, which a new server can use.
            pusher.withheld += 1
            self._next_due(now)
            return
        sealed = seal_checkpoint(
            checkpoint,
            pusher.keys.for_epoch(checkpoint.epoch),
            pusher.context.deployment_id,
            os.urandom,
        )
        message = seal_carrier(self.sealer, Carrier.of(checkpoint, sealed), now)
        listen = pusher.context.listen
        packet = rawtcp.build_ipv4_tcp(
            listen[0],
            self.peer[0],
            listen[1],
            self.peer[1],
            # Entirely before the server's first byte: an old duplicate to a client's TCP.
            (self.facts.server_isn - len(message)) % SEQ_MOD,
            (self.facts.client_isn + 1 + checkpoint.c2s_pos) % SEQ_MOD,
            rawtcp.ACK | rawtcp.PSH,
            1024,
            [rawtcp.carrier_option()],
            message,
        )
        pusher.send(packet)
        self.last_sent = now
        self.pushed_s2c = checkpoint.s2c_pos
        self.pushed_idle = (
            (checkpoint.c2s_pos, checkpoint.s2c_pos, key_range(checkpoint.epoch))
            if self.stream.settled
            else None
        )
        self._next_due(now)

    def _next_due(self, now: float) -> None:
        period = self.pusher.context.checkpoint_period
        # Keep the connection's own phase: due times are start + k * period.
        elapsed = now - self.started
        self.next_due = self.started + (int(elapsed / period) + 1) * period

    def due(self, now: float) -> bool:
        if now >= self.next_due:
            if self.idle(now):
                period = self.pusher.context.checkpoint_period
                self.next_due += period * max(1, int((now - self.next_due) / period) + 1)
                return False
            return True
        # A checkpoint from before the service's first byte commits to none of its output: a
        # re-incarnation from it could not be verified. Push one as soon as bytes flowed,
        # rather than a period later, so that young connections can move too.
        first_bytes = self.pushed_s2c == 0 < self.stream.s2c_pos
        return (self.stream.boundary_due or first_bytes) and (
            now - self.last_sent >= BOUNDARY_MIN_GAP_S
        )

    def moved_far(self) -> bool:
        """Whether the service sent ``LAST_ROUND_MIN_BYTES`` or more since the last push."""
        return self.stream.s2c_pos - self.pushed_s2c >= LAST_ROUND_MIN_BYTES

    def idle(self, now: float) -> bool:
        """Whether the last checkpoint still says all there is: nothing passed either way
        since, the key range is the same, and it is younger than IDLE_REFRESH_S."""
        pushed = self.pushed_idle
        return (
            pushed is not None
            and now - self.last_sent < IDLE_REFRESH_S
            and pushed[0] == self.stream.c2s_pos
            and pushed[1] == self.stream.s2c_pos
            and pushed[2] == key_range(self.pusher.context.epoch())
        )

    def _report_codec(self) -> None:
        """Say once, in the log, which codec the connection got (``--codec auto``) and, at
        once, if it cannot be migrated (not at the roam that would reset it)."""
        stream, log = self.stream, self.pusher.context.log
        client = f"{self.peer[0]}:{self.peer[1]}"
        if not self.codec_reported and stream.detection is not None:
            self.codec_reported = True
            log.event("codec_chosen", client=client, codec=stream.codec_name,
                      reason=stream.detection.reason)  # fmt: skip
        if not self.unmigratable_reported and stream.unmigratable is not None:
            self.unmigratable_reported = True
            self.pusher.unmigratable += 1
            log.event("connection_unmigratable", level="warning", client=client,
                      codec=stream.codec_name, reason=stream.unmigratable)  # fmt: skip
            if self.pusher.on_unmigratable is not None:
                self.pusher.on_unmigratable()  # the status file says so soon, not at the roam

    def lacks_checkpoint(self) -> bool:
        """Whether its client holds no checkpoint a hand-over could move it with: none pushed
        yet, or only one from before the service's first bytes, which have passed since."""
        return self.pushed_s2c < 0 or self.pushed_s2c == 0 < self.stream.s2c_pos

    def leave_silently(self) -> None:
        """This connection lives elsewhere now: close the client side without a word."""
        with contextlib.suppress(OSError):
            tcp_repair.enter_repair(self.client)
        self.relay.abort()


class CheckpointPusher:
    """The live connections of one server shim and the rounds that push their checkpoints."""

    def __init__(
        self, context: LiveContext, *, zero_copy: bool = False, observer_thread: bool = False
    ) -> None:
        self.context = context
        # See observed_modes; the keywords (for tests) or the shim's --live-relay.
        self.zero_copy = zero_copy or context.live_relay != "copy"
        self.observer_thread = observer_thread or context.live_relay == "splice-thread"
        self.keys = CheckpointKeys(context.group_key)
        self.connections: dict[tuple[str, int], LiveConnection] = {}
        self.carrier_sealers: dict[int, Sealer] = {}
        self.sent = 0
        self.unmigratable = 0  # connections found unmigratable (each logged once)
        self.on_unmigratable: Callable[[], None] | None = None  # after each one is counted
        self.withheld = 0  # checkpoints not sent: nothing in them could be verified
        self._raw: rawtcp.RawTcpSender | None = None
        self._leave_pushed: float | None = None
        self._last_pushed: float | None = None  # the boundary of the last round (``round``)
        self._leave_pushed_by: dict[int, float] = {}  # k of N: client id -> leaving pushed
        # All live connections' replay logs together: at most this many bytes.
        self.log_limit = TOTAL_RUNS * context.max_replay
        self._logs_checked = 0.0

    def send(self, packet: bytes) -> None:
        if self._raw is None:
            self._raw = rawtcp.RawTcpSender()
        self._raw.send(packet)
        self.sent += 1

    def carrier_sealer(self, record: ClientRecord) -> Sealer:
        """One sealer per client, shared by all its connections: nonces are (sender, counter)
        under the client's key, so two sealers of the same client could repeat a nonce."""
        return self.context.sealer(self.carrier_sealers, carrier_sealer, record)

    def record_for(self, address: str) -> ClientRecord | None:
        pool = self.context.pool
        for client in pool.clients.by_address(_ip_address(address)):
            record = pool.record(client)
            if not record.revoked:
                return record
        return None

    def relay_factory(
        self, client: socket.socket, service: socket.socket, peer: tuple[str, int]
    ) -> Relay:
        """An accepted connection: relayed and observed, checkpointed from the start."""
        conn_id = os.urandom(16)
        connection = LiveConnection(
            self,
            client,
            service,
            peer,
            # A copying relay counts what it reads: the facts can wait for the first push.
            accept_facts(client) if self.zero_copy else None,
            self.record_for(peer[0]),
            conn_id=conn_id,
            stream=StreamState(
                self.context.codec,
                replay_limit=self.context.max_replay,
                hash_key=stream_hash_key(self.context.group_key, conn_id)
                if self.context.stream_hash == "blake3"
                else None,
                range_bodies=self.context.range_bodies,
            ),
        )
        if not self.context.gate_open():
            # Accepted before the gate closed but only now past the service's connect (a burst
            # at the end of the epoch): the client has moved on. Kept, it would stand in the
            # way (the same 4-tuple) when the service comes back here. Its one checkpoint goes
            # out first: the client's hand-over, waiting for it, moves the connection (nothing
            # was relayed yet: the new server replays what the client sent).
            with contextlib.suppress(OSError, RoamError):
                connection.push(self.context.clock())
            connection.leave_silently()
            self.context.log.event("connection_left", client=f"{peer[0]}:{peer[1]}", late=True)
            return connection.relay
        self.adopt(connection)
        leaving = self.leaving_of(connection.record)
        now = self.context.clock()
        if leaving is not None and leaving - now <= ACCEPT_PUSH_WINDOW_S:
            self.push_logged(connection, now)
        return connection.relay

    def adopt(self, connection: LiveConnection) -> None:
        key = connection.peer
        self.connections[key] = connection
        log = self.context.log

        def ended(future: asyncio.Future[RelayOutcome]) -> None:
            if self.connections.get(key) is connection:
                del self.connections[key]
            if future.cancelled():
                return
            outcome = future.result()
            client = f"{key[0]}:{key[1]}"
            if outcome.reason is EndReason.RESET:
                log.event(
                    "connection_reset",
                    client=client,
                    side=outcome.failed_side,
                    reason=repr(outcome.error),
                )
            if outcome.reason is EndReason.OBSERVER_FAILED:
                # A bug of ours, not the network's: say so loudly.
                log.event(
                    "connection_failed", level="error", client=client, reason=repr(outcome.error)
                )

        connection.relay.closed.add_done_callback(ended)

    def reincarnated(
        self,
        key: tuple[str, int],
        checkpoint: Checkpoint,
        record: ClientRecord,
        sockets: tuple[socket.socket, socket.socket, bytes],
        stream: StreamState,
        s2c_base: int,
        handover: ServerHandover,
        work: dict[str, Any] | None = None,
    ) -> LiveConnection:
        """A re-incarnated connection goes live here: relayed, checkpointed like any other.
        ``work``: what its re-incarnation read and spared, for the log."""
        sock, service, unsent = sockets
        # Without Nagle, as the relay's accepted connections (proxy.relay): a restored socket
        # and the replay's service connection start with it on, and it held each response's
        # last short segment until the client's delayed ACK (1 MiB responses one after the
        # other on a moved connection: 0.14x the goodput of no roam, docs/benchmarks.md).
        for end in (sock, service):
            with contextlib.suppress(OSError):  # gone meanwhile: the relay will find out
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Regenerated and verified with the checkpoint's hashing; later responses are
        # hashed as this server's own connections are.
        stream.hash_range_bodies = self.context.range_bodies == "hash"
        connection = LiveConnection(
            self,
            sock,
            service,
            key,
            checkpoint.tcp,
            record,
            conn_id=checkpoint.conn_id,
            stream=stream,
            counter=checkpoint.counter + INCARNATION_COUNTER_STRIDE,
            s2c_base=s2c_base,
            syn_adjust=0,
            handover=handover,
        )
        # Adopted at once: if the service leaves again right away, ``leave`` finds it too.
        self.adopt(connection)
        # What was regenerated beyond the client's position goes out first, through the relay,
        # so that a slow client holds back only this connection.
        connection.relay.start(to_client_first=unsent)
        resumed = stream.resumed_from
        self.context.log.event(
            "reincarnated",
            client=f"{key[0]}:{key[1]}",
            s2c=connection.s2c_base,
            c2s=connection.stream.c2s_pos,
            unsent=len(unsent),
            # How the response was regenerated: from a range (migrate.rangeplan), reading the
            # service's bytes from ``range_from`` on, or from the checkpoint's fresh point.
            regeneration="range" if resumed is not None else "fresh point",
            regenerated=s2c_base - (resumed if resumed is not None else checkpoint.s2c_fresh),
            body_offset=s2c_base - checkpoint.range.body_start if checkpoint.range else None,
            **(work or {}),
        )
        connection.push(self.context.clock())
        return connection

    def leaving_of(self, record: ClientRecord | None) -> float | None:
        """When ``record``'s connections leave this server (k of N: per client; else when
        the service leaves it)."""
        if self.context.client_leaving_at is not None and record is not None:
            return self.context.client_leaving_at(record.client_id)
        return self.context.leaving_at()

    def bound_logs(self, now: float) -> int:
        """Keep the live connections' replay logs within ``log_limit`` together: past it, the
        largest are marked unmigratable and reported at once (event, status, metric), as a
        connection past --max-replay is. Returns how many were given up."""
        connections = list(self.connections.values())
        sizes = [len(connection.stream.log) for connection in connections]
        chosen = over_total(sizes, self.log_limit)
        for index in chosen:
            connection = connections[index]
            with connection.relay.observer_lock:
                connection.stream.mark_unmigratable(
                    f"the server's replay logs exceed their total bound ({self.log_limit} "
                    f"bytes: {TOTAL_RUNS} x --max-replay)"
                )
            self.push_logged(connection, now)
        return len(chosen)

    def round(self, now: float) -> None:
        """Push every checkpoint due (all of them just before leaving)."""
        if now - self._logs_checked >= LOG_TOTAL_PERIOD_S:
            self._logs_checked = now
            self.bound_logs(now)
        if self.context.client_leaving_at is not None:
            self._round_per_client(now)
            return
        leaving = self.context.leaving_at()
        # A last round just before leaving: the client's refresh re-prepares a connection whose
        # PREPARE carried a checkpoint from before the response began with the newest one, and
        # needs it by then. Its burst of carriers dates the roam early (docs/protocol.md, 9).
        push_all = (
            leaving is not None
            and leaving - LEAVE_PUSH_LEAD_S <= now
            and self._leave_pushed != leaving
        )
        if push_all:
            self._leave_pushed = leaving
        # And a last round at the boundary itself, for the connections that moved a lot since
        # their last push: a fast download's newest checkpoint would otherwise be up to a round
        # (megabytes) behind the client's freeze, which the new server reads in the pause.
        last = (
            leaving is not None
            and now >= leaving - LAST_ROUND_EARLY_S
            and self._last_pushed != leaving
        )
        if last:
            self._last_pushed = leaving
        for connection in list(self.connections.values()):
            if push_all or connection.due(now) or (last and connection.moved_far()):
                self.push_logged(connection, now)

    def next_round_in(self, now: float) -> float:
        """How long the round loop sleeps: a round period, or less to wake at the boundary
        (the last round's moment). Never raises: the round loop must go on (``round`` itself
        reports what is wrong)."""
        try:
            leaving = self.context.leaving_at()
        except Exception:
            return ROUND_PERIOD_S
        if leaving is None or self._last_pushed == leaving or leaving <= now:
            return ROUND_PERIOD_S
        return min(ROUND_PERIOD_S, leaving - now)

    def _round_per_client(self, now: float) -> None:
        """k of N: each client leaves this server at its own time; its connections' last
        round comes just before that (``round``'s reason), once per client and leaving."""
        leavings: dict[int, float | None] = {}
        for connection in list(self.connections.values()):
            record = connection.record
            client = record.client_id if record is not None else 0
            if client not in leavings:
                leavings[client] = self.leaving_of(record)
            leaving = leavings[client]
            push_all = (
                leaving is not None
                and leaving - LEAVE_PUSH_LEAD_S <= now
                and self._leave_pushed_by.get(client) != leaving
            )
            if push_all or connection.due(now):
                self.push_logged(connection, now)
        for client, leaving in leavings.items():
            if leaving is not None and leaving - LEAVE_PUSH_LEAD_S <= now:
                self._leave_pushed_by[client] = leaving

    def push_logged(self, connection: LiveConnection, now: float) -> None:
        """Push ``connection``'s checkpoint; a failure is logged and tried again soon."""
        try:
            connection.push(now)
        except (OSError, RoamError) as error:
            self.context.log.event(
                "checkpoint_failed",
                level="warning",
                client=f"{connection.peer[0]}:{connection.peer[1]}",
                reason=str(error),
            )
            # Soon again: a connection without a recent checkpoint cannot move.
            connection.next_due = now + min(self.context.checkpoint_period, CHECKPOINT_RETRY_S)

    def status(self) -> dict[str, object]:
        codecs: dict[str, int] = {}  # live connections per codec
        for connection in self.connections.values():
            codecs[connection.stream.codec_name] = codecs.get(connection.stream.codec_name, 0) + 1
        return {
            "live_connections": len(self.connections),
            "checkpoints_sent": self.sent,
            "checkpoints_withheld": self.withheld,
            "codecs": codecs,
            "unmigratable": self.unmigratable,
        }

    def leave(self) -> int:
        """The gate closed behind the service: drop every connection silently."""
        count = len(self.connections)
        now = self.context.clock()
        for connection in list(self.connections.values()):
            self._leave_one(connection, now)
        self.connections.clear()
        return count

    def _leave_one(self, connection: LiveConnection, now: float) -> None:
        """Drop ``connection`` silently; first, if its client has no checkpoint to move it
        with, push one. A connection accepted after the leave round (its client roams late:
        the hand-over of many connections, a wait for others' first checkpoints) may not have
        had its first push yet (the next round, up to 20 ms on); without one its client
        cannot move it and resets it, and the client's hand-over is still waiting for it."""
        if connection.lacks_checkpoint():
            self.push_logged(connection, now)
        connection.leave_silently()

    def evict(self, key: tuple[str, int], client_id: int) -> bool:
        """A re-incarnation of ``key`` is about to be restored here while this server still
        relays an earlier incarnation of the same 4-tuple: its gate never closed in between
        (the service came back within the windows' margins, or the shim's tick ran late on a
        busy host and found the next window open), so it never left it. The restore needs the
        4-tuple (EADDRNOTAVAIL otherwise, and the client's connection reset). The client has
        committed to the new incarnation and sends the old one nothing: drop it silently, as
        the gate's closing would have. Only a connection of the same client (or of none
        known); whether one was dropped."""
        connection = self.connections.get(key)
        if connection is None or (
            connection.record is not None and connection.record.client_id != client_id
        ):
            return False
        del self.connections[key]
        connection.leave_silently()
        self.context.log.event(
            "incarnation_replaced", client=f"{key[0]}:{key[1]}", counter=connection.counter
        )
        return True

    def leave_clients(self, addresses: Collection[str]) -> int:
        """k of N: these clients' server is another one now while this one stays open (their
        connections moved there): drop theirs silently, keep the others."""
        count = 0
        now = self.context.clock()
        for key, connection in list(self.connections.items()):
            if key[0] in addresses:
                self._leave_one(connection, now)
                del self.connections[key]
                count += 1
        return count

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None


def log_internal_error(context: LiveContext, where: str, error: Exception) -> None:
    """A bug of ours: logged loudly, and the loop that met it goes on."""
    context.log.event(
        "internal_error",
        level="error",
        where=where,
        reason=repr(error),
        trace=traceback.format_exc(limit=6),
    )
