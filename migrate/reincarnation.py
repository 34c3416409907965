"""Re-incarnation requests: the client hands a live connection to the next server.

Theory of operation, make-before-break (ARCHITECTURE.md "A roam"): shortly before the boundary
``T_i`` the client shim sends ``S_i``, for each live connection, a PREPARE request: the latest
sealed checkpoint, its own positions (bytes sent, bytes received) and the replay bytes from the
checkpoint's fresh point on. ``S_i`` verifies everything, opens a fresh connection to the
legacy service, replays, regenerates and checks the response up to the client's position and
keeps the service connection parked. At the boundary the client freezes its outgoing data for
the connection and sends a COMMIT with its final positions and the replay bytes added since;
``S_i`` finishes the replay, creates the socket with TCP_REPAIR and answers READY. Only then
does the client point its kernel rewrite at ``S_i``, and a GO tells ``S_i`` it may speak (a
segment reaching the client before its switch would be answered with a RST). An ABORT
withdraws a request.

Requests travel on the client's secure channel (``Purpose.REINCARNATE_C2S``, sender = client
id), answers on ``Purpose.REINCARNATE_S2C`` (sender = server index), both with context
``"reincarnate" || deployment id || client id``.

Request plaintext::

    phase u8 (1 prepare, 2 commit, 3 abort, 4 go) | epoch u64 | client port u16 | vport u16 |
    c2s_sent u64 | s2c_received u64 | replay_from u64 | sealed checkpoint (its length follows
    from its header: ``migrate.checkpoint.sealed_length``) |
    replay bytes: client-to-server bytes [replay_from, c2s_sent)

In a COMMIT, ``replay_from`` is where the PREPARE's replay bytes ended, and only the new bytes
follow. Replay bytes beyond one datagram travel on the replay stream (``migrate.replaystream``):
then the phase byte has its high bit (``STREAMED_FLAG``) set and a ``streamed u64`` follows the
header: the first ``streamed`` replay bytes are the ones the server holds from the stream, and
the datagram carries the rest. ABORT and GO carry the header only (positions 0, no
checkpoint), except that a GO may say the client's receive window: then the phase byte has
``WINDOW_FLAG`` (0x40) set and a ``window u32`` (bytes, read after the switch) follows the
header. Answer plaintext::

    phase u8 | client port u16 | status u8 (0 ready, 1 diverged, 2 refused, 3 failed) |
    detail (UTF-8, at most 200 bytes)

Checks at the server (``admit``), each failure a typed error and nothing created: the seal
(the client's key, so the request is the client's), the UDP source is the client's registered
address, the client is not revoked and holds keys for the epoch, this server is that epoch's
server, the checkpoint is the pool's and belongs to this client address and port, is not
marked unmigratable, is not expired (taken at most ``MAX_CHECKPOINT_AGE_EPOCHS`` epoch lengths
ago, never less than ``CHECKPOINT_AGE_FLOOR_S``, and not in a later epoch than the requested
one: a live connection gets a checkpoint every half second, so only a hoarded one is that
old), and the replay bytes hash to the checkpoint's commitment. A server answers only a
request that passed these checks, with a message smaller than the request, so it can never be
used to amplify traffic (QUIC's rule is 3x before validation).

Beyond these per-message checks, the server meters each client (``migrate.admission``):
pending preparations, preparations running at once, replay and regeneration bytes and service
time are bounded per client. COMMIT, GO and ABORT are bound to the client whose PREPARE made
the pending re-incarnation, come from its address, and are refused to a revoked client; a
PREPARE, COMMIT or GO is refused to a client blocked for its rate contract, and a COMMIT (or
GO) behind a closed gate creates nothing.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from migrate.channel import Freshness, Kind, Opened, Opener, Purpose, Sealer, derive_key
from migrate.checkpoint import (
    CHECKPOINT_VERSION_RANGE,
    CHECKPOINT_VERSION_STATE,
    SEALED_BYTES,
    Checkpoint,
    open_checkpoint,
    sealed_length,
)
from migrate.cover import packed_bytes
from migrate.errors import (
    AuthenticationError,
    InconsistentUpdateError,
    MalformedMessageError,
    RevokedClientError,
    RoamError,
    StaleMessageError,
    SubscriptionExpiredError,
)
from migrate.registration import ClientRecord
from migrate.replaystream import MAX_INLINE_REPLAY_BYTES

# A checkpoint older than this many epoch lengths is refused:
# a hoarded checkpoint would let a client make any server replay and regenerate at will.
MAX_CHECKPOINT_AGE_EPOCHS = 2
CHECKPOINT_AGE_FLOOR_S = 10.0  # with very short epochs, still this long
CHECKPOINT_CLOCK_SKEW_S = 2.0  # servers' clocks may differ this much (a checkpoint "from later")
# When requests for an epoch are taken: from PREPARE_AHEAD_S before its start (the client
# prepares shortly before the boundary) to LATE_REQUEST_S after it (the client's 4 s budget,
# its 3 s of overtime for late answers and the COMMIT: client_shim.migrator), and at no other
# time of the epoch, however long it is.
PREPARE_AHEAD_S = 5.0
LATE_REQUEST_S = 10.0
MAX_REPLAY_BYTES = MAX_INLINE_REPLAY_BYTES  # in one datagram; more goes on the replay stream
STREAMED_FLAG = 0x80  # in the phase byte: a streamed u64 follows the header
WINDOW_FLAG = 0x40  # in a GO's phase byte: the client's receive window (u32) follows
# TCP's largest window: 65535 scaled by 2**14 (RFC 7323); a larger one is not a window.
MAX_WINDOW = 65535 << 14
MAX_DETAIL_BYTES = 200
_REQUEST = struct.Struct("!BQHHQQQ")
_ANSWER = struct.Struct("!BHB")
_STREAMED = struct.Struct("!Q")
_WINDOW = struct.Struct("!I")


class Phase(IntEnum):
    PREPARE = 1
    COMMIT = 2
    ABORT = 3
    GO = 4  # the client has switched: the new server may speak


# Header-only requests, answered with cover: they share cells with each other.
HEADER_PHASES = frozenset({Phase.ABORT, Phase.GO})


def pack_group(request: Request) -> Phase | None:
    """Which requests may share a cell (migrate.cover): GOs and ABORTs (answered with one
    cover cell), PREPAREs with PREPAREs and COMMITs with COMMITs (answered with one cell of
    their gathered answers, migrate.gathering)."""
    return None if request.phase in HEADER_PHASES else request.phase


def packable(request: Request) -> int:
    """What ``request`` takes of a packed cell (its group's neighbours may share it)."""
    return packed_bytes(request.encoded_length)


class Status(IntEnum):
    READY = 0
    DIVERGED = 1
    REFUSED = 2
    FAILED = 3
    # A COMMIT after the epoch's window on this server closed (a pool too loaded to take
    # every connection in time): nothing was restored (the client's ABORT frees the
    # preparation). Told apart from REFUSED so that the log and metrics name the overload.
    LATE = 4


def _checkpoint_length(data: bytes, offset: int) -> int:
    """The length of the sealed checkpoint at ``offset``: versions 2 and 3 say it in their
    header; any other is taken as ``SEALED_BYTES`` long (its version is checked when it is
    opened)."""
    if data[offset : offset + 1] in (
        bytes([CHECKPOINT_VERSION_STATE]),
        bytes([CHECKPOINT_VERSION_RANGE]),
    ):
        return sealed_length(data, offset)
    return SEALED_BYTES


def _check_inline(replay: bytes) -> None:
    """A datagram carries at most ``MAX_REPLAY_BYTES`` (the server's request, its streamed
    bytes put back, is bounded by --max-replay instead)."""
    if len(replay) > MAX_REPLAY_BYTES:
        raise MalformedMessageError(f"replay of {len(replay)} bytes is too long")


@dataclass(frozen=True, slots=True)
class Request:
    phase: Phase
    epoch: int
    client_port: int
    vport: int
    c2s_sent: int
    s2c_received: int
    replay_from: int
    checkpoint: bytes
    replay: bytes
    # The first ``streamed`` bytes from ``replay_from`` travel on the replay stream; ``replay``
    # holds the bytes after them (decoded) or all of them (the client's own request).
    streamed: int = 0
    # GO only: the client's receive window for this connection right after its switch (bytes;
    # None: not known). The new server's restored socket assumed a small one until then.
    window: int | None = None

    def __post_init__(self) -> None:
        if not (1 <= self.client_port <= 65535 and 1 <= self.vport <= 65535):
            raise MalformedMessageError("re-incarnation request port out of range")
        if self.window is not None and (
            self.phase is not Phase.GO or not 0 <= self.window <= MAX_WINDOW
        ):
            raise MalformedMessageError(
                f"a receive window of {self.window} bytes in a {self.phase.name} request"
            )
        if self.phase in (Phase.ABORT, Phase.GO):
            if self.checkpoint or self.replay:
                raise MalformedMessageError(f"a {self.phase.name} request carries no data")
        elif len(self.checkpoint) != _checkpoint_length(self.checkpoint, 0):
            raise MalformedMessageError("re-incarnation request without a sealed checkpoint")
        if self.streamed < 0 or (self.streamed and self.phase in (Phase.ABORT, Phase.GO)):
            raise MalformedMessageError("bad count of streamed replay bytes")
        inline = self.inline
        if self.replay_from + self.streamed + len(inline) != self.c2s_sent:
            raise MalformedMessageError(
                "replay bytes do not end at the client's sent position "
                f"({self.replay_from} + {self.streamed} + {len(inline)} != {self.c2s_sent})"
            )

    @property
    def inline(self) -> bytes:
        """The replay bytes the datagram carries."""
        if self.streamed and len(self.replay) + self.replay_from == self.c2s_sent:
            return self.replay[self.streamed :]  # the client's request: all its bytes held
        return self.replay

    def with_streamed(self, streamed: bytes) -> Request:
        """The server's request: the streamed bytes put in front of the inline ones."""
        if len(streamed) != self.streamed:
            raise MalformedMessageError("streamed replay bytes of the wrong length")
        return Request(self.phase, self.epoch, self.client_port, self.vport, self.c2s_sent,
                       self.s2c_received, self.replay_from, self.checkpoint,
                       streamed + self.replay)  # fmt: skip

    @property
    def encoded_length(self) -> int:
        """``len(self.encode())``, without encoding (or copying the inline bytes)."""
        inline = len(self.replay)
        if self.streamed and inline + self.replay_from == self.c2s_sent:
            inline -= self.streamed
        return (
            _REQUEST.size
            + (_STREAMED.size if self.streamed else 0)
            + (_WINDOW.size if self.window is not None else 0)
            + len(self.checkpoint)
            + inline
        )

    def encode(self) -> bytes:
        _check_inline(self.inline)
        flags = (STREAMED_FLAG if self.streamed else 0) | (
            WINDOW_FLAG if self.window is not None else 0
        )
        head = _REQUEST.pack(
            self.phase | flags,
            self.epoch,
            self.client_port,
            self.vport,
            self.c2s_sent,
            self.s2c_received,
            self.replay_from,
        )
        if self.streamed:
            head += _STREAMED.pack(self.streamed)
        if self.window is not None:
            head += _WINDOW.pack(self.window)
        return head + self.checkpoint + self.inline

    @classmethod
    def decode(cls, data: bytes) -> Request:
        if len(data) < _REQUEST.size:
            raise MalformedMessageError("re-incarnation request is truncated")
        phase, epoch, port, vport, sent, received, replay_from = _REQUEST.unpack_from(data)
        start, streamed = _REQUEST.size, 0
        if phase & STREAMED_FLAG:
            phase &= ~STREAMED_FLAG
            if len(data) < start + _STREAMED.size:
                raise MalformedMessageError("re-incarnation request is truncated")
            (streamed,) = _STREAMED.unpack_from(data, start)
            if streamed == 0:
                raise MalformedMessageError("a streamed request names no streamed bytes")
            start += _STREAMED.size
        window = None
        if phase & WINDOW_FLAG:
            phase &= ~WINDOW_FLAG
            if len(data) < start + _WINDOW.size:
                raise MalformedMessageError("re-incarnation request is truncated")
            (window,) = _WINDOW.unpack_from(data, start)
            start += _WINDOW.size
        if phase not in Phase._value2member_map_:
            raise MalformedMessageError(f"unknown re-incarnation phase {phase}")
        if Phase(phase) in (Phase.ABORT, Phase.GO):
            if len(data) != start or streamed:
                raise MalformedMessageError(f"a {Phase(phase).name} request carries no data")
            return cls(Phase(phase), epoch, port, vport, sent, received, replay_from, b"", b"",
                       window=window)  # fmt: skip
        end = start + _checkpoint_length(data, start)
        if len(data) < end:
            raise MalformedMessageError("re-incarnation request is truncated")
        _check_inline(data[end:])
        return cls(
            Phase(phase),
            epoch,
            port,
            vport,
            sent,
            received,
            replay_from,
            data[start:end],
            data[end:],
            streamed,
            window,
        )


@dataclass(frozen=True, slots=True)
class Answer:
    phase: Phase
    client_port: int
    status: Status
    detail: str = ""

    def encode(self) -> bytes:
        # Cut at a character boundary: the client decodes it as UTF-8.
        detail = self.detail.encode()[:MAX_DETAIL_BYTES].decode(errors="ignore").encode()
        return _ANSWER.pack(self.phase, self.client_port, self.status) + detail

    @classmethod
    def decode(cls, data: bytes) -> Answer:
        if len(data) < _ANSWER.size or len(data) > _ANSWER.size + MAX_DETAIL_BYTES:
            raise MalformedMessageError("re-incarnation answer has a bad length")
        phase, port, status = _ANSWER.unpack_from(data)
        if phase not in Phase._value2member_map_ or status not in Status._value2member_map_:
            raise MalformedMessageError("re-incarnation answer has an unknown phase or status")
        try:
            detail = data[_ANSWER.size :].decode()
        except UnicodeDecodeError:
            raise MalformedMessageError("re-incarnation answer detail is not UTF-8") from None
        return cls(Phase(phase), port, Status(status), detail)


def context(deployment_id: bytes, client_id: int) -> bytes:
    return b"reincarnate" + deployment_id + struct.pack("!I", client_id)


def request_sealer(channel_key: bytes, deployment_id: bytes, client_id: int) -> Sealer:
    key = derive_key(channel_key, Purpose.REINCARNATE_C2S)
    return Sealer(key, client_id, context(deployment_id, client_id))


def request_opener(channel_key: bytes, deployment_id: bytes, client_id: int) -> Opener:
    return Opener(
        derive_key(channel_key, Purpose.REINCARNATE_C2S),
        context(deployment_id, client_id),
        kinds=frozenset({Kind.REINCARNATE_REQUEST}),
        freshness=Freshness(max_age=5.0, max_skew=2.0),
        window_size=1024,
    )


def answer_sealer(channel_key: bytes, deployment_id: bytes, client_id: int, sender: int) -> Sealer:
    key = derive_key(channel_key, Purpose.REINCARNATE_S2C)
    return Sealer(key, sender, context(deployment_id, client_id))


def answer_opener(channel_key: bytes, deployment_id: bytes, client_id: int) -> Opener:
    return Opener(
        derive_key(channel_key, Purpose.REINCARNATE_S2C),
        context(deployment_id, client_id),
        kinds=frozenset({Kind.REINCARNATE_READY}),
        freshness=Freshness(max_age=5.0, max_skew=300.0),
        window_size=1024,
    )


# The replay stream's keys (migrate.replaystream): derived apart from the datagrams' so that each
# has its own counters and replay window (TCP and UDP reorder against each other).
STREAM_KEY_CONTEXT = b"replay stream"


def stream_sealer(channel_key: bytes, deployment_id: bytes, client_id: int) -> Sealer:
    key = derive_key(channel_key, Purpose.REINCARNATE_C2S, STREAM_KEY_CONTEXT)
    return Sealer(key, client_id, context(deployment_id, client_id))


def stream_opener(channel_key: bytes, deployment_id: bytes, client_id: int) -> Opener:
    return Opener(
        derive_key(channel_key, Purpose.REINCARNATE_C2S, STREAM_KEY_CONTEXT),
        context(deployment_id, client_id),
        kinds=frozenset({Kind.REINCARNATE_REQUEST}),
        freshness=Freshness(max_age=5.0, max_skew=2.0),
        window_size=1024,
    )


def stream_ack_sealer(
    channel_key: bytes, deployment_id: bytes, client_id: int, sender: int
) -> Sealer:
    key = derive_key(channel_key, Purpose.REINCARNATE_S2C, STREAM_KEY_CONTEXT)
    return Sealer(key, sender, context(deployment_id, client_id))


def stream_ack_opener(channel_key: bytes, deployment_id: bytes, client_id: int) -> Opener:
    return Opener(
        derive_key(channel_key, Purpose.REINCARNATE_S2C, STREAM_KEY_CONTEXT),
        context(deployment_id, client_id),
        kinds=frozenset({Kind.REINCARNATE_READY}),
        freshness=Freshness(max_age=5.0, max_skew=300.0),
        window_size=1024,
    )


def client_id_of(message: bytes) -> int:
    """The sender field of a sealed request (unauthenticated until opened)."""
    if len(message) < 8:
        raise MalformedMessageError("re-incarnation request is truncated")
    return int.from_bytes(message[4:8], "big")


@dataclass(frozen=True, slots=True)
class Admitted:
    opened: Opened
    request: Request
    checkpoint: Checkpoint
    record: ClientRecord


def check_client_source(record: ClientRecord, source: str) -> None:
    """Checks of every phase: the client is not revoked and sends from its address."""
    if record.revoked:
        raise RevokedClientError(f"client {record.name!r} is revoked")
    if source != str(record.address):
        raise AuthenticationError(
            f"request for client {record.name!r} came from {source}, not its address "
            f"{record.address}"
        )


def admit(
    opened: Opened,
    request: Request,
    record: ClientRecord,
    source: str,
    granted_epoch: int,
    serves_epoch: bool,
    checkpoint_key: bytes | Sequence[bytes],
    deployment_id: bytes,
    *,
    now: float,
    epoch_length: float,
    replays_state: bool = False,
    not_served: RoamError | None = None,
) -> Admitted:
    """All checks of a PREPARE (or a COMMIT's checkpoint) that need no service; pure.

    ``replays_state``: the caller sends a checkpoint's session state (``Checkpoint.state``)
    to the service before the replay. A caller that does not is refused such a checkpoint: a
    replay without its session (redis SELECT, AUTH) could answer from the wrong database.

    ``epoch_length`` is the length of the requested epoch: it scales the maximum age.
    ``not_served``: why ``serves_epoch`` is false, when the caller knows (raised as it is)."""
    check_client_source(record, source)
    if request.epoch > granted_epoch:
        raise SubscriptionExpiredError(
            f"client {record.name!r} holds keys up to epoch {granted_epoch}, not {request.epoch}"
        )
    if not serves_epoch:
        raise not_served or InconsistentUpdateError(
            f"this server is not the server of epoch {request.epoch}"
        )
    checkpoint = open_checkpoint(request.checkpoint, checkpoint_key, deployment_id)
    if checkpoint.client != (source, request.client_port) or checkpoint.vport != request.vport:
        raise AuthenticationError(
            f"checkpoint belongs to {checkpoint.client[0]}:{checkpoint.client[1]}, not to the "
            f"requesting connection {source}:{request.client_port}"
        )
    if checkpoint.unmigratable:
        raise InconsistentUpdateError("the connection was marked unmigratable by its server")
    if checkpoint.state and not replays_state:
        raise InconsistentUpdateError(
            f"the connection has a {checkpoint.codec} session state this server cannot replay"
        )
    check_checkpoint_age(checkpoint, request.epoch, now, epoch_length)
    if request.phase is Phase.PREPARE:
        if request.replay_from != checkpoint.c2s_fresh:
            raise InconsistentUpdateError(
                f"replay starts at {request.replay_from}, the checkpoint's fresh point is "
                f"{checkpoint.c2s_fresh}"
            )
        if request.c2s_sent < checkpoint.c2s_pos:
            raise InconsistentUpdateError("the client claims fewer bytes sent than the checkpoint")
        covered = request.replay[: checkpoint.c2s_pos - checkpoint.c2s_fresh]
        if hashlib.sha256(covered).digest() != checkpoint.c2s_hash:
            raise AuthenticationError(
                "replay bytes do not match the checkpoint's commitment (not what the old "
                "server received)"
            )
    if request.phase in (Phase.ABORT, Phase.GO):
        raise MalformedMessageError(f"a {request.phase.name} request is not admitted")
    if request.s2c_received < checkpoint.s2c_fresh:
        raise InconsistentUpdateError(
            "the client received fewer bytes than the checkpoint's fresh point"
        )
    return Admitted(opened, request, checkpoint, record)


def max_checkpoint_age_s(epoch_length: float) -> float:
    return max(CHECKPOINT_AGE_FLOOR_S, MAX_CHECKPOINT_AGE_EPOCHS * epoch_length)


def check_checkpoint_age(
    checkpoint: Checkpoint, epoch: int, now: float, epoch_length: float
) -> None:
    """Refuse a checkpoint that has expired for a request of ``epoch`` at ``now``."""
    if checkpoint.epoch > epoch:
        raise InconsistentUpdateError(
            f"checkpoint of epoch {checkpoint.epoch} presented for the earlier epoch {epoch}"
        )
    # The age is measured in time, in epoch lengths, not by epoch indices: a reactive trigger
    # skips indices (the jump to the next server), and a fresh checkpoint must still pass.
    age = now - checkpoint.taken_at
    limit = max_checkpoint_age_s(epoch_length)
    if age > limit or age < -CHECKPOINT_CLOCK_SKEW_S:
        raise StaleMessageError(
            f"checkpoint taken {age:.1f} s ago has expired (at most {limit:.1f} s, "
            f"{MAX_CHECKPOINT_AGE_EPOCHS} epochs of {epoch_length:.1f} s)"
        )


def in_request_window(epoch_start: float, now: float) -> bool:
    """Whether a request for the epoch starting at ``epoch_start`` is taken at ``now``."""
    return -LATE_REQUEST_S <= epoch_start - now <= PREPARE_AHEAD_S
