"""The roaming schedule of PROTOCOL.md section 1: when each epoch starts and where it runs.

Theory of operation: epoch ``i`` lasts ``R_i = (1 + MSB_{m_i}(H'(K_i))) * tick`` seconds and
runs on ``servers[MSB_64(H''(K_i)) mod N]``. ``m_i`` is the threat-level parameter in force at
epoch ``i`` (``MSchedule``): a change ``(m', l)`` makes every epoch ``>= l`` use ``m'`` and
never touches an earlier epoch.

Start times are kept as whole *units* (multiples of ``tick``) relative to an *anchor*, an epoch
whose start is known in the caller's clock: ``T_i = anchor_time + tick * (U_i - U_anchor)``.
Servers anchor at ``(1, start)``; a client re-anchors whenever an epoch sync arrives (paper
section IV-A), so a skewed client clock still lands on the servers' boundaries. Integer units
keep every party's arithmetic identical however long the schedule runs.

An ``EpochSchedule`` keeps a cursor (the last epoch it was asked about) and walks from there,
forward through the hash chain's pebbles, backward by hashing, so the common question "which
epoch is it now" costs O(1) hashes. It can never answer for an epoch after the held key: that
raises ``SubscriptionExpiredError``.

Walking to "now" from epoch 1 would cost one step per epoch since the start: minutes on a
long chain. When the chain carries a pebble index with *landmarks* (the ticks before each
index epoch, computed once by ``roam init`` for the deployment's m schedule, ``m_tag``), the
schedule first leaps to the last landmark before "now" (``_leap``) and walks at most one index
spacing from there. Landmarks count for nothing once the m schedule has changed (the tag no
longer matches): the walk is then as before.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from migrate.endpoints import Endpoint
from migrate.errors import ConfigError, ScheduleError, SubscriptionExpiredError
from migrate.hashchain import (
    KeyChain,
    PebbleIndex,
    chain_step,
    length_digest,
    msb,
    server_digest,
)

M_MIN = 1
M_MAX = 32
# Consecutive epochs of one server walked to find when its gate closes (``served_until``): a
# request is only taken up to LATE_REQUEST_S after its epoch began, far fewer epochs than this.
MAX_RUN_WALK = 64


def check_m(m: int) -> int:
    if not isinstance(m, int) or isinstance(m, bool) or not M_MIN <= m <= M_MAX:
        raise ConfigError(f"m must be an integer in {M_MIN}..{M_MAX}, got {m!r}")
    return m


@dataclass(frozen=True, slots=True)
class MSchedule:
    """Which ``m`` each epoch uses: ``initial`` from epoch 1, then each change from its epoch."""

    initial: int
    changes: tuple[tuple[int, int], ...] = ()  # sorted (from_epoch, m)

    def __post_init__(self) -> None:
        check_m(self.initial)
        previous = 1
        for from_epoch, m in self.changes:
            check_m(m)
            if from_epoch <= previous:
                raise ConfigError(
                    f"m changes must start after epoch 1 and be sorted: {self.changes}"
                )
            previous = from_epoch

    def m_for(self, epoch: int) -> int:
        m = self.initial
        for from_epoch, changed in self.changes:
            if from_epoch > epoch:
                break
            m = changed
        return m

    def merged(self, m: int, from_epoch: int) -> MSchedule:
        """The schedule after ``(m, from_epoch)``: epochs ``>= from_epoch`` use ``m``.

        Later changes are superseded, because the rule says *every* epoch from ``from_epoch`` on
        uses ``m``. Applying the same sequence of changes gives every party the same result.
        """
        check_m(m)
        if from_epoch < 2:
            raise ScheduleError(f"an m change must start at epoch 2 or later, got {from_epoch}")
        kept = tuple((e, v) for e, v in self.changes if e < from_epoch)
        if self.m_for(from_epoch - 1) == m:
            return MSchedule(self.initial, kept)
        return MSchedule(self.initial, (*kept, (from_epoch, m)))

    def announce(self, m: int, from_epoch: int, current_epoch: int) -> MSchedule:
        """Issue a new threat level (server side): ``from_epoch`` must be in the future."""
        if from_epoch <= current_epoch:
            raise ScheduleError(
                f"an m change must take effect after the current epoch {current_epoch}, "
                f"not at epoch {from_epoch}"
            )
        return self.merged(m, from_epoch)

    def as_mapping(self) -> dict[int, int]:
        return {1: self.initial, **dict(self.changes)}

    @classmethod
    def from_mapping(cls, mapping: Mapping[int, int]) -> MSchedule:
        if 1 not in mapping:
            raise ConfigError("m schedule has no value for epoch 1")
        changes = tuple(sorted((e, m) for e, m in mapping.items() if e != 1))
        return cls(mapping[1], changes)


@dataclass(frozen=True, slots=True)
class ScheduleParams:
    servers: tuple[Endpoint, ...]
    tick: float
    start: float
    m: MSchedule
    delta: float = 0.0
    gamma: float = 0.0

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("the server list is empty")
        if not (math.isfinite(self.tick) and self.tick > 0):
            raise ConfigError(f"tick must be a positive number of seconds, got {self.tick}")
        if not math.isfinite(self.start):
            raise ConfigError(f"start must be a finite Unix time, got {self.start}")
        for name in ("delta", "gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number of seconds, got {value}")


@dataclass(frozen=True, slots=True)
class Epoch:
    index: int
    start: float
    length: float
    server: Endpoint

    @property
    def end(self) -> float:
        return self.start + self.length

    def remaining(self, now: float) -> float:
        return self.end - now


@dataclass(frozen=True, slots=True)
class Window:
    """When the firewall of ``server`` lets the service's traffic in (PROTOCOL.md section 1)."""

    epoch: int
    server: Endpoint
    opens: float
    closes: float

    def contains(self, now: float) -> bool:
        return self.opens <= now < self.closes


