"""Group control messages among the server pool: threat level, reactive roam, revocation.

Theory of operation: the paper's servers and firewalls share a group key and "roaming update
messages caused by a change in the value of m are sent to all servers and firewalls as well"
(section IV-A). Here the operator's ``roam threat`` / ``roam trigger`` commands, and servers
themselves (a repeat offender against its rate contract), send sealed control messages to
every server's control port; each server applies them to its own state and acknowledges.
Clients learn the effect through their ordinary roaming updates.

* ``Threat(m, from_epoch)``: epochs ``>= from_epoch`` use ``m``; refused unless
  ``from_epoch`` is after the receiver's current epoch (so no server's past changes).
* ``Trigger(leave_epoch, next_epoch, at)``: a reactive roam. Epoch ``leave_epoch`` ends at
  ``at`` (sender's clock, which servers keep within ``delta`` of each other) and the schedule
  jumps to ``next_epoch``, the first later epoch on another server; the epochs in between,
  which would have stayed on the same server, are skipped. Every server re-anchors its
  schedule at ``(next_epoch, at)``. The receiver recomputes ``next_epoch`` from its own chain
  and refuses a trigger that disagrees.
* ``Revoke(client_id)``: the client gets no further key extensions and is refused by the
  firewalls.
* ``Strike(client_id, epoch)``: a server caught the client over its rate contract in
  ``epoch`` (its first offence): every server counts it, so that an offence anywhere later is
  the client's second and gets it revoked.
* ``Ack(counter, accepted)``: a server's answer to the control message with that counter
  (refused messages are logged by the server with the reason).
* ``Facts(revoked, strikes)``: anti-entropy (``migrate.antientropy``). Every server sends its
  whole grow-only control state (revoked client ids; client id -> epoch of its first offence)
  to every other server once per sync period, padded to a size fixed by the deployment; the
  receiver merges it. Not acknowledged: the next period repeats it.
* ``StateQuery()``: the operator's ``roam resync`` asks a server for its schedule state.
* ``StateReport(counter, anchor_epoch, anchor_time, m)``: the answer to the query with that
  counter: the server's anchor (``anchor_epoch`` 0: none, the deployment's start) and its
  whole m schedule. The operator adopts it when its own record of threat changes and triggers
  was lost (an interrupted command, another host).

Plaintext: ``type u8`` then ``Threat: m u8 | from_epoch u64``; ``Trigger: leave u64 | next
u64 | at i64 microseconds``; ``Revoke: client_id u32``; ``Ack: counter u64 | accepted u8``;
``Strike: client_id u32 | epoch u64``; ``Facts: revoked count u32 | strike count u32 |
revoked ids u32... (ascending) | (client_id u32 | epoch u64)... (ascending ids) | zero
padding``; ``StateQuery``: empty; ``StateReport: counter u64 | anchor epoch u64 | anchor at i64
microseconds | initial m u8 | change count u16 | (from_epoch u64 | m u8)... (ascending)``.
Sealed on the group channel (``Purpose.GROUP_CONTROL``, kind ``GROUP_CONTROL``) with context
``"control" || deployment id``; the operator's sender id is ``OPERATOR``, servers use their
index.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from migrate.channel import Freshness, Kind, Opened, Opener, Purpose, Sealer, derive_key
from migrate.errors import MalformedMessageError, RoamError
from migrate.schedule import Anchor, MSchedule, check_m

OPERATOR = 0xFFFF_FFFF
_THREAT = struct.Struct("!BQ")
_TRIGGER = struct.Struct("!QQq")
_REVOKE = struct.Struct("!I")
_ACK = struct.Struct("!Q?")
_STRIKE = struct.Struct("!IQ")
_FACTS = struct.Struct("!II")
_ID = struct.Struct("!I")
_REPORT = struct.Struct("!QQqBH")
_CHANGE = struct.Struct("!QB")
MAX_FACTS_BYTES = 60_000  # a sealed Facts fits one datagram (MAX_MESSAGE_BYTES)


@dataclass(frozen=True, slots=True)
class Threat:
    m: int
    from_epoch: int


@dataclass(frozen=True, slots=True)
class Trigger:
    leave_epoch: int
    next_epoch: int
    at: float


@dataclass(frozen=True, slots=True)
class Revoke:
    client_id: int


@dataclass(frozen=True, slots=True)
class Strike:
    client_id: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Ack:
    counter: int
    accepted: bool = True


@dataclass(frozen=True, slots=True)
class Facts:
    """A server's grow-only control state, for anti-entropy (``migrate.antientropy``)."""

    revoked: frozenset[int]
    strikes: tuple[tuple[int, int], ...]  # (client id, epoch of its first offence), ascending
    pad_to: int = 0  # encoded size to pad the body to (not part of the state)

    def state(self) -> tuple[frozenset[int], tuple[tuple[int, int], ...]]:
        return self.revoked, self.strikes


