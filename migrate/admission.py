"""Per-client metering of the migration port: what one subscribed client may cost a server.

Theory of operation: a re-incarnation request is authentic (the client's key) but the client
may be an insider turned hostile. Each PREPARE makes the server hold a service connection,
replay bytes the gate never counted, and drain service output up to a position the client
chooses; so everything a client can make a server do there is accounted per client here, and
refused (with a reason for the log) beyond its bounds:

* pending preparations (each holds a service socket until GO or expiry): at most
  ``max_pending`` per client;
* preparations running at once: at most ``PREPARING_PER_CLIENT`` of the server's
  ``PREPARE_CONCURRENCY`` slots (enforced by the caller with this number), so that one client
  never holds every slot and another client's hand-over always has slots of its own;
* replay bytes (client-to-service bytes entering past the gate): a token bucket refilled at
  the client's rate contract when it has one, at ``REPLAY_RATE`` otherwise;
* regeneration bytes (service output read and dropped up to the client's claimed position):
  a token bucket, charged at admission for the whole claim and again for every extension;
* service time (seconds a preparation holds a slot): a token bucket charged when each
  preparation ends; a client in debt is refused until it has paid it back.

Token buckets refill in constant time for any gap (a client silent for years costs one
subtraction) and ignore a clock stepping back (no refill, no debt). Memory is bounded by the
registered clients (only authenticated requests reach this meter) and, per client, by
``max_pending``. Pure: time comes in as ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migrate.errors import RemoteError

# A client with more live connections has the excess reset at each roam. The default fits a
# client moving a thousand connections in one roam (tests/system/test_load.py); an operator
# whose clients hold few connections lowers it (roam server --max-pending-per-client).
MAX_PENDING_PER_CLIENT = 1024
# Of the server's 8 slots (proxy.work.PREPARE_CONCURRENCY): a lone client still prepares
# almost at full speed, and 2 slots are always left to the other clients.
PREPARING_PER_CLIENT = 6
REPLAY_BURST_BYTES = 16 * 1024 * 1024
REPLAY_RATE = 2 * 1024 * 1024  # bytes/s, for a client without a rate contract
REGENERATE_BURST_BYTES = 1024 * 1024 * 1024  # a hand-over of a 1 GiB response from its start
REGENERATE_RATE = 64 * 1024 * 1024  # bytes/s
SERVICE_BURST_S = 600.0  # slot-seconds: a thousand preparations of 0.6 s in one roam
SERVICE_RATE = 4.0  # slot-seconds per second: on average 4 of a client's 6 slots


class OverBudgetError(RemoteError):
    """A client asked the migration port for more than its share."""


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    rate: float
    level: float
    stamp: float

    @classmethod
    def full(cls, capacity: float, rate: float, now: float) -> TokenBucket:
        return cls(capacity, rate, capacity, now)

    def refill(self, now: float) -> None:
        """Constant work for any gap; a clock stepping back refills nothing."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.level = min(self.capacity, self.level + elapsed * self.rate)
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` if the bucket holds it; otherwise take nothing."""
        self.refill(now)
        if amount > self.level:
            return False
        self.level -= amount
        return True

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` after the fact (what was used), going into debt if need be."""
        self.refill(now)
        self.level -= amount


@dataclass(slots=True)
class ClientMeter:
    replay: TokenBucket
    regenerate: TokenBucket
    service: TokenBucket
    pending: set[tuple[str, int]] = field(default_factory=set)


class MigrationMeter:
    """What each client holds and may still ask of this server's migration port."""

    def __init__(
        self, max_pending: int = MAX_PENDING_PER_CLIENT, replay_burst: int = REPLAY_BURST_BYTES
    ) -> None:
        if max_pending < 1:
            raise ValueError("at least one pending preparation per client")
        self.max_pending = max_pending
        # At least one connection's whole replay (--max-replay) fits a full bucket.
        self.replay_burst = max(REPLAY_BURST_BYTES, replay_burst)
        self.clients: dict[int, ClientMeter] = {}
        self.owners: dict[tuple[str, int], int] = {}  # pending key -> its client

    def _meter(self, client_id: int, rate_kbit: int, now: float) -> ClientMeter:
        meter = self.clients.get(client_id)
        replay_rate = rate_kbit * 1000 / 8 if rate_kbit > 0 else REPLAY_RATE
        if meter is None:
            meter = ClientMeter(
                TokenBucket.full(self.replay_burst, replay_rate, now),
                TokenBucket.full(REGENERATE_BURST_BYTES, REGENERATE_RATE, now),
                TokenBucket.full(SERVICE_BURST_S, SERVICE_RATE, now),
            )
            self.clients[client_id] = meter
        meter.replay.rate = replay_rate  # a contract may change with the client list
        return meter

    def pending_of(self, client_id: int) -> int:
        meter = self.clients.get(client_id)
        return 0 if meter is None else len(meter.pending)

    def owner(self, key: tuple[str, int]) -> int | None:
        """The client whose PREPARE holds ``key``, if any."""
        return self.owners.get(key)

    def admit(
        self,
        client_id: int,
        key: tuple[str, int],
        *,
        replay_bytes: int,
        regenerate_bytes: int,
        rate_kbit: int,
        now: float,
    ) -> None:
        """Account a new preparation under ``key``; raises ``OverBudgetError`` and changes
        nothing if the client is over any bound. A key held by another client is refused
        (the caller replaces a key only for its own client)."""
        owner = self.owners.get(key)
        if owner is not None and owner != client_id:
            raise OverBudgetError(
                f"connection {key[0]}:{key[1]} is being prepared for another client"
            )
        meter = self._meter(client_id, rate_kbit, now)
        if key not in meter.pending and len(meter.pending) >= self.max_pending:
            raise OverBudgetError(
                f"client {client_id} already holds {len(meter.pending)} pending preparations "
                f"(the cap is {self.max_pending})"
            )
        meter.service.refill(now)
        if meter.service.level < 0:
            raise OverBudgetError(
                f"client {client_id} has used its service time "
                f"({-meter.service.level:.1f} slot-seconds in debt)"
            )
        meter.replay.refill(now)
        meter.regenerate.refill(now)
        if replay_bytes > meter.replay.level:
            raise OverBudgetError(
                f"client {client_id} is over its replay budget ({replay_bytes} bytes asked, "
                f"{int(meter.replay.level)} left)"
            )
        if regenerate_bytes > meter.regenerate.level:
            raise OverBudgetError(
                f"client {client_id} is over its regeneration budget ({regenerate_bytes} bytes "
                f"asked, {int(meter.regenerate.level)} left)"
            )
        meter.replay.take(replay_bytes, now)
        meter.regenerate.take(regenerate_bytes, now)
        meter.pending.add(key)
        self.owners[key] = client_id

    def extend(
        self, client_id: int, *, replay_bytes: int, regenerate_bytes: int, now: float
    ) -> None:
        """More work for a preparation already admitted (a refresh, a COMMIT)."""
        meter = self.clients.get(client_id)
        if meter is None:
            raise OverBudgetError(f"client {client_id} has no pending preparation")
        meter.replay.refill(now)
        meter.regenerate.refill(now)
        if replay_bytes > meter.replay.level or regenerate_bytes > meter.regenerate.level:
            raise OverBudgetError(
                f"client {client_id} is over its replay or regeneration budget "
                f"({replay_bytes} replay, {regenerate_bytes} regenerated bytes asked)"
            )
        meter.replay.take(replay_bytes, now)
        meter.regenerate.take(regenerate_bytes, now)

    def used_service(self, client_id: int, seconds: float, now: float) -> None:
        """A preparation of the client held a slot for ``seconds``."""
        meter = self.clients.get(client_id)
        if meter is not None:
            meter.service.charge(max(0.0, seconds), now)

    def release(self, key: tuple[str, int]) -> None:
        """The preparation under ``key`` is over (live, failed, aborted or expired)."""
        client_id = self.owners.pop(key, None)
        if client_id is not None:
            meter = self.clients.get(client_id)
            if meter is not None:
                meter.pending.discard(key)
