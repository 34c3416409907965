"""Secure channel: confidentiality, authentication, integrity and freshness (paper footnote 2).

Theory of operation: a client shares one secret ``K_C`` with the server pool, fixed at offline
registration. ``K_C`` itself never keys anything: every use derives its own key with
HKDF-SHA256, and the derivation's ``info`` names the purpose and direction (``update s2c``,
``reincarnate c2s``, ...), so a message sealed for one purpose or direction never opens in
another. Messages are sealed with ChaCha20-Poly1305.

Every message starts with a fixed 24-byte header, sent in clear and authenticated as
associated data together with a context the two ends know (deployment id, client id), which
binds a message to its deployment and client without sending them::

    magic "SR" | version 1 | kind | sender u32 | counter u64 | sent_at i64 (microseconds)

The nonce is ``sender || counter``. Several servers send to the same client under one key, so
each sender has its own counter space and its own replay window at the receiver. A sender's
counter must grow even across restarts: ``next_counter`` uses the sender's clock in
microseconds, never less than the last value plus one; and since a clock can step back (NTP,
a VM restored, an operator's mistake) while the process is down, a process's sealers share a
``CounterFloor`` kept in its state file: it is persisted ahead of use (a reservation of
``COUNTER_RESERVE_US``), and a restarted process's counters start above it, so no (sender,
counter) nonce is ever used twice under a key, whatever the clock did.

Opening a message is two-phase: ``open`` checks the header, the seal, freshness and the replay
window but changes nothing; the caller validates the contents and then calls ``accept``. So a
message that is authentic but wrong in content leaves no trace, not even in the replay window.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from migrate.errors import (
    AuthenticationError,
    MalformedMessageError,
    ReorderedMessageError,
    ReplayedMessageError,
    StaleMessageError,
)

Random = Callable[[int], bytes]
"""Source of randomness: ``random(n)`` returns ``n`` unpredictable bytes (e.g. ``os.urandom``)."""

MAGIC = b"SR"
VERSION = 1
HEADER = struct.Struct("!2sBBIQq")
HEADER_BYTES = HEADER.size
TAG_BYTES = 16
MAX_MESSAGE_BYTES = 65000
HKDF_SALT = b"server-roaming/v1"


class Kind(IntEnum):
    """What a sealed message is; part of the authenticated header."""

    ROAMING_UPDATE = 1
    GROUP_CONTROL = 2
    REINCARNATE_REQUEST = 3
    REINCARNATE_READY = 4
    CHECKPOINT_CARRIER = 5


class Purpose:
    """HKDF labels: purpose and direction of each derived key."""

    UPDATE_S2C = "roaming update s2c"
    REINCARNATE_C2S = "reincarnate c2s"
    REINCARNATE_S2C = "reincarnate s2c"
    SERVER_LIST = "server list"
    GROUP_CONTROL = "group control"
    CLIENT_LIST = "client list"
    CHECKPOINT = "checkpoint"
    CARRIER_S2C = "checkpoint carrier s2c"


def derive_key(secret: bytes, purpose: str, context: bytes = b"") -> bytes:
    """A 32-byte key for one purpose, from ``secret`` (``K_C`` or the group key)."""
    if len(secret) < 32:
        raise ValueError("secrets used for key derivation must be at least 32 bytes")
    info = purpose.encode() + b"\x00" + context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=info).derive(secret)


def seconds_to_micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


@dataclass(frozen=True, slots=True)
class Header:
    kind: int
    sender: int
    counter: int
    sent_at: float  # sender's clock, seconds

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, VERSION, self.kind, self.sender, self.counter, seconds_to_micros(self.sent_at)
        )


def parse_header(message: bytes) -> Header:
    """Strictly parse the clear header of a sealed message."""
    if len(message) < HEADER_BYTES + TAG_BYTES:
        raise MalformedMessageError(
            f"message of {len(message)} bytes is shorter than a header and tag "
            f"({HEADER_BYTES + TAG_BYTES} bytes)"
        )
    if len(message) > MAX_MESSAGE_BYTES:
        raise MalformedMessageError(f"message of {len(message)} bytes is too long")
    magic, version, kind, sender, counter, sent_at_us = HEADER.unpack_from(message)
    if magic != MAGIC:
        raise MalformedMessageError(f"bad magic {magic!r}: not a server-roaming message")
    if version != VERSION:
        raise MalformedMessageError(f"unsupported message version {version}")
    if kind not in Kind._value2member_map_:
        raise MalformedMessageError(f"unknown message kind {kind}")
    if counter == 0:
        raise MalformedMessageError("message counter 0 is reserved")
    return Header(kind, sender, counter, sent_at_us / 1_000_000)


def _nonce(sender: int, counter: int) -> bytes:
    return struct.pack("!IQ", sender, counter)


COUNTER_RESERVE_US = 600_000_000
"""How far ahead of the counters in use a ``CounterFloor`` is persisted: ten minutes of clock,
so a busy process writes its state for it about once per ten minutes."""


class CounterFloor:
    """A floor under the counters of every sealer of one process, persisted ahead of use.

    ``floor`` is what the previous run persisted: every counter of this run is above it.
    Before a sealer uses a counter above ``reserved``, ``save`` persists a new reservation
    (the counter plus ``span``); if saving fails, it raises and nothing is sealed.
    """

    def __init__(
        self, floor: int, save: Callable[[int], None], span: int = COUNTER_RESERVE_US
    ) -> None:
        if floor < 0 or span < 1:
            raise ValueError("a counter floor is non-negative and reserves at least one")
        self.floor = floor
        self.reserved = floor
        self.span = span
        self._save = save

    def cover(self, counter: int) -> None:
        if counter > self.reserved:
            reservation = counter + self.span
            self._save(reservation)
            self.reserved = reservation


class Sealer:
    """Seals messages of one purpose and direction for one sender."""

    def __init__(
        self,
        key: bytes,
        sender: int,
        context: bytes = b"",
        counters: CounterFloor | None = None,
    ) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.sender = sender
        self.context = context
        self.counters = counters
        self.last_counter = 0 if counters is None else counters.floor

    def keep_counters(self, counters: CounterFloor) -> Sealer:
        """Start above ``counters``' floor and keep it ahead of every counter used."""
        self.counters = counters
        self.last_counter = max(self.last_counter, counters.floor)
        return self

    def next_counter(self, now: float) -> int:
        """Counters follow the sender's clock in microseconds, so they grow across restarts
        (and stay above the persisted floor if the clock went back)."""
        counter = max(self.last_counter + 1, seconds_to_micros(now))
        if self.counters is not None:
            self.counters.cover(counter)
        self.last_counter = counter
        return counter

    def seal(self, kind: Kind, plaintext: bytes, now: float) -> bytes:
        header = Header(kind, self.sender, self.next_counter(now), now).pack()
        nonce = _nonce(self.sender, self.last_counter)
        return header + self._aead.encrypt(nonce, plaintext, header + self.context)