@dataclass(frozen=True, slots=True)
class StateQuery:
    """The operator asks a server for its schedule state (answered by ``StateReport``)."""


@dataclass(frozen=True, slots=True)
class StateReport:
    """A server's schedule state, answering the ``StateQuery`` with ``counter``."""

    counter: int
    anchor: Anchor | None
    m: MSchedule


def facts_size(revoked: int, strikes: int) -> int:
    """Encoded size of a ``Facts`` body with so many entries (type byte included)."""
    return 1 + _FACTS.size + revoked * _ID.size + strikes * _STRIKE.size


ControlMessage = Threat | Trigger | Revoke | Ack | Strike | Facts | StateQuery | StateReport
_TYPES: dict[type, int] = {
    Threat: 1,
    Trigger: 2,
    Revoke: 3,
    Ack: 4,
    Strike: 5,
    Facts: 6,
    StateQuery: 7,
    StateReport: 8,
}
MAX_M_CHANGES = (MAX_FACTS_BYTES - 1 - _REPORT.size) // _CHANGE.size


def _encode_report(message: StateReport) -> bytes:
    anchor_epoch, anchor_us = (
        (0, 0)
        if message.anchor is None
        else (
            message.anchor.epoch,
            round(message.anchor.time * 1e6),
        )
    )
    changes = message.m.changes
    if len(changes) > MAX_M_CHANGES:
        raise MalformedMessageError(f"{len(changes)} m changes do not fit one datagram")
    body = bytearray(
        _REPORT.pack(message.counter, anchor_epoch, anchor_us, message.m.initial, len(changes))
    )
    for from_epoch, m in changes:
        body += _CHANGE.pack(from_epoch, m)
    return bytes(body)


def _decode_report(body: bytes) -> StateReport:
    if len(body) < _REPORT.size:
        raise MalformedMessageError("state report is shorter than its header")
    counter, anchor_epoch, anchor_us, initial, count = _REPORT.unpack_from(body)
    if len(body) != _REPORT.size + count * _CHANGE.size:
        raise MalformedMessageError(
            f"state report of {len(body)} bytes does not hold {count} m changes"
        )
    changes = tuple(
        _CHANGE.unpack_from(body, _REPORT.size + i * _CHANGE.size) for i in range(count)
    )
    try:
        m = MSchedule(initial, changes)
    except RoamError as error:
        raise MalformedMessageError(f"state report: {error}") from None
    anchor = None if anchor_epoch == 0 else Anchor(anchor_epoch, anchor_us / 1e6)
    return StateReport(counter, anchor, m)


def _encode_facts(message: Facts) -> bytes:
    body = bytearray(_FACTS.pack(len(message.revoked), len(message.strikes)))
    for client_id in sorted(message.revoked):
        body += _ID.pack(client_id)
    for client_id, epoch in message.strikes:
        body += _STRIKE.pack(client_id, epoch)
    padding = max(0, message.pad_to - 1 - len(body))
    if 1 + len(body) + padding > MAX_FACTS_BYTES:
        raise MalformedMessageError(
            f"control state of {len(message.revoked)} revocations and {len(message.strikes)} "
            f"strikes does not fit one datagram ({MAX_FACTS_BYTES} bytes)"
        )
    return bytes(body) + bytes(padding)


def _decode_facts(body: bytes) -> Facts:
    if len(body) < _FACTS.size:
        raise MalformedMessageError("control state message is shorter than its counts")
    revoked_count, strike_count = _FACTS.unpack_from(body)
    end = facts_size(revoked_count, strike_count) - 1
    if end > len(body):
        raise MalformedMessageError(
            f"control state message of {len(body)} bytes cannot hold {revoked_count} "
            f"revocations and {strike_count} strikes"
        )
    if any(body[end:]):
        raise MalformedMessageError("control state message has non-zero padding")
    offset = _FACTS.size
    revoked = [_ID.unpack_from(body, offset + i * _ID.size)[0] for i in range(revoked_count)]
    offset += revoked_count * _ID.size
    strikes = [_STRIKE.unpack_from(body, offset + i * _STRIKE.size) for i in range(strike_count)]
    ids = [client_id for client_id, _ in strikes]
    for name, values in (("revoked", revoked), ("struck", ids)):
        if 0 in values or any(a >= b for a, b in itertools.pairwise(values)):
            raise MalformedMessageError(
                f"control state message: {name} client ids must be non-zero and ascending"
            )
    if any(epoch == 0 for _, epoch in strikes):
        raise MalformedMessageError("control state message: a strike in epoch 0")
    return Facts(frozenset(revoked), tuple((c, e) for c, e in strikes))


