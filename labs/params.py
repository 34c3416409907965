"""Link parameters: one validated dataclass, units in the field names.

A ``LinkParams`` describes one direction of a link (what the sending interface does to its
egress traffic); ``Topo.add_link`` applies the same parameters to both directions unless a
``reverse`` is given. Every value is checked when the object is made, so a bad parameter fails
in the topology's ``build()``, before the lab creates any namespace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from migrate.errors import ConfigError

MAX_RATE_MBIT = 100_000.0  # 100 Gbit/s: above anything a veth pair can carry
MAX_BURST_KB = 100_000.0
MAX_DELAY_MS = 60_000.0
MAX_QUEUE_PACKETS = 1_000_000
LOSS_RESOLUTION_PCT = 0.01  # the nftables rule draws from 10000 buckets


def _check_number(name: str, value: object, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    # bool is an int subclass; True as a rate is a bug, not 1 Mbit/s
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"invalid link parameters: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"invalid link parameters: {name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LinkParams:
    """How one direction of a link behaves.

    * ``rate_mbit``: egress rate (tc htb), ``None`` for unshaped.
    * ``burst_kb``: htb burst in kilobytes (1000 bytes); default about 10 ms at the rate.
    * ``delay_ms``: one-way delay; needs the netem qdisc, which this kernel may lack (the lab
      then refuses with a ``ConfigError``).
    * ``loss_pct``: random loss in percent (nftables ``numgen random``), resolution 0.01.
    * ``queue_packets``: length of the queue behind the rate limit or delay, in packets.
    * ``disable_offloads``: turn TSO/GSO/GRO off on both ends; ``None`` means "off when the
      link shapes traffic", because a 64 KB GSO super-packet defeats rate limits and loss.
    """

    rate_mbit: float | None = None
    burst_kb: float | None = None
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    queue_packets: int | None = None
    disable_offloads: bool | None = None

    def __post_init__(self) -> None:
        rate = _check_number("rate_mbit", self.rate_mbit, allow_none=True)
        if rate is not None and not 0 < rate <= MAX_RATE_MBIT:
            raise ConfigError(
                f"invalid link parameters: rate_mbit must be in (0, {MAX_RATE_MBIT:g}], "
                f"got {self.rate_mbit!r}"
            )
        burst = _check_number("burst_kb", self.burst_kb, allow_none=True)
        if burst is not None:
            if rate is None:
                raise ConfigError("invalid link parameters: burst_kb needs rate_mbit")
            if not 0 < burst <= MAX_BURST_KB:
                raise ConfigError(
                    f"invalid link parameters: burst_kb must be in (0, {MAX_BURST_KB:g}], "
                    f"got {self.burst_kb!r}"
                )
        delay = _check_number("delay_ms", self.delay_ms, allow_none=False)
        if delay is not None and not 0 <= delay <= MAX_DELAY_MS:
            raise ConfigError(
                f"invalid link parameters: delay_ms must be in [0, {MAX_DELAY_MS:g}], "
                f"got {self.delay_ms!r}"
            )
        loss = _check_number("loss_pct", self.loss_pct, allow_none=False)
        if loss is not None:
            if not 0 <= loss <= 100:
                raise ConfigError(
                    f"invalid link parameters: loss_pct must be in [0, 100], got {self.loss_pct!r}"
                )
            steps = loss / LOSS_RESOLUTION_PCT
            if abs(steps - round(steps)) > 1e-6:
                raise ConfigError(
                    f"invalid link parameters: loss_pct must be a multiple of "
                    f"{LOSS_RESOLUTION_PCT}, got {self.loss_pct!r}"
                )
        queue = self.queue_packets
        if queue is not None:
            if isinstance(queue, bool) or not isinstance(queue, int):
                raise ConfigError(
                    f"invalid link parameters: queue_packets must be an integer, got {queue!r}"
                )
            if not 1 <= queue <= MAX_QUEUE_PACKETS:
                raise ConfigError(
                    f"invalid link parameters: queue_packets must be in [1, {MAX_QUEUE_PACKETS}], "
                    f"got {queue!r}"
                )
            if rate is None and not delay:
                raise ConfigError(
                    "invalid link parameters: queue_packets needs rate_mbit or delay_ms "
                    "(there is no queue to size otherwise)"
                )
        if self.disable_offloads is not None and not isinstance(self.disable_offloads, bool):
            raise ConfigError(
                f"invalid link parameters: disable_offloads must be a bool or None, "
                f"got {self.disable_offloads!r}"
            )

    @property
    def shapes_traffic(self) -> bool:
        """Whether this direction changes traffic at all (rate, delay or loss)."""
        return self.rate_mbit is not None or self.delay_ms > 0 or self.loss_pct > 0

    @property
    def offloads_off(self) -> bool:
        """Whether TSO/GSO/GRO must be off on this link's interfaces."""
        if self.disable_offloads is not None:
            return self.disable_offloads
        return self.shapes_traffic

    @property
    def burst_bytes(self) -> int | None:
        """The htb burst in bytes (explicit, or about 10 ms at the rate, at least 2 frames)."""
        if self.rate_mbit is None:
            return None
        if self.burst_kb is not None:
            return max(1, round(self.burst_kb * 1000))
        ten_ms_bytes = self.rate_mbit * 1_000_000 / 8 * 0.010
        return max(2 * 1514, round(ten_ms_bytes))

    @property
    def loss_per_10000(self) -> int:
        """The loss as the bound of ``numgen random mod 10000 < N``."""
        return round(self.loss_pct / LOSS_RESOLUTION_PCT)


UNSHAPED = LinkParams()
