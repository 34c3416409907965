"""Roaming update messages (paper section IV-A) and the client state they drive.

Theory of operation: the server pool sends *periodic* updates (not one per roam: that would
reveal roaming times and give an attacker one message to block) to each subscribed client's
roaming port, sealed on the client's secure channel (``channel.Purpose.UPDATE_S2C``). An update
carries one or more items:

* ``MChange(m, from_epoch)``: epochs ``>= from_epoch`` use ``m`` (threat level).
* ``EpochSync(r, j, N_j)``: the service is in epoch ``r`` and epoch ``j <= t`` starts ``N_j``
  seconds after the message was sent. The client anchors its schedule on it: from the local
  receive time ``T_u``, ``T_j = T_u + N_j`` and ``T_{v-1} = T_v - R_{v-1}`` down to ``r``.
* ``KeyExtension(t', K_t')``: a later key of the chain, accepted only if hashing it down
  reaches the key already held (so only the chain's owner can extend a subscription).

Plaintext layout (big-endian)::

    item count u8, then per item: type u8 | length u16 | value
      type 1 MChange       m u8 | from_epoch u64                      (9 bytes)
      type 2 EpochSync     r u64 | j u64 | N_j i64 microseconds        (24 bytes)
      type 3 KeyExtension  t u64 | K_t 32 bytes                        (40 bytes)

The parser is strict: exact lengths, no unknown types, no trailing bytes, at most one sync and
one extension, at most ``MAX_M_CHANGES`` m changes. ``ClientRoamingState.receive`` validates a
whole message against a copy of the state before changing anything: a forged, truncated,
replayed, reordered, stale or inconsistent update raises a typed error and changes nothing.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from migrate.channel import Freshness, Kind, Opened, Opener, Purpose, Sealer, derive_key
from migrate.errors import (
    InconsistentUpdateError,
    InvalidKeyExtensionError,
    MalformedMessageError,
    RevokedClientError,
    RoamError,
    ScheduleError,
    StaleMessageError,
    SubscriptionExpiredError,
)
from migrate.hashchain import chain_step, hash_down
from migrate.registration import ClientRecord
from migrate.schedule import Anchor, EpochSchedule, MSchedule, check_m, epoch_units

MAX_M_CHANGES = 8
MAX_SYNC_SPAN = 4096  # |j - r|: bounds the hashing a sync can cost the client
CORRECTION_SPAN = 256  # epochs from the last prediction within which a correction is logged
_ITEM = struct.Struct("!BH")
_MCHANGE = struct.Struct("!BQ")
_SYNC = struct.Struct("!QQq")
_EXTENSION = struct.Struct("!Q32s")


@dataclass(frozen=True, slots=True)
class MChange:
    m: int
    from_epoch: int


@dataclass(frozen=True, slots=True)
class EpochSync:
    current: int  # r
    target: int  # j
    until_target: float  # N_j, seconds from sending to the start of epoch j


@dataclass(frozen=True, slots=True)
class KeyExtension:
    index: int  # t
    key: bytes  # K_t


@dataclass(frozen=True, slots=True)
class RoamingUpdate:
    m_changes: tuple[MChange, ...] = ()
    sync: EpochSync | None = None
    extension: KeyExtension | None = None

    def __post_init__(self) -> None:
        if not self.m_changes and self.sync is None and self.extension is None:
            raise MalformedMessageError("a roaming update carries at least one item")
        if len(self.m_changes) > MAX_M_CHANGES:
            raise MalformedMessageError(f"more than {MAX_M_CHANGES} m changes in one update")


def encode_update(update: RoamingUpdate) -> bytes:
    items: list[tuple[int, bytes]] = [
        (1, _MCHANGE.pack(change.m, change.from_epoch)) for change in update.m_changes
    ]
    if update.sync is not None:
        sync = update.sync
        micros = round(sync.until_target * 1_000_000)
        items.append((2, _SYNC.pack(sync.current, sync.target, micros)))
    if update.extension is not None:
        items.append((3, _EXTENSION.pack(update.extension.index, update.extension.key)))
    out = bytearray([len(items)])
    for item_type, value in items:
        out += _ITEM.pack(item_type, len(value)) + value
    return bytes(out)


_SIZES = {1: _MCHANGE.size, 2: _SYNC.size, 3: _EXTENSION.size}


def decode_update(data: bytes) -> RoamingUpdate:
    """Strict parser of an update's plaintext."""
    if not data:
        raise MalformedMessageError("empty roaming update")
    count = data[0]
    if count == 0:
        raise MalformedMessageError("a roaming update carries at least one item")
    offset = 1
    changes: list[MChange] = []
    sync: EpochSync | None = None
    extension: KeyExtension | None = None
    for number in range(count):
        if offset + _ITEM.size > len(data):
            raise MalformedMessageError(f"roaming update truncated in item {number + 1} header")
        item_type, length = _ITEM.unpack_from(data, offset)
        offset += _ITEM.size
        expected = _SIZES.get(item_type)
        if expected is None:
            raise MalformedMessageError(f"unknown roaming update item type {item_type}")
        if length != expected:
            raise MalformedMessageError(
                f"roaming update item type {item_type} has length {length}, expected {expected}"
            )
        if offset + length > len(data):
            raise MalformedMessageError(f"roaming update truncated in item {number + 1}")
        if item_type == 1:
            m, from_epoch = _MCHANGE.unpack_from(data, offset)
            try:
                check_m(m)
            except RoamError as error:
                raise MalformedMessageError(f"m change: {error}") from None
            if from_epoch < 2:
                raise MalformedMessageError(f"m change from epoch {from_epoch} (must be >= 2)")
            changes.append(MChange(m, from_epoch))
        elif item_type == 2:
            if sync is not None:
                raise MalformedMessageError("two epoch syncs in one roaming update")
            current, target, micros = _SYNC.unpack_from(data, offset)
            if current < 1 or target < 1:
                raise MalformedMessageError("epoch sync names epoch 0")
            sync = EpochSync(current, target, micros / 1_000_000)
        else:
            if extension is not None:
                raise MalformedMessageError("two key extensions in one roaming update")
            index, key = _EXTENSION.unpack_from(data, offset)
            if index < 1:
                raise MalformedMessageError("key extension names epoch 0")
            extension = KeyExtension(index, key)
        offset += length
    if offset != len(data):
        raise MalformedMessageError(f"{len(data) - offset} trailing bytes after roaming update")
    return RoamingUpdate(tuple(changes), sync, extension)