class ReplayWindow:
    """Sliding window over one sender's counters (RFC 4303 section 3.4.3 style).

    ``size`` counters below the highest one accepted may still arrive out of order, once each.
    With ``strict`` set, anything below the highest is refused as reordered: for messages whose
    effect depends on order (roaming updates).
    """

    __slots__ = ("bitmap", "highest", "size", "strict")

    def __init__(self, size: int = 64, strict: bool = False) -> None:
        if size < 1:
            raise ValueError("a replay window holds at least one counter")
        self.size = size
        self.strict = strict
        self.highest = 0
        self.bitmap = 0  # bit k set: counter highest - k was accepted

    def check(self, counter: int) -> None:
        if counter > self.highest:
            return
        offset = self.highest - counter
        if offset < self.size and self.bitmap >> offset & 1:
            raise ReplayedMessageError(f"message counter {counter} was already accepted")
        if self.strict:
            raise ReorderedMessageError(
                f"message counter {counter} is older than the newest accepted ({self.highest})"
            )
        if offset >= self.size:
            raise StaleMessageError(
                f"message counter {counter} is below the replay window (newest {self.highest})"
            )

    def commit(self, counter: int) -> None:
        self.check(counter)
        if counter > self.highest:
            shift = counter - self.highest
            # Counters are microseconds, so a sender quiet for an hour jumps by 3.6e9: shifting
            # the bitmap by the gap would cost time and memory in proportion to it (1.9 s and
            # 450 MB after 72 minutes, MemoryError after longer). A gap of a whole window or
            # more forgets every bit anyway, whatever its size.
            if shift >= self.size:
                self.bitmap = 1
            else:
                self.bitmap = ((self.bitmap << shift) | 1) & ((1 << self.size) - 1)
            self.highest = counter
        else:
            self.bitmap |= 1 << (self.highest - counter)


