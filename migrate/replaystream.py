"""Replay bytes beyond one datagram: the replay stream to a new server's migration port.

Theory of operation (docs/protocol.md, "The replay stream"): a PREPARE or COMMIT whose replay
bytes do not fit one datagram (``MAX_INLINE_REPLAY_BYTES``) sends them first over a TCP
connection from the client shim to the new server's migration port (the TCP port with the
number of the UDP one). Each frame is ``length u32 | sealed message``, sealed like a request
(the client's ``REINCARNATE_C2S`` sealer: one counter for datagrams and frames, so the
server's replay window refuses a frame seen before); its plaintext is a ``Chunk``::

    tag u8 (5) | epoch u64 | client port u16 | vport u16 | base u64 | start u64 | bytes

``base`` is where the connection's streamed bytes begin (the PREPARE's ``replay_from``),
``start`` where this chunk's bytes begin. The server holds, per client and connection, one
contiguous run ``[base, end)`` (``ReplayBuffers``): a chunk extends it (``start <= end``; bytes
it already holds must be equal), or with ``start == base`` of another base replaces it;
anything else is refused and changes nothing. Each stored chunk is answered on the same
connection with a sealed ``Ack`` (the server's ``REINCARNATE_S2C`` sealer)::

    tag u8 (6) | client port u16 | base u64 | end u64

The datagram then names the streamed bytes instead of carrying them (``Request.streamed``):
the server takes ``[replay_from, replay_from + streamed)`` from the run and goes on exactly as
with inline bytes (the checkpoint's commitment is checked on the whole). The client keeps the
acknowledged positions per server and connection (``Positions``): a refresh tops the run up,
the COMMIT sends only what no acknowledgement covers, a retry sends nothing twice.

Bounds: a run longer than ``max_replay`` (``--max-replay``) is refused, a client's runs
together hold at most ``max_per_client``, and all clients' runs on the server at most
``max_total`` (many clients, each within its own bound, still cannot exhaust its memory).
Pure: no I/O, no clock (``now`` comes in).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from migrate.channel import MAX_MESSAGE_BYTES
from migrate.errors import MalformedMessageError, RemoteError

DEFAULT_MAX_REPLAY = 64 * 1024 * 1024  # --max-replay: one connection's replay bytes
MAX_INLINE_REPLAY_BYTES = 60_000  # what a datagram carries; more goes on the stream
CHUNK_BYTES = 64_000  # bytes per frame: a sealed chunk is a channel message (MAX_MESSAGE_BYTES)
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES
PER_CLIENT_RUNS = 2  # a client's runs together hold at most this many max_replay
TOTAL_RUNS = 8  # all clients' runs on a server together hold at most this many max_replay
CHUNK_TAG = 5
ACK_TAG = 6
_LENGTH = struct.Struct("!I")
_CHUNK = struct.Struct("!BQHHQQ")
_ACK = struct.Struct("!BHQQ")


class ReplayStreamError(RemoteError):
    """A chunk this server refuses (the stream is closed, nothing changed)."""


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise MalformedMessageError("replay chunk port out of range")


@dataclass(frozen=True, slots=True)
class Chunk:
    epoch: int
    client_port: int
    vport: int
    base: int
    start: int
    data: bytes

    def __post_init__(self) -> None:
        _check_port(self.client_port)
        _check_port(self.vport)
        if self.start < self.base:
            raise MalformedMessageError("replay chunk starts before its base")
        if not self.data:
            raise MalformedMessageError("empty replay chunk")
        if len(self.data) > CHUNK_BYTES:
            raise MalformedMessageError(f"replay chunk of {len(self.data)} bytes is too long")

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def encode(self) -> bytes:
        head = _CHUNK.pack(CHUNK_TAG, self.epoch, self.client_port, self.vport, self.base,
                           self.start)  # fmt: skip
        return head + self.data

    @classmethod
    def decode(cls, data: bytes) -> Chunk:
        if len(data) < _CHUNK.size:
            raise MalformedMessageError("replay chunk is truncated")
        tag, epoch, port, vport, base, start = _CHUNK.unpack_from(data)
        if tag != CHUNK_TAG:
            raise MalformedMessageError(f"not a replay chunk (tag {tag})")
        return cls(epoch, port, vport, base, start, data[_CHUNK.size :])


@dataclass(frozen=True, slots=True)
class Ack:
    client_port: int
    base: int
    end: int

    def encode(self) -> bytes:
        return _ACK.pack(ACK_TAG, self.client_port, self.base, self.end)

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        if len(data) != _ACK.size:
            raise MalformedMessageError("replay acknowledgement has a bad length")
        tag, port, base, end = _ACK.unpack(data)
        if tag != ACK_TAG or end < base:
            raise MalformedMessageError("not a replay acknowledgement")
        _check_port(port)
        return cls(port, base, end)


def stream_frame(message: bytes) -> bytes:
    return _LENGTH.pack(len(message)) + message


class FrameReader:
    """Splits a byte stream into frames; a frame longer than ``MAX_FRAME_BYTES`` is refused
    before its bytes are buffered."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if length == 0 or length > self.max_frame:
                raise MalformedMessageError(f"replay stream frame of {length} bytes")
            if len(self.buffer) < _LENGTH.size + length:
                break
            frames.append(bytes(self.buffer[_LENGTH.size : _LENGTH.size + length]))
            del self.buffer[: _LENGTH.size + length]
        return frames


def chunks(epoch: int, port: int, vport: int, base: int, start: int, data: bytes) -> list[Chunk]:
    """``data`` (the bytes from ``start``) cut into chunks of at most ``CHUNK_BYTES``."""
    return [
        Chunk(epoch, port, vport, base, start + offset, data[offset : offset + CHUNK_BYTES])
        for offset in range(0, len(data), CHUNK_BYTES)
    ]