def update_context(deployment_id: bytes, client_id: int) -> bytes:
    """Associated data binding an update to its deployment and its client."""
    return b"update" + deployment_id + struct.pack("!I", client_id)


def update_sealer(channel_key: bytes, deployment_id: bytes, client_id: int, sender: int) -> Sealer:
    key = derive_key(channel_key, Purpose.UPDATE_S2C)
    return Sealer(key, sender, update_context(deployment_id, client_id))


def seal_update(sealer: Sealer, update: RoamingUpdate, now: float) -> bytes:
    return sealer.seal(Kind.ROAMING_UPDATE, encode_update(update), now)


OFFSET_SAMPLES = 8
RELEARN_AFTER = 3  # authentic new updates agreeing on a stepped clock before it is adopted


@dataclass(frozen=True, slots=True)
class UpdateOutcome:
    """What an accepted update changed, for logs."""

    sender: int
    counter: int
    key_extended_to: int | None
    m_schedule_changed: bool
    anchor: Anchor | None
    correction: float | None  # new start of epoch r minus the previous prediction, seconds
    clock_offset: float  # servers' clock minus ours, as now estimated
    sent_at: float  # when the server sealed it, by the server's clock


class ClientRoamingState:
    """A client's view of the schedule, kept current by roaming updates.

    Clocks: the client's clock need not agree with the servers'. Each accepted update gives a
    sample ``sent_at - received_at`` = (servers' clock - ours) - network delay. The estimate of
    the offset is the largest of the last ``OFFSET_SAMPLES`` samples: an attacker can delay a
    message but never deliver it early, so delays only lower a sample and the maximum filters
    them out. Epoch syncs are anchored at the message's send time in our clock (``sent_at -
    offset``), which is the paper's ``T_u + N_j`` without the delay. Freshness is judged in the
    servers' clock: within ``initial_skew`` before the first update, ``freshness`` after.
    """

    def __init__(
        self,
        schedule: EpochSchedule,
        channel_key: bytes,
        deployment_id: bytes,
        client_id: int,
        chain_length: int,
        freshness: Freshness | None = None,
        initial_skew: float = 300.0,
        sync_tolerance: float = 1.0,
    ) -> None:
        self.schedule = schedule
        self.chain_length = chain_length
        self.sync_tolerance = sync_tolerance
        self.freshness = freshness or Freshness(max_age=5.0, max_skew=1.0)
        self.initial_freshness = Freshness(self.freshness.max_age, initial_skew)
        self.offset_samples: deque[float] = deque(maxlen=OFFSET_SAMPLES)
        # (sender, counter, sample) of authentic new updates that were stale by the estimate.
        self.stepped: deque[tuple[int, int, float]] = deque(maxlen=RELEARN_AFTER)
        self.opener = Opener(
            derive_key(channel_key, Purpose.UPDATE_S2C),
            update_context(deployment_id, client_id),
            kinds=frozenset({Kind.ROAMING_UPDATE}),
            freshness=self.freshness,
            strict_order=True,
        )

    @property
    def clock_offset(self) -> float | None:
        """Servers' clock minus ours (seconds), or None before the first update."""
        return max(self.offset_samples) if self.offset_samples else None

    def receive(self, message: bytes, now: float) -> UpdateOutcome:
        """Verify and apply one sealed update received at local time ``now``."""
        estimate = self.clock_offset
        relearn = False
        if estimate is None:
            opened = self.opener.open(message, now, self.initial_freshness)
        else:
            try:
                opened = self.opener.open(message, now + estimate)
            except StaleMessageError:
                opened = self._after_clock_step(message, now)
                estimate, relearn = None, True
        sample = opened.header.sent_at - now
        offset = sample if estimate is None else max(estimate, sample)
        sent_locally = opened.header.sent_at - offset
        update = decode_update(opened.plaintext)
        chain = self.schedule.chain

        # 1. Key extension: checked against the chain, not yet applied.
        held_index, extension = chain.held_index, update.extension
        if extension is not None:
            if extension.index > self.chain_length:
                raise InvalidKeyExtensionError(
                    f"key extension to epoch {extension.index} is past the chain length "
                    f"{self.chain_length}"
                )
            if extension.index > held_index:
                if hash_down(extension.key, extension.index - held_index) != chain.held_key:
                    raise InvalidKeyExtensionError(
                        f"key for epoch {extension.index} does not hash down to the key held "
                        f"for epoch {held_index}"
                    )
            elif chain.key(extension.index) != extension.key:
                raise InvalidKeyExtensionError(
                    f"key for epoch {extension.index} does not match the chain already held"
                )
        new_index = max(held_index, extension.index if extension else 0)

        # 2. m changes, applied in order to a copy.
        m_schedule = self.schedule.params.m
        for change in update.m_changes:
            try:
                m_schedule = m_schedule.merged(change.m, change.from_epoch)
            except ScheduleError as error:
                raise InconsistentUpdateError(str(error)) from None

        # 3. Epoch sync: compute the new anchor with the new keys and m, still on copies.
        anchor: Anchor | None = None
        if update.sync is not None:
            anchor = self._sync_anchor(
                update.sync, sent_locally, now, new_index, extension, m_schedule
            )

        # Everything checked: commit.
        self.opener.accept(opened)
        self.stepped.clear()
        if relearn:
            self.offset_samples.clear()
        self.offset_samples.append(sample)
        extended_to = None
        if extension is not None and extension.index > held_index:
            chain.extend(extension.key, extension.index, self.chain_length)
            extended_to = extension.index
        m_changed = m_schedule != self.schedule.params.m
        correction = None
        # The correction is for the log only: after a long silence the old prediction is
        # epochs away, and walking there would cost work in proportion to the silence.
        if anchor is not None and abs(anchor.epoch - self.schedule.cursor_epoch) <= CORRECTION_SPAN:
            try:
                correction = anchor.time - self.schedule.start_of(anchor.epoch)
            except RoamError:
                correction = None
        self.schedule.set_m_schedule(m_schedule)
        if anchor is not None:
            self.schedule.reanchor(anchor)
        return UpdateOutcome(
            opened.header.sender,
            opened.header.counter,
            extended_to,
            m_changed,
            anchor,
            correction,
            offset,
            opened.header.sent_at,
        )

    def _after_clock_step(self, message: bytes, now: float) -> Opened:
        """An update that is stale by the offset estimate: the estimate may be what is wrong.

        A clock stepped on either side (NTP, an operator) moves every later sample by the
        step, and a message judged by the old estimate is then stale for ever: the client
        would refuse every update until restarted. So an authentic update that is new (above
        the replay window) and fresh by the rules of a first update (``initial_skew`` around
        our own clock) is noted; once ``RELEARN_AFTER`` distinct such updates agree on a new
        offset, the estimate is dropped and re-learnt from this one, as at start. A replayed
        or repeated message never counts (its counter is not new, or is already noted), and an
        attacker who delays every update consistently gains what dropping them would give.
        Raises ``StaleMessageError`` (or why the message is refused) otherwise.
        """
        estimate = self.clock_offset
        assert estimate is not None
        opened = self.opener.open(message, now, self.initial_freshness)
        header = opened.header
        sample = header.sent_at - now
        limit = self.freshness.max_age + self.freshness.max_skew
        if (header.sender, header.counter) not in {(s, c) for s, c, _ in self.stepped}:
            self.stepped.append((header.sender, header.counter, sample))
        samples = [noted for _, _, noted in self.stepped]
        if len(samples) < RELEARN_AFTER or max(samples) - min(samples) > limit:
            raise StaleMessageError(
                f"update is {estimate - sample:+.3f} s off the clock offset estimate "
                f"({len(samples)} of {RELEARN_AFTER} needed to adopt a stepped clock)"
            )
        return opened

    def _key(self, index: int, extension: KeyExtension | None) -> bytes:
        chain = self.schedule.chain
        if index <= chain.held_index:
            return chain.key(index)
        assert extension is not None
        assert index <= extension.index
        return hash_down(extension.key, extension.index - index)

    def _sync_anchor(
        self,
        sync: EpochSync,
        sent_locally: float,
        now: float,
        held_index: int,
        extension: KeyExtension | None,
        m_schedule: MSchedule,
    ) -> Anchor:
        r, j = sync.current, sync.target
        if j > held_index:
            raise InconsistentUpdateError(
                f"epoch sync refers to epoch {j}, after the last key held ({held_index})"
            )
        if r > held_index:
            raise SubscriptionExpiredError(
                f"the service is in epoch {r}, after the last key held ({held_index})"
            )
        if abs(j - r) > MAX_SYNC_SPAN:
            raise InconsistentUpdateError(
                f"epoch sync spans {abs(j - r)} epochs (limit {MAX_SYNC_SPAN})"
            )
        tick = self.schedule.params.tick
        units = 0  # U_r - U_j
        if j > r:
            key = self._key(j, extension)
            for v in range(j - 1, r - 1, -1):
                key = chain_step(key)
                units -= epoch_units(key, m_schedule.m_for(v))
            r_key = key
        else:
            key = self._key(r, extension)
            r_key = key
            for v in range(r - 1, j - 1, -1):
                key = chain_step(key)
                units += epoch_units(key, m_schedule.m_for(v))
        start_r = sent_locally + sync.until_target + units * tick
        end_r = start_r + epoch_units(r_key, m_schedule.m_for(r)) * tick
        tolerance = self.sync_tolerance
        if not start_r - tolerance <= now < end_r + tolerance:
            raise InconsistentUpdateError(
                f"epoch sync says epoch {r} runs from {start_r:.3f} to {end_r:.3f}, "
                f"which does not contain the receive time {now:.3f}"
            )
        return Anchor(r, start_r)


