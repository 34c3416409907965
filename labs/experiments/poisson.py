"""The shape of the paper's experiment (section V): seeded Poisson arrivals, the scaling of
time, and where each request goes. Pure: no clock, no I/O, randomness passed in.

Every time here is in the paper's seconds, counted from the start of the experiment, which is
the start of the first fixed epoch. ``Scaling`` turns them into seconds of the lab's clock:
every time figure is divided by the scale and every rate multiplied by it, so an experiment at
scale 10 on 20 Mbit/s links has the shape of the paper's on 2 Mbit/s links, ten times faster.

Who a request goes to:

* legitimate requests: to the VIP when the service roams; with ``replication``, to one of the
  two servers, uniformly at random (the paper: "legitimate client load is distributed
  uniformly between the two servers");
* ``diluted`` attack: each attack request to one of the two servers, uniformly at random (a
  random split of a Poisson stream leaves a Poisson stream of half the rate on each);
* ``follow`` attack: to the server that was active ``discovery delay`` seconds earlier. The
  attacker needs that long to find the service after each roam; the start of the experiment
  counts as a roam, so with a delay of one epoch (60 s) it always attacks the wrong server, as
  in the paper.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from migrate.errors import ConfigError

MODES = ("replication", "roaming-reconnect", "roaming-live")
ATTACKS = ("none", "diluted", "follow")
DISCOVERY_DELAYS_S = (0.0, 15.0, 30.0, 45.0, 60.0)
VIP = "vip"  # the target of a legitimate request when the service roams


@dataclass(frozen=True)
class PaperParams:
    """Section V of the paper, in its own (unscaled) units."""

    legit_requests: int = 20
    legit_mean_gap_s: float = 8.0
    attack_mean_gap_s: float = 1.0
    attack_duration_s: float = 300.0
    epoch_s: float = 60.0
    file_bytes: int = 1_000_000  # "1 MBytes, about 4 seconds on an empty network" (2 Mbit/s)
    rate_mbit: float = 2.0
    discovery_delays_s: tuple[float, ...] = DISCOVERY_DELAYS_S


@dataclass(frozen=True)
class Scaling:
    """Paper seconds to lab seconds and back; rates multiply."""

    scale: float

    def __post_init__(self) -> None:
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, int | float)
            or not math.isfinite(self.scale)
            or self.scale <= 0
        ):
            raise ConfigError(f"scale must be a positive number, got {self.scale!r}")

    def to_lab(self, paper_s: float) -> float:
        return paper_s / self.scale

    def to_paper(self, lab_s: float) -> float:
        return lab_s * self.scale

    def rate(self, paper_rate: float) -> float:
        return paper_rate * self.scale


def check_mean(mean_gap_s: float) -> float:
    if not math.isfinite(mean_gap_s) or mean_gap_s <= 0:
        raise ConfigError(f"mean gap must be a positive number of seconds, got {mean_gap_s!r}")
    return mean_gap_s


def poisson_arrivals(
    rng: random.Random,
    mean_gap_s: float,
    *,
    count: int | None = None,
    until_s: float | None = None,
) -> list[float]:
    """Arrival times of a Poisson process that starts at 0: exponential gaps of mean
    ``mean_gap_s``. Either the first ``count`` arrivals, or every arrival before ``until_s``."""
    check_mean(mean_gap_s)
    if (count is None) == (until_s is None):
        raise ConfigError("give either count or until_s")
    arrivals: list[float] = []
    now = 0.0
    if count is not None:
        if count < 0:
            raise ConfigError(f"count must not be negative, got {count}")
        for _ in range(count):
            now += rng.expovariate(1.0 / mean_gap_s)
            arrivals.append(now)
        return arrivals
    assert until_s is not None
    if not math.isfinite(until_s) or until_s < 0:
        raise ConfigError(f"until_s must be a finite, non-negative number, got {until_s!r}")
    while True:
        now += rng.expovariate(1.0 / mean_gap_s)
        if now >= until_s:
            return arrivals
        arrivals.append(now)


def stream_rng(seed: int, repeat: int, stream: str) -> random.Random:
    """An independent, reproducible random stream per seed, repeat and purpose. Every mode of
    one repeat sees the same arrivals (common random numbers: differences between modes are
    not drawn from different luck)."""
    return random.Random(f"fig2:{seed}:{repeat}:{stream}")


@dataclass(frozen=True)
class Epoch:
    """One epoch of the experiment's schedule, in paper seconds from the start."""

    start_s: float
    server: str