# -- the server: runs of replay bytes per client and connection -------------------------------


@dataclass(slots=True)
class Run:
    base: int
    data: bytearray
    updated: float
    expires: float | None = None  # set by ``retire``

    @property
    def end(self) -> int:
        return self.base + len(self.data)


@dataclass
class ReplayBuffers:
    """The streamed replay bytes a server holds, per (client id, client port)."""

    max_replay: int = DEFAULT_MAX_REPLAY
    max_per_client: int = PER_CLIENT_RUNS * DEFAULT_MAX_REPLAY
    max_total: int = TOTAL_RUNS * DEFAULT_MAX_REPLAY
    runs: dict[tuple[int, int], Run] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)  # bytes per client id
    total: int = 0  # bytes held for all clients

    def add(self, client_id: int, chunk: Chunk, now: float) -> Ack:
        """Store ``chunk``; a refusal raises and changes nothing."""
        key = (client_id, chunk.client_port)
        if chunk.end - chunk.base > self.max_replay:
            raise ReplayStreamError(
                f"replay of {chunk.end - chunk.base} bytes exceeds the per-connection bound "
                f"({self.max_replay})"
            )
        run = self.runs.get(key)
        if run is not None and run.base == chunk.base and chunk.start <= run.end:
            overlap = run.end - chunk.start
            if run.data[chunk.start - run.base :][: len(chunk.data)] != chunk.data[:overlap]:
                raise ReplayStreamError("replay chunk differs from the bytes already held")
            growth, replaced = max(0, chunk.end - run.end), 0
        elif chunk.start == chunk.base:
            growth, replaced = len(chunk.data), len(run.data) if run is not None else 0
        else:
            held = f"[{run.base}, {run.end})" if run is not None else "nothing"
            raise ReplayStreamError(
                f"replay chunk [{chunk.start}, {chunk.end}) of base {chunk.base} leaves a gap "
                f"(held: {held})"
            )
        total = self.held.get(client_id, 0) - replaced + growth
        if total > self.max_per_client:
            raise ReplayStreamError(
                f"client {client_id} would hold {total} streamed replay bytes here (at most "
                f"{self.max_per_client})"
            )
        everyone = self.total - replaced + growth
        if everyone > self.max_total:
            raise ReplayStreamError(
                f"this server would hold {everyone} streamed replay bytes for all clients (at "
                f"most {self.max_total})"
            )
        if run is None or replaced or run.base != chunk.base:
            run = self.runs[key] = Run(chunk.base, bytearray(chunk.data), now)
        elif growth:
            run.data += chunk.data[len(chunk.data) - growth :]
        run.updated = now
        run.expires = None
        self.held[client_id] = total
        self.total = everyone
        return Ack(chunk.client_port, run.base, run.end)

    def slice(self, client_id: int, port: int, start: int, end: int) -> bytes | None:
        """The held bytes ``[start, end)`` of a connection; None unless all are held."""
        run = self.runs.get((client_id, port))
        if run is None or start < run.base or end > run.end or end < start:
            return None
        return bytes(run.data[start - run.base : end - run.base])

    def describe(self, client_id: int, port: int) -> str:
        run = self.runs.get((client_id, port))
        return "nothing" if run is None else f"[{run.base}, {run.end})"

    def drop(self, client_id: int, port: int) -> None:
        run = self.runs.pop((client_id, port), None)
        if run is not None:
            self.total -= len(run.data)
            left = self.held.get(client_id, 0) - len(run.data)
            if left > 0:
                self.held[client_id] = left
            else:
                self.held.pop(client_id, None)

    def retire(self, client_id: int, port: int, now: float, after: float) -> None:
        """The run's hand-over is done: drop it ``after`` seconds from ``now`` (a repeated
        COMMIT whose answer was lost still finds its bytes meanwhile)."""
        run = self.runs.get((client_id, port))
        if run is not None:
            run.expires = now + after

    def expire(self, now: float, ttl: float) -> list[tuple[int, int]]:
        """Drop runs not extended for ``ttl`` (their hand-over is over) and retired runs whose
        time has come; returns their keys."""
        old = [
            key
            for key, run in self.runs.items()
            if now - run.updated > ttl or (run.expires is not None and now >= run.expires)
        ]
        for key in old:
            self.drop(*key)
        return old


# -- the client: acknowledged positions per server and connection ------------------------------


@dataclass
class Positions:
    """What each server acknowledged of each connection's run: ``(base, end)`` by
    (server, client port)."""

    acked: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def plan(self, server: str, port: int, start: int, end: int) -> tuple[int, int]:
        """To make the server hold ``[start, end)``: the base to send under and the position
        to send from (``end``: nothing to send)."""
        held = self.acked.get((server, port))
        if held is not None and held[0] <= start <= held[1]:
            return held[0], min(held[1], end)
        return start, start

    def on_ack(self, server: str, ack: Ack) -> None:
        held = self.acked.get((server, ack.client_port))
        if held is None or held[0] != ack.base or ack.end > held[1]:
            self.acked[(server, ack.client_port)] = (ack.base, ack.end)

    def covers(self, server: str, port: int, start: int, end: int) -> bool:
        held = self.acked.get((server, port))
        return held is not None and held[0] <= start and end <= held[1]

    def forget(self, server: str, port: int | None = None) -> None:
        """Forget a connection's positions (``port``) or all of a server's (its stream broke:
        the positions stay true, but a new stream must start a run again to be safe)."""
        for key in [k for k in self.acked if k[0] == server and port in (None, k[1])]:
            del self.acked[key]
