"""Connection checkpoints: what a new server needs to re-create a live connection.

Theory of operation (paper section IV-B; TCP-Migrate / Migratory TCP): the old server may be
dead, flooded or compromised when the service roams, so it is never asked for anything.
Instead the server shim periodically pushes each connection's state to the *client*, which
stores it and hands it to the next server. A checkpoint holds:

* TCP state: both initial sequence numbers, MSS, window scales, SACK, the timestamp clock;
* positions: bytes received from the client (``c2s_pos``) and sent to it (``s2c_pos``), and the
  *fresh point* (``c2s_fresh``, ``s2c_fresh``) where the service's state was last known to be
  that of a new connection (a codec finds it: an HTTP/1.1 request boundary; for an unknown
  protocol, the connection's start);
* application state, as commitments: SHA-256 of the client's bytes ``[c2s_fresh, c2s_pos)``
  (the replay log) and of the service's bytes ``[s2c_fresh, s2c_pos)``. The new server replays
  the log to a fresh service instance and checks that it answers with the same bytes. The log
  itself is not carried: the client sent it and keeps it (``migrate.connstore``), and the hash
  makes it exactly as trustworthy as if the server had sealed the bytes, while every
  checkpoint stays small enough for one segment;
* identity and freshness: connection id, client address and port, the VIP port, the epoch, a
  counter per connection and the time it was taken;
* the session state at the fresh point (``state``, version 2 only), for a protocol whose
  connections keep state across exchanges (redis: AUTH, SELECT...; ``migrate.resp``): the
  bytes a new server sends the service before the replay, at most ``MAX_STATE_BYTES`` so that a
  carrier still fits one segment. Sealed like the rest: the client (which sent those commands
  itself) cannot change it, and an observer cannot read a password in it.

It is sealed (ChaCha20-Poly1305) under a key derived from the group key, which only the
server pool holds: the client can store a checkpoint but can neither read nor forge it. The
key rotates with the epoch the checkpoint was taken in: one key per range of
``CHECKPOINT_KEY_EPOCHS`` epochs (``checkpoint_key(group_key, epoch)``), so that no key seals
more than one range's checkpoints (random 96-bit nonces stay far from their birthday bound,
and a key that leaked opens one range only). A server opens a checkpoint with the key of the
requested epoch's range and, for the overlap at a range's start, of the range before
(``CheckpointKeys.candidates``); anything older has expired anyway
(``migrate.reincarnation.MAX_CHECKPOINT_AGE_EPOCHS``).

A *carrier* wraps a sealed checkpoint for the trip to the client on the connection's own
5-tuple (``migrate.kernel.rawtcp``). It is sealed again, on the client's secure channel, with
the few values the client needs in clear: which connection, the fresh point to trim its replay
buffer to, and the positions covered. An observer sees an encrypted segment of the connection.

Sealed checkpoint, version 1 (no session state; ``SEALED_BYTES`` long)::

    version u8 (1) | nonce (12) | ChaCha20-Poly1305(checkpoint key, nonce, body,
                                                    aad = "checkpoint" || deployment id)
    body: conn_id (16) | client address (4) | client port u16 | vport u16 | epoch u64 |
          counter u64 | taken_at i64 us | server_isn u32 | client_isn u32 | mss u16 |
          snd_wscale u8 | rcv_wscale u8 | flags u8 (1 sack, 2 timestamps, 4 unmigratable) |
          ts_val u32 | codec u8 (0 generic, 1 http, 2 resp, 3 memcached, 4 auto) | c2s_fresh u64 |
          c2s_pos u64 | s2c_fresh u64 | s2c_pos u64 | c2s_hash (32) | s2c_hash (32)

Version 2, with a session state of 1 to ``MAX_STATE_BYTES`` bytes (a checkpoint without one is
always written as version 1; ``sealed_length`` tells a parser how long one is)::

    version u8 (2) | state length u16 | nonce (12) |
    ChaCha20-Poly1305(checkpoint key, nonce, body || state,
                      aad = "checkpoint" || deployment id || version || state length)

Version 3, with a *range record* (``RangeRecord``): what a new server needs to regenerate an
HTTP response from the client's position with ``Range`` and ``If-Range`` instead of from its
start (``migrate.rangeplan``). Only the HTTP codec writes one, and never with a session state::

    version u8 (3) | record length u16 | nonce (12) |
    ChaCha20-Poly1305(checkpoint key, nonce, body || range record,
                      aad = "checkpoint" || deployment id || version || record length)
    range record: flags u8 (1 the validator is an entity tag, else a Last-Modified date;
                  2 s2c_hash covers nothing: the stream was itself resumed by a range) |
                  length u64 (the body's, = the representation's) | body_start u64 (s2c
                  position of the body's first byte) | window_start u64 (s2c position) |
                  window_hash (32: SHA-256 of the s2c bytes [window_start, s2c_pos)) |
                  validator length u8 (1..MAX_VALIDATOR_BYTES) | validator (the field value)

Carrier plaintext (inside the channel envelope, kind ``CHECKPOINT_CARRIER``)::

    conn_id (16) | client port u16 | counter u64 | c2s_fresh u64 | c2s_pos u64 | s2c_pos u64 |
    sealed checkpoint
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from migrate.channel import (
    Freshness,
    Kind,
    Opened,
    Opener,
    Purpose,
    Random,
    Sealer,
    derive_key,
)
from migrate.errors import AuthenticationError, MalformedMessageError
from migrate.resp import MAX_STATE_BYTES

CHECKPOINT_VERSION = 1
CHECKPOINT_VERSION_STATE = 2  # with a session state
CHECKPOINT_VERSION_RANGE = 3  # with a range record
CONN_ID_BYTES = 16
_BODY = struct.Struct("!16s4sHHQQqIIHBBBIBQQQQ32s32s")
_CARRIER = struct.Struct("!16sHQQQQ")
# "auto": the server's ``--codec auto`` had not recognised the protocol yet (no bytes, or too
# few, since the connection began): the next server recognises it from the same replayed bytes.
# Written as "generic" before 2026-12-04, which made the next incarnation hash an HTTP response
# without masking its Date, so the one after it diverged.
CODECS = {"generic": 0, "http": 1, "resp": 2, "memcached": 3, "auto": 4}
_CODEC_NAMES = {value: name for name, value in CODECS.items()}
FLAG_SACK = 1
FLAG_TIMESTAMPS = 2
FLAG_UNMIGRATABLE = 4
# s2c_hash is keyed BLAKE3 (``stream_hash_key``) rather than SHA-256: 2.1x the bytes per
# second on this project's machines (docs/benchmarks.md, "The running hash").
FLAG_KEYED_BLAKE3 = 8
# What becomes of live connections at a roam (roam server/client --migration): re-created
# at the next server from client-held checkpoints, or dropped (the paper's prototype).
MIGRATION_MODES = ("live", "reconnect")
STREAM_HASHES = ("sha256", "blake3")  # what a server shim may use for new connections
# What a server's running hash covers of a Range-capable response's body (roam server
# --range-bodies, ``migrate.streamstate.StreamState``): every byte ("hash"), or only the window
# before each checkpoint's position ("window": the range record's ``full_hash`` False).
RANGE_BODIES = ("hash", "window")
MAX_TAKEN_AT_US = 1 << 53  # checkpoint times: microseconds a float still holds exactly
SEALED_BYTES = 1 + 12 + _BODY.size + 16
"""Length of a sealed checkpoint without session state (version 1)."""
_STATE_HEADER = struct.Struct("!BH")
_RANGE = struct.Struct("!BQQQ32sB")
RANGE_FLAG_ETAG = 1
RANGE_FLAG_NO_FULL_HASH = 2
MAX_VALIDATOR_BYTES = 128
"""Longest validator (entity tag or date) a range record holds; nginx's are about 20 bytes."""
RANGE_RECORD_MAX = _RANGE.size + MAX_VALIDATOR_BYTES