def server_at(epochs: Sequence[Epoch], t_s: float, servers: Sequence[str]) -> str:
    """The server active at ``t_s``. Before the first epoch: the other server (as though the
    service had roamed to the first epoch's server at the start)."""
    if not epochs:
        raise ConfigError("no epochs")
    starts = [epoch.start_s for epoch in epochs]
    index = bisect.bisect_right(starts, t_s) - 1
    if index >= 0:
        return epochs[index].server
    others = [server for server in servers if server != epochs[0].server]
    return others[0] if others else epochs[0].server


def roam_times(epochs: Sequence[Epoch]) -> list[float]:
    """Starts of the epochs whose server differs from the previous epoch's (the roams)."""
    return [
        later.start_s
        for earlier, later in itertools.pairwise(epochs)
        if later.server != earlier.server
    ]


def follow_target(
    epochs: Sequence[Epoch], t_s: float, delay_s: float, servers: Sequence[str]
) -> str:
    """Where a follow attacker sends a request at ``t_s``: the server active ``delay_s``
    earlier (it learns of each roam ``delay_s`` after it happened)."""
    if not math.isfinite(delay_s) or delay_s < 0:
        raise ConfigError(f"discovery delay must be a non-negative number, got {delay_s!r}")
    return server_at(epochs, t_s - delay_s, servers)


def attack_targets(
    attack: str,
    arrivals: Sequence[float],
    rng: random.Random,
    *,
    servers: Sequence[str],
    epochs: Sequence[Epoch] = (),
    delay_s: float = 0.0,
) -> list[str]:
    """The server each attack request goes to."""
    if attack == "none":
        return []
    if attack == "diluted":
        return [rng.choice(list(servers)) for _ in arrivals]
    if attack == "follow":
        return [follow_target(epochs, t, delay_s, servers) for t in arrivals]
    raise ConfigError(f"unknown attack {attack!r} (one of {', '.join(ATTACKS)})")


def legit_targets(mode: str, count: int, rng: random.Random, servers: Sequence[str]) -> list[str]:
    """The target of each legitimate request: a random server (replication) or the VIP."""
    if mode == "replication":
        return [rng.choice(list(servers)) for _ in range(count)]
    if mode in MODES:
        return [VIP] * count
    raise ConfigError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")


@dataclass(frozen=True)
class Configuration:
    """One point of Figure 2: a mode under an attack (with a discovery delay for ``follow``)."""

    mode: str
    attack: str
    discovery_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r} (one of {', '.join(MODES)})")
        if self.attack not in ATTACKS:
            raise ConfigError(f"unknown attack {self.attack!r} (one of {', '.join(ATTACKS)})")
        if self.attack != "follow" and self.discovery_delay_s != 0:
            raise ConfigError("only the follow attack has a discovery delay")

    @property
    def label(self) -> str:
        if self.attack == "follow":
            return f"{self.mode} / follow {self.discovery_delay_s:g} s"
        return f"{self.mode} / {self.attack}"


def configurations(
    modes: Sequence[str] = MODES,
    delays_s: Sequence[float] = DISCOVERY_DELAYS_S,
    attacks: Sequence[str] = ATTACKS,
) -> list[Configuration]:
    """Every point of the figure. Replication has no active server to follow (both replicas
    serve all the time), so the attack on it is the diluted one; it gets no follow points."""
    result = []
    for mode in modes:
        for attack in attacks:
            if attack == "follow":
                if mode == "replication":
                    continue
                result += [Configuration(mode, attack, float(delay)) for delay in delays_s]
            else:
                result.append(Configuration(mode, attack))
    return result