@dataclass(frozen=True, slots=True)
class Anchor:
    epoch: int
    time: float


def epoch_units(key: bytes, m: int) -> int:
    """``R_i / tick``."""
    return 1 + msb(length_digest(key), m)


def m_tag(m: MSchedule) -> bytes:
    """Names an m schedule: landmarks computed under it carry this tag."""
    text = ",".join(f"{epoch}:{value}" for epoch, value in sorted(m.as_mapping().items()))
    return hashlib.sha256(b"server-roaming m schedule\x00" + text.encode()).digest()[:16]


def index_units(m: MSchedule) -> Callable[[int, bytes], int]:
    """``units(epoch, K_epoch)`` for ``migrate.hashchain.build_index``'s landmarks."""
    if not m.changes:
        constant = m.initial
        return lambda _epoch, key: epoch_units(key, constant)
    return lambda epoch, key: epoch_units(key, m.m_for(epoch))


def server_index(key: bytes, server_count: int) -> int:
    return msb(server_digest(key), 64) % server_count


@dataclass(slots=True)
class _Cursor:
    epoch: int
    key: bytes
    units: int  # U_epoch - U_anchor
    cache: dict[int, tuple[int, int]] = field(default_factory=dict)


class EpochSchedule:
    """``R_i``, ``S_i`` and ``T_i`` for the epochs the held key reaches."""

    def __init__(self, chain: KeyChain, params: ScheduleParams, anchor: Anchor | None = None):
        self.chain = chain
        self.params = params
        self._anchor = anchor or Anchor(1, params.start)
        self._anchor_units: int | None = None  # ticks before the anchor epoch, once needed
        self._cursor = self._cursor_at_anchor()
        # The last answer of ``epoch_at``: asked many times a second (every connection, every
        # checkpoint round) with ``now`` inside the same epoch. An epoch's facts never change
        # once its key is held (a chain only grows); the anchor and the m schedule, which
        # place it, drop it when they change.
        self._at: Epoch | None = None
        self._m_tag: tuple[MSchedule, bytes] | None = None

    # -- anchor ------------------------------------------------------------------------------

    @property
    def anchor(self) -> Anchor:
        return self._anchor

    def _cursor_at_anchor(self) -> _Cursor:
        epoch = self._anchor.epoch
        return _Cursor(epoch, self.chain.seek(epoch), 0)

    @property
    def cursor_epoch(self) -> int:
        """The epoch last asked about: questions near it are cheap, far from it cost the
        distance."""
        return self._cursor.epoch

    def reanchor(self, anchor: Anchor) -> None:
        """Declare that epoch ``anchor.epoch`` starts at ``anchor.time`` in our clock."""
        self.chain.key(anchor.epoch)  # raises if not held
        self._anchor = anchor
        self._anchor_units = None
        self._cursor = self._cursor_at_anchor()
        self._at = None

    def set_m_schedule(self, m: MSchedule) -> None:
        """Adopt a new m schedule. Lengths of epochs before the anchor are not re-derived."""
        if m != self.params.m:
            self.params = ScheduleParams(
                self.params.servers,
                self.params.tick,
                self.params.start,
                m,
                self.params.delta,
                self.params.gamma,
            )
            # Units after the anchor may change; recompute from the anchor.
            self._anchor_units = None
            self._cursor = self._cursor_at_anchor()
            self._at = None

    # -- per-epoch facts ---------------------------------------------------------------------

    def _facts(self, epoch: int, key: bytes) -> tuple[int, int]:
        cache = self._cursor.cache
        facts = cache.get(epoch)
        if facts is None:
            facts = (
                epoch_units(key, self.params.m.m_for(epoch)),
                server_index(key, len(self.params.servers)),
            )
            if len(cache) >= 256:
                cache.clear()
            cache[epoch] = facts
        return facts

    def _move_to(self, epoch: int) -> _Cursor:
        cursor = self._cursor
        if epoch < 1:
            raise ScheduleError(f"epoch {epoch} does not exist (epochs start at 1)")
        if epoch > self.chain.held_index:
            raise SubscriptionExpiredError(
                f"epoch {epoch} is after the last epoch held ({self.chain.held_index})"
            )
        while cursor.epoch < epoch:
            units, _ = self._facts(cursor.epoch, cursor.key)
            cursor.units += units
            cursor.epoch += 1
            cursor.key = self.chain.seek(cursor.epoch)
        while cursor.epoch > epoch:
            # Backward: K_{i-1} = H(K_i) is one hash; the chain's pebbles stay put.
            cursor.epoch -= 1
            cursor.key = chain_step(cursor.key)
            units, _ = self._facts(cursor.epoch, cursor.key)
            cursor.units -= units
        return cursor

    def key_of(self, epoch: int) -> bytes:
        """``K_epoch`` (for the derived choices of ``migrate.activeset``); moves the cursor."""
        return self._move_to(epoch).key

    def length(self, epoch: int) -> float:
        cursor = self._move_to(epoch)
        return self._facts(epoch, cursor.key)[0] * self.params.tick

    def server_for(self, epoch: int) -> Endpoint:
        cursor = self._move_to(epoch)
        return self.params.servers[self._facts(epoch, cursor.key)[1]]

    def start_of(self, epoch: int) -> float:
        cursor = self._move_to(epoch)
        return self._anchor.time + cursor.units * self.params.tick

    def epoch(self, index: int) -> Epoch:
        cursor = self._move_to(index)
        units, server = self._facts(index, cursor.key)
        start = self._anchor.time + cursor.units * self.params.tick
        return Epoch(index, start, units * self.params.tick, self.params.servers[server])

    def epochs(self, first: int, count: int) -> Iterator[Epoch]:
        for index in range(first, first + count):
            yield self.epoch(index)

    # -- time --------------------------------------------------------------------------------

    def epoch_at(self, now: float) -> Epoch:
        """The epoch running at ``now`` (in the clock the anchor was given in)."""
        at = self._at
        if at is not None and at.start <= now < at.end:
            return at
        if not math.isfinite(now):
            raise ScheduleError(f"time {now} is not a finite number")
        if self._anchor.epoch == 1 and now < self._anchor.time:
            raise ScheduleError(
                f"the schedule starts at {self._anchor.time}, time {now} is before it"
            )
        self._leap(now)
        current = self.epoch(self._cursor.epoch)
        while now >= current.end:
            current = self.epoch(current.index + 1)
        while now < current.start:
            if current.index == 1:
                raise ScheduleError(f"the schedule starts at {current.start}, {now} is before it")
            current = self.epoch(current.index - 1)
        self._at = current
        return current

    def window(self, epoch: int) -> Window:
        """Firewall window of ``S_epoch``: from ``T_i - delta`` to ``T_{i+1} + delta + gamma``."""
        info = self.epoch(epoch)
        return Window(
            epoch,
            info.server,
            info.start - self.params.delta,
            info.end + self.params.delta + self.params.gamma,
        )

    def served_until(self, epoch: int, now: float) -> float:
        """When the gate of ``epoch``'s server closes, counting the epochs right after it that
        the same server also serves (their windows merge: its gate never closes between them).

        Walks forward only while the run's windows have closed by ``now``, and at most
        ``MAX_RUN_WALK`` epochs, so a request for an old epoch costs a bounded amount of work.
        """
        window = self.window(epoch)
        index = epoch
        for _ in range(MAX_RUN_WALK):
            if now < window.closes or index >= self.chain.held_index:
                return window.closes
            following = self.window(index + 1)
            if following.server != window.server:
                return window.closes
            index, window = index + 1, following
        return window.closes

    def open_windows(self, now: float) -> list[Window]:
        """Every window containing ``now``: the current epoch's, and a neighbour's near a boundary.

        Windows of consecutive epochs on the same server are merged into one.
        """
        current = self.epoch_at(now)
        windows: list[Window] = []
        for index in (current.index - 1, current.index, current.index + 1):
            if index < 1 or index > self.chain.held_index:
                continue
            window = self.window(index)
            if window.contains(now):
                windows.append(window)
        return windows

    def is_open(self, server: Endpoint, now: float) -> bool:
        return any(window.server == server for window in self.open_windows(now))

    # -- landmarks ---------------------------------------------------------------------------

    def _landmarks(self) -> PebbleIndex | None:
        index = self.chain.index
        if index is None or not index.units:
            return None
        m = self.params.m
        if self._m_tag is None or self._m_tag[0] != m:
            self._m_tag = (m, m_tag(m))  # a hash of the whole m schedule: once per schedule
        if index.units_tag != self._m_tag[1]:
            return None
        return index

    def _units_before(self, index: PebbleIndex, epoch: int) -> int:
        """Ticks before ``epoch`` begins: from the landmark at or below it, at most one spacing
        of hashes, without moving the chain's cursor."""
        k = -(-(index.top - epoch) // index.spacing)  # smallest k with top - k*spacing <= epoch
        if k > index.count:
            base_epoch, ticks = 1, 0
        else:
            base_epoch, ticks = index.top - k * index.spacing, index.units[k - 1]
        if epoch > base_epoch:
            key = self.chain.key(epoch - 1)
            for below in range(epoch - 1, base_epoch - 1, -1):
                ticks += epoch_units(key, self.params.m.m_for(below))
                key = chain_step(key)
        return ticks

    def _leap(self, now: float) -> None:
        """Move the cursor to the last landmark starting at or before ``now`` if that saves a
        walk: forward past the cursor, or backward when ``now`` is before the cursor."""
        index = self._landmarks()
        if index is None:
            return
        if self._anchor_units is None:
            self._anchor_units = self._units_before(index, self._anchor.epoch)
        base = self._anchor_units
        anchor_time, tick = self._anchor.time, self.params.tick
        # Landmark k starts epoch top - k*spacing; later epochs have smaller k. Find the
        # smallest k (the latest epoch) whose start is at or before now.
        low, high = 1, index.count + 1
        while low < high:
            middle = (low + high) // 2
            if anchor_time + (index.units[middle - 1] - base) * tick <= now:
                high = middle
            else:
                low = middle + 1
        if low > index.count:
            return
        landmark = index.top - low * index.spacing
        cursor = self._cursor
        start = anchor_time + cursor.units * tick
        # Leap only when walking would cost more than the leap (about 5 x spacing hashes): a
        # walk costs about 9 hashes per epoch forward, 2 backward. Normal operation, one epoch
        # at a time, never leaps, even across a landmark.
        forward = landmark - cursor.epoch > index.spacing // 2
        backward = now < start and cursor.epoch - landmark > 3 * index.spacing
        if not (forward or backward):
            return
        # The epoch running at now is in landmark .. landmark + spacing - 1 (or later, at the
        # chain's top). Hash that block down once from the index key above it for its lengths,
        # rather than walking it forward epoch by epoch.
        above = index.at((low - 1) * index.spacing) if low > 1 else self.chain.held_key
        assert above is not None
        lengths = []
        key = chain_step(above)
        for epoch in range(landmark + index.spacing - 1, landmark - 1, -1):
            lengths.append(epoch_units(key, self.params.m.m_for(epoch)))
            key = chain_step(key)
        units = index.units[low - 1] - base
        epoch = landmark
        for length in reversed(lengths[1:]):  # all but the block's last epoch
            if anchor_time + (units + length) * tick > now:
                break
            units += length
            epoch += 1
        self._cursor = _Cursor(epoch, self.chain.seek(epoch), units)