@dataclass(frozen=True, slots=True)
class RangeRecord:
    """What a Range hand-over checks (``migrate.rangeplan``): the response that starts at the
    checkpoint's fresh point has a strong ``validator`` and ``length`` body bytes from s2c
    position ``body_start`` on; ``window_hash`` is the SHA-256 of the s2c bytes
    ``[window_start, s2c_pos)`` (body bytes just before the checkpoint's position).
    ``full_hash`` False: the checkpoint's ``s2c_hash`` commits to nothing (no server hashed
    the response from its start: the connection was itself re-created from a range, or its
    server hashes only windows of such bodies, ``RANGE_BODIES`` "window")."""

    validator: bytes
    etag: bool
    length: int
    body_start: int
    window_start: int
    window_hash: bytes
    full_hash: bool = True

    def __post_init__(self) -> None:
        if not 1 <= len(self.validator) <= MAX_VALIDATOR_BYTES:
            raise MalformedMessageError(
                f"range record validator of {len(self.validator)} bytes "
                f"(1 to {MAX_VALIDATOR_BYTES})"
            )
        if len(self.window_hash) != 32:
            raise MalformedMessageError("range record window hash must be 32 bytes")
        if not 0 <= self.body_start <= self.window_start < 2**63 or not 0 < self.length < 2**63:
            raise MalformedMessageError("range record positions out of order or out of range")

    @property
    def body_end(self) -> int:
        return self.body_start + self.length

    def encode(self) -> bytes:
        flags = (RANGE_FLAG_ETAG if self.etag else 0) | (
            0 if self.full_hash else RANGE_FLAG_NO_FULL_HASH
        )
        head = _RANGE.pack(
            flags,
            self.length,
            self.body_start,
            self.window_start,
            self.window_hash,
            len(self.validator),
        )
        return head + self.validator

    @classmethod
    def decode(cls, data: bytes) -> RangeRecord:
        if len(data) < _RANGE.size:
            raise MalformedMessageError(f"range record of {len(data)} bytes is truncated")
        flags, length, body_start, window_start, window_hash, size = _RANGE.unpack_from(data)
        if flags & ~(RANGE_FLAG_ETAG | RANGE_FLAG_NO_FULL_HASH):
            raise MalformedMessageError(f"unknown range record flags {flags:#x}")
        if len(data) != _RANGE.size + size:
            raise MalformedMessageError(
                f"range record has {len(data)} bytes, its validator says {_RANGE.size + size}"
            )
        return cls(
            bytes(data[_RANGE.size :]),
            bool(flags & RANGE_FLAG_ETAG),
            length,
            body_start,
            window_start,
            window_hash,
            not flags & RANGE_FLAG_NO_FULL_HASH,
        )


