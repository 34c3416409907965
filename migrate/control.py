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

Plaintext: ``type u8`` then ``Threat: m u8 | from_epoch u64``; ``Trigger: leave u64 | next
u64 | at i64 microseconds``; ``Revoke: client_id u32``; ``Ack: counter u64 | accepted u8``;
``Strike: client_id u32 | epoch u64``.
Sealed on the group channel (``Purpose.GROUP_CONTROL``, kind ``GROUP_CONTROL``) with context
``"control" || deployment id``; the operator's sender id is ``OPERATOR``, servers use their
index.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from migrate.channel import Freshness, Kind, Opened, Opener, Purpose, Sealer, derive_key
from migrate.errors import MalformedMessageError, RoamError
from migrate.schedule import check_m

OPERATOR = 0xFFFF_FFFF
_THREAT = struct.Struct("!BQ")
_TRIGGER = struct.Struct("!QQq")
_REVOKE = struct.Struct("!I")
_ACK = struct.Struct("!Q?")
_STRIKE = struct.Struct("!IQ")


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


ControlMessage = Threat | Trigger | Revoke | Ack | Strike
_TYPES: dict[type, int] = {Threat: 1, Trigger: 2, Revoke: 3, Ack: 4, Strike: 5}


def encode_control(message: ControlMessage) -> bytes:
    if isinstance(message, Threat):
        body = _THREAT.pack(message.m, message.from_epoch)
    elif isinstance(message, Trigger):
        body = _TRIGGER.pack(message.leave_epoch, message.next_epoch, round(message.at * 1e6))
    elif isinstance(message, Revoke):
        body = _REVOKE.pack(message.client_id)
    elif isinstance(message, Strike):
        body = _STRIKE.pack(message.client_id, message.epoch)
    else:
        body = _ACK.pack(message.counter, message.accepted)
    return bytes([_TYPES[type(message)]]) + body


def decode_control(data: bytes) -> ControlMessage:
    if not data:
        raise MalformedMessageError("empty control message")
    kind, body = data[0], data[1:]
    sizes = {1: _THREAT.size, 2: _TRIGGER.size, 3: _REVOKE.size, 4: _ACK.size, 5: _STRIKE.size}
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