@dataclass(frozen=True, slots=True)
class Opened:
    header: Header
    plaintext: bytes


@dataclass(slots=True)
class Freshness:
    """How old (by the sender's clock, as we see it) a message may be."""

    max_age: float = 30.0
    max_skew: float = 1.0

    def check(self, sent_at: float, now: float) -> None:
        if sent_at > now + self.max_skew:
            raise StaleMessageError(
                f"message is dated {sent_at - now:.3f} s in the future (allowed skew "
                f"{self.max_skew} s)"
            )
        age = now - sent_at
        if age > self.max_age + self.max_skew:
            raise StaleMessageError(
                f"message is {age:.3f} s old (limit {self.max_age + self.max_skew} s)"
            )


@dataclass(slots=True)
class Opener:
    """Opens messages of one purpose and direction; keeps a replay window per sender."""

    key: bytes
    context: bytes = b""
    kinds: frozenset[Kind] = frozenset(Kind)
    freshness: Freshness = field(default_factory=Freshness)
    window_size: int = 64
    strict_order: bool = False
    max_senders: int = 4096
    windows: dict[int, ReplayWindow] = field(default_factory=dict)
    _aead: ChaCha20Poly1305 | None = None
    _accepted: Opened | None = None  # the message ``accept`` recorded last

    def _cipher(self) -> ChaCha20Poly1305:
        if self._aead is None:
            self._aead = ChaCha20Poly1305(self.key)
        return self._aead

    def open(self, message: bytes, now: float, freshness: Freshness | None = None) -> Opened:
        """Verify ``message`` completely; changes nothing (see ``accept``).

        ``now`` is in the sender's clock as far as the caller knows it; ``freshness`` overrides
        the opener's bound for this one message.
        """
        header = parse_header(message)
        if header.kind not in self.kinds:
            raise MalformedMessageError(
                f"message kind {Kind(header.kind).name} is not expected here"
            )
        clear = message[:HEADER_BYTES]
        try:
            plaintext = self._cipher().decrypt(
                _nonce(header.sender, header.counter), message[HEADER_BYTES:], clear + self.context
            )
        except InvalidTag:
            raise AuthenticationError(
                f"message from sender {header.sender} failed authentication "
                "(forged, tampered, or sealed with another key)"
            ) from None
        (freshness or self.freshness).check(header.sent_at, now)
        window = self.windows.get(header.sender)
        if window is not None:
            window.check(header.counter)
        elif len(self.windows) >= self.max_senders:
            raise StaleMessageError(f"too many senders; sender {header.sender} not tracked")
        return Opened(header, plaintext)

    def accept(self, opened: Opened) -> None:
        """Record ``opened`` in its sender's replay window: it will never be accepted again.
        Accepting the very message recorded last again does nothing (each request of a packed
        cell accepts the cell as if it had come alone)."""
        if opened is self._accepted:
            return
        sender = opened.header.sender
        window = self.windows.get(sender)
        if window is None:
            window = self.windows[sender] = ReplayWindow(self.window_size, self.strict_order)
        window.commit(opened.header.counter)
        self._accepted = opened