@dataclass(frozen=True, slots=True)
class TcpSnapshot:
    server_isn: int
    client_isn: int
    mss: int
    snd_wscale: int
    rcv_wscale: int
    sack: bool
    timestamps: bool
    ts_val: int  # the server's TCP timestamp clock at ``taken_at`` (0 without timestamps)

    def __post_init__(self) -> None:
        for name in ("server_isn", "client_isn", "ts_val"):
            if not 0 <= getattr(self, name) < 2**32:
                raise MalformedMessageError(f"checkpoint {name} out of range")
        if not 1 <= self.mss < 2**16:
            raise MalformedMessageError("checkpoint MSS out of range")
        if not (0 <= self.snd_wscale <= 14 and 0 <= self.rcv_wscale <= 14):
            raise MalformedMessageError("checkpoint window scale out of range (0..14)")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    conn_id: bytes
    client: tuple[str, int]
    vport: int
    epoch: int
    counter: int
    taken_at: float
    tcp: TcpSnapshot
    codec: str
    c2s_fresh: int
    c2s_pos: int
    s2c_fresh: int
    s2c_pos: int
    c2s_hash: bytes
    s2c_hash: bytes
    unmigratable: bool = False
    state: bytes = b""
    range: RangeRecord | None = None
    keyed_hash: bool = False  # s2c_hash is keyed BLAKE3 (FLAG_KEYED_BLAKE3), else SHA-256

    def __post_init__(self) -> None:
        if len(self.conn_id) != CONN_ID_BYTES:
            raise MalformedMessageError("checkpoint connection id must be 16 bytes")
        if self.codec not in CODECS:
            raise MalformedMessageError(f"unknown codec {self.codec!r}")
        if not (0 <= self.c2s_fresh <= self.c2s_pos and 0 <= self.s2c_fresh <= self.s2c_pos):
            raise MalformedMessageError("checkpoint fresh point is after its position")
        if len(self.c2s_hash) != 32 or len(self.s2c_hash) != 32:
            raise MalformedMessageError("checkpoint hashes must be 32 bytes")
        if not 1 <= self.client[1] <= 65535 or not 1 <= self.vport <= 65535:
            raise MalformedMessageError("checkpoint port out of range")
        if len(self.state) > MAX_STATE_BYTES:
            raise MalformedMessageError(
                f"checkpoint session state of {len(self.state)} bytes (at most {MAX_STATE_BYTES})"
            )
        if self.range is not None:
            if self.state:
                raise MalformedMessageError("a checkpoint has a session state or a range record")
            if self.codec != "http":
                raise MalformedMessageError("only an HTTP checkpoint has a range record")
            if not self.s2c_fresh <= self.range.body_start <= self.range.window_start:
                raise MalformedMessageError("range record body starts before the fresh point")
            if not self.range.window_start < self.s2c_pos <= self.range.body_end:
                raise MalformedMessageError("range record window is not inside the body")

    def encode_body(self) -> bytes:
        tcp = self.tcp
        flags = (
            (FLAG_SACK if tcp.sack else 0)
            | (FLAG_TIMESTAMPS if tcp.timestamps else 0)
            | (FLAG_UNMIGRATABLE if self.unmigratable else 0)
            | (FLAG_KEYED_BLAKE3 if self.keyed_hash else 0)
        )
        return _BODY.pack(
            self.conn_id,
            ipaddress.IPv4Address(self.client[0]).packed,
            self.client[1],
            self.vport,
            self.epoch,
            self.counter,
            # Exactly: a float product rounds twice (at 2**32 s and beyond, a time of whole
            # microseconds came back one microsecond off).
            round(Decimal(self.taken_at) * 1_000_000),
            tcp.server_isn,
            tcp.client_isn,
            tcp.mss,
            tcp.snd_wscale,
            tcp.rcv_wscale,
            flags,
            tcp.ts_val,
            CODECS[self.codec],
            self.c2s_fresh,
            self.c2s_pos,
            self.s2c_fresh,
            self.s2c_pos,
            self.c2s_hash,
            self.s2c_hash,
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Checkpoint:
        if len(body) != _BODY.size:
            raise MalformedMessageError(
                f"checkpoint body has {len(body)} bytes, expected {_BODY.size}"
            )
        (
            conn_id,
            address,
            port,
            vport,
            epoch,
            counter,
            taken_us,
            server_isn,
            client_isn,
            mss,
            snd_wscale,
            rcv_wscale,
            flags,
            ts_val,
            codec,
            c2s_fresh,
            c2s_pos,
            s2c_fresh,
            s2c_pos,
            c2s_hash,
            s2c_hash,
        ) = _BODY.unpack(body)
        if codec not in _CODEC_NAMES:
            raise MalformedMessageError(f"unknown codec number {codec}")
        if flags & ~(FLAG_SACK | FLAG_TIMESTAMPS | FLAG_UNMIGRATABLE | FLAG_KEYED_BLAKE3):
            raise MalformedMessageError(f"unknown checkpoint flags {flags:#x}")
        if not 0 <= taken_us < MAX_TAKEN_AT_US:
            # Beyond 2^53 us a float no longer holds every microsecond, so such a time could
            # not be written back as it was read; no real clock is there (285 years).
            raise MalformedMessageError(f"checkpoint time {taken_us} us is out of range")
        tcp = TcpSnapshot(
            server_isn,
            client_isn,
            mss,
            snd_wscale,
            rcv_wscale,
            bool(flags & FLAG_SACK),
            bool(flags & FLAG_TIMESTAMPS),
            ts_val,
        )
        return cls(
            conn_id,
            (str(ipaddress.IPv4Address(address)), port),
            vport,
            epoch,
            counter,
            taken_us / 1_000_000,
            tcp,
            _CODEC_NAMES[codec],
            c2s_fresh,
            c2s_pos,
            s2c_fresh,
            s2c_pos,
            c2s_hash,
            s2c_hash,
            bool(flags & FLAG_UNMIGRATABLE),
            keyed_hash=bool(flags & FLAG_KEYED_BLAKE3),
        )


CHECKPOINT_KEY_EPOCHS = 64  # epochs sealed under one checkpoint key


def key_range(epoch: int) -> int:
    return max(0, epoch) // CHECKPOINT_KEY_EPOCHS


def checkpoint_key(group_key: bytes, epoch: int) -> bytes:
    """The key sealing checkpoints taken in ``epoch`` (one per range of epochs)."""
    return derive_key(group_key, Purpose.CHECKPOINT, b"range" + key_range(epoch).to_bytes(8, "big"))


class CheckpointKeys:
    """The pool's checkpoint keys, derived on demand and a few kept (bounded memory)."""

    KEPT = 4

    def __init__(self, group_key: bytes) -> None:
        self._group_key = group_key
        self._keys: dict[int, bytes] = {}

    def _key(self, index: int) -> bytes:
        key = self._keys.get(index)
        if key is None:
            key = checkpoint_key(self._group_key, index * CHECKPOINT_KEY_EPOCHS)
            self._keys[index] = key
            while len(self._keys) > self.KEPT:
                del self._keys[next(iter(self._keys))]
        return key

    def for_epoch(self, epoch: int) -> bytes:
        return self._key(key_range(epoch))

    def candidates(self, epoch: int) -> tuple[bytes, ...]:
        """Keys a checkpoint presented for ``epoch`` may be sealed with: its range's and, for
        the overlap, the previous range's."""
        index = key_range(epoch)
        return (self._key(index),) if index == 0 else (self._key(index), self._key(index - 1))


def _aad(deployment_id: bytes) -> bytes:
    return b"checkpoint" + deployment_id


def sealed_length(data: bytes, offset: int = 0) -> int:
    """The length of the sealed checkpoint that starts at ``data[offset]``, from its header."""
    if len(data) < offset + _STATE_HEADER.size:
        raise MalformedMessageError("sealed checkpoint is truncated")
    version, state_length = _STATE_HEADER.unpack_from(data, offset)
    if version == CHECKPOINT_VERSION:
        return SEALED_BYTES
    if version == CHECKPOINT_VERSION_STATE:
        if not 1 <= state_length <= MAX_STATE_BYTES:
            raise MalformedMessageError(f"checkpoint session state of {state_length} bytes")
        return SEALED_BYTES + _STATE_HEADER.size - 1 + int(state_length)
    if version == CHECKPOINT_VERSION_RANGE:
        if not _RANGE.size < state_length <= RANGE_RECORD_MAX:
            raise MalformedMessageError(f"checkpoint range record of {state_length} bytes")
        return SEALED_BYTES + _STATE_HEADER.size - 1 + int(state_length)
    raise MalformedMessageError(f"unsupported checkpoint version {version}")


def seal_checkpoint(
    checkpoint: Checkpoint, key: bytes, deployment_id: bytes, random: Random
) -> bytes:
    nonce = random(12)
    aead = ChaCha20Poly1305(key)
    if checkpoint.range is not None:
        record = checkpoint.range.encode()
        header = _STATE_HEADER.pack(CHECKPOINT_VERSION_RANGE, len(record))
        plain = checkpoint.encode_body() + record
        return header + nonce + aead.encrypt(nonce, plain, _aad(deployment_id) + header)
    if not checkpoint.state:
        sealed = aead.encrypt(nonce, checkpoint.encode_body(), _aad(deployment_id))
        return bytes([CHECKPOINT_VERSION]) + nonce + sealed
    header = _STATE_HEADER.pack(CHECKPOINT_VERSION_STATE, len(checkpoint.state))
    plain = checkpoint.encode_body() + checkpoint.state
    return header + nonce + aead.encrypt(nonce, plain, _aad(deployment_id) + header)


def open_checkpoint(data: bytes, key: bytes | Sequence[bytes], deployment_id: bytes) -> Checkpoint:
    """Open with ``key``, or with the first of several keys that fits (a rotation's overlap)."""
    keys = (key,) if isinstance(key, bytes) else tuple(key)
    expected = sealed_length(data)
    if len(data) != expected:
        raise MalformedMessageError(f"sealed checkpoint has {len(data)} bytes, expected {expected}")
    if data[0] == CHECKPOINT_VERSION:
        header, aad = 1, _aad(deployment_id)
    else:
        header = _STATE_HEADER.size
        aad = _aad(deployment_id) + data[:header]
    for candidate in keys:
        try:
            plain = ChaCha20Poly1305(candidate).decrypt(
                data[header : header + 12], data[header + 12 :], aad
            )
        except InvalidTag:
            continue
        checkpoint = Checkpoint.decode_body(plain[: _BODY.size])
        if header == 1:
            return checkpoint
        if data[0] == CHECKPOINT_VERSION_RANGE:
            return replace(checkpoint, range=RangeRecord.decode(plain[_BODY.size :]))
        return replace(checkpoint, state=plain[_BODY.size :])
    raise AuthenticationError(
        "checkpoint failed authentication (forged, tampered, another pool's, or sealed under "
        "a key that has rotated out)"
    )


# --- carriers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Carrier:
    """What the client can read of a checkpoint, plus the sealed checkpoint itself."""

    conn_id: bytes
    client_port: int
    counter: int
    c2s_fresh: int
    c2s_pos: int
    s2c_pos: int
    sealed: bytes

    def encode(self) -> bytes:
        head = _CARRIER.pack(
            self.conn_id,
            self.client_port,
            self.counter,
            self.c2s_fresh,
            self.c2s_pos,
            self.s2c_pos,
        )
        return head + self.sealed

    @classmethod
    def decode(cls, data: bytes) -> Carrier:
        expected = _CARRIER.size + sealed_length(data, _CARRIER.size)
        if len(data) != expected:
            raise MalformedMessageError(f"carrier has {len(data)} bytes, expected {expected}")
        conn_id, port, counter, c2s_fresh, c2s_pos, s2c_pos = _CARRIER.unpack_from(data)
        if c2s_fresh > c2s_pos:
            raise MalformedMessageError("carrier fresh point is after its position")
        return cls(conn_id, port, counter, c2s_fresh, c2s_pos, s2c_pos, data[_CARRIER.size :])

    @classmethod
    def of(cls, checkpoint: Checkpoint, sealed: bytes) -> Carrier:
        return cls(
            checkpoint.conn_id,
            checkpoint.client[1],
            checkpoint.counter,
            checkpoint.c2s_fresh,
            checkpoint.c2s_pos,
            checkpoint.s2c_pos,
            sealed,
        )


def carrier_context(deployment_id: bytes, client_id: int) -> bytes:
    return b"carrier" + deployment_id + struct.pack("!I", client_id)


def carrier_sealer(channel_key: bytes, deployment_id: bytes, client_id: int, sender: int) -> Sealer:
    key = derive_key(channel_key, Purpose.CARRIER_S2C)
    return Sealer(key, sender, carrier_context(deployment_id, client_id))


def carrier_opener(channel_key: bytes, deployment_id: bytes, client_id: int) -> Opener:
    """Carriers may arrive out of order (retransmitted or reordered segments): a window."""
    return Opener(
        derive_key(channel_key, Purpose.CARRIER_S2C),
        carrier_context(deployment_id, client_id),
        kinds=frozenset({Kind.CHECKPOINT_CARRIER}),
        # The store keeps the newest checkpoint per connection, so a late or replayed carrier
        # can only be ignored; a loose clock bound keeps clients with skewed clocks working.
        freshness=Freshness(max_age=600.0, max_skew=300.0),
        window_size=256,
    )


def seal_carrier(sealer: Sealer, carrier: Carrier, now: float) -> bytes:
    return sealer.seal(Kind.CHECKPOINT_CARRIER, carrier.encode(), now)


def open_carrier(opener: Opener, data: bytes, now: float) -> tuple[Opened, Carrier]:
    opened = opener.open(data, now)
    return opened, Carrier.decode(opened.plaintext)


def sealed_has_range(sealed: bytes | None) -> bool:
    """Whether a sealed checkpoint carries a range record (version 3, in its clear header)."""
    return sealed is not None and len(sealed) > 0 and sealed[0] == CHECKPOINT_VERSION_RANGE


def stream_hash_key(group_key: bytes, conn_id: bytes) -> bytes:
    """The key of a connection's running hash of the service's bytes (keyed BLAKE3): derived
    from the pool's group key and the connection's id, so every server of the pool computes
    the same for the connection, for its whole life, and nobody outside the pool can."""
    return hmac.new(group_key, b"server-roaming stream hash\x00" + conn_id, "sha256").digest()