def compose_update(
    schedule: EpochSchedule, now: float, record: ClientRecord, chain_length: int
) -> RoamingUpdate:
    """The periodic update the server pool sends ``record`` at ``now`` (server side).

    It carries the epoch sync, every m change the client needs for the epochs it may still
    compute (the one in force now, as a correction for a client that missed it, and any
    announced for later), and a key extension when the client's policy grants one. A revoked
    client gets nothing; a client whose keys ended before the current epoch cannot be synced.
    """
    if record.revoked:
        raise RevokedClientError(f"client {record.name!r} is revoked: no roaming updates")
    current = schedule.epoch_at(now).index
    held = record.grant_for(current, chain_length)
    if current > held:
        raise SubscriptionExpiredError(
            f"client {record.name!r} holds keys up to epoch {held}; the service is in {current}"
        )
    extension = None
    if held > record.until_epoch:
        extension = KeyExtension(held, schedule.chain.key(held))
    target = min(current + 1, held)
    sync = EpochSync(current, target, schedule.start_of(target) - now)
    m = schedule.params.m
    in_force = [(e, v) for e, v in m.changes if e <= current][-1:]
    pending = [(e, v) for e, v in m.changes if e > current]
    changes = tuple(MChange(v, e) for e, v in (in_force + pending)[-MAX_M_CHANGES:])
    return RoamingUpdate(changes, sync, extension)