def encode_control(message: ControlMessage) -> bytes:
    if isinstance(message, Threat):
        body = _THREAT.pack(message.m, message.from_epoch)
    elif isinstance(message, Trigger):
        body = _TRIGGER.pack(message.leave_epoch, message.next_epoch, round(message.at * 1e6))
    elif isinstance(message, Revoke):
        body = _REVOKE.pack(message.client_id)
    elif isinstance(message, Strike):
        body = _STRIKE.pack(message.client_id, message.epoch)
    elif isinstance(message, Facts):
        body = _encode_facts(message)
    elif isinstance(message, StateQuery):
        body = b""
    elif isinstance(message, StateReport):
        body = _encode_report(message)
    else:
        body = _ACK.pack(message.counter, message.accepted)
    return bytes([_TYPES[type(message)]]) + body


def decode_control(data: bytes) -> ControlMessage:
    if not data:
        raise MalformedMessageError("empty control message")
    kind, body = data[0], data[1:]
    if kind == 6:
        return _decode_facts(body)
    if kind == 8:
        return _decode_report(body)
    sizes = {
        1: _THREAT.size,
        2: _TRIGGER.size,
        3: _REVOKE.size,
        4: _ACK.size,
        5: _STRIKE.size,
        7: 0,
    }
    if kind not in sizes:
        raise MalformedMessageError(f"unknown control message type {kind}")
    if len(body) != sizes[kind]:
        raise MalformedMessageError(
            f"control message type {kind} has {len(body)} bytes, expected {sizes[kind]}"
        )
    if kind == 1:
        m, from_epoch = _THREAT.unpack(body)
        try:
            check_m(m)
        except RoamError as error:
            raise MalformedMessageError(f"threat: {error}") from None
        if from_epoch < 2:
            raise MalformedMessageError("threat change must start at epoch 2 or later")
        return Threat(m, from_epoch)
    if kind == 2:
        leave, following, at_us = _TRIGGER.unpack(body)
        if leave < 1 or following <= leave:
            raise MalformedMessageError(
                f"trigger from epoch {leave} to {following}: the next epoch must be later"
            )
        return Trigger(leave, following, at_us / 1e6)
    if kind == 3:
        (client_id,) = _REVOKE.unpack(body)
        if client_id == 0:
            raise MalformedMessageError("revoke names client id 0")
        return Revoke(client_id)
    if kind == 7:
        return StateQuery()
    if kind == 5:
        client_id, epoch = _STRIKE.unpack(body)
        if client_id == 0 or epoch == 0:
            raise MalformedMessageError("strike names client id 0 or epoch 0")
        return Strike(client_id, epoch)
    counter, accepted = _ACK.unpack(body)
    if body[-1] not in (0, 1):
        raise MalformedMessageError("ack flag must be 0 or 1")
    return Ack(counter, accepted)


def control_context(deployment_id: bytes) -> bytes:
    return b"control" + deployment_id


class ControlChannel:
    """Seals and opens control messages for one member of the pool (or the operator)."""

    def __init__(
        self,
        group_key: bytes,
        deployment_id: bytes,
        sender: int,
        freshness: Freshness | None = None,
    ) -> None:
        key = derive_key(group_key, Purpose.GROUP_CONTROL)
        context = control_context(deployment_id)
        self.sealer = Sealer(key, sender, context)
        self.opener = Opener(
            key,
            context,
            kinds=frozenset({Kind.GROUP_CONTROL}),
            freshness=freshness or Freshness(max_age=10.0, max_skew=2.0),
        )

    def seal(self, message: ControlMessage, now: float) -> bytes:
        return self.sealer.seal(Kind.GROUP_CONTROL, encode_control(message), now)

    def open(self, data: bytes, now: float) -> tuple[Opened, ControlMessage]:
        """Verify and parse; the caller validates the content, then calls ``accept``."""
        opened = self.opener.open(data, now)
        return opened, decode_control(opened.plaintext)

    def accept(self, opened: Opened) -> None:
        self.opener.accept(opened)
