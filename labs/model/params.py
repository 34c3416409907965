"""The model's parameters, their defaults (the issue's scenario) and their validation.

Every check raises ``ConfigError`` with one line naming the option (as the CLI spells it) and
what was wrong with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from migrate.errors import ConfigError

MAX_M = 16  # 2^16 ticks per epoch at most: beyond that a one-hour horizon has a single epoch


@dataclass(frozen=True)
class ModelParams:
    """One scenario. Rates are per second; times in seconds."""

    servers: int = 100  # N
    clients: int = 10_000
    bots: int = 100_000
    insiders: int = 5  # M: subscribed clients that leak their server to the bots
    active: int = 10  # k: servers active at once (k of N)
    client_rate: float = 0.02  # requests per second per legitimate client
    bot_rate: float = 0.1  # requests per second per bot
    capacity: float = 500.0  # C: requests per second one server serves
    buffer: int = 2000  # K: requests one server holds (queue + in service)
    link_capacity: float = 2000.0  # a server's access link, in request-equivalents per second
    link_buffer: int = 4000  # the access router's queue, in request-equivalents
    link_weight: float = 10.0  # a bot's link flood, request-equivalents per bot request
    m: int = 6  # epochs last 1..2^m ticks
    m_changes: tuple[tuple[float, int], ...] = ((1800.0, 4),)  # (time, new m): threat level
    tick: float = 1.0
    horizon: float = 3600.0
    step: float = 1.0  # the queueing model's time slot
    delays: tuple[float, ...] = (0.0, 5.0, 15.0, 30.0)  # follow attacks' discovery delays
    subset: int = 10  # servers of the diluted-subset attack (the paper's M)
    pause: float = 0.05  # a moved client reaches no server for this long after a roam
    insider_delay: float = 0.0  # the insiders' bots learn the schedule this late
    retry_window: float = 0.0  # bots retry a closed gate this long (their SYNs retransmit)
    insider_flood: str = "server"  # the insiders' bots: "server" or "link" flood
    samples: int = 200_000  # legitimate requests sampled per simulation
    isolation_k: tuple[int, ...] = (2, 5, 10, 20)
    isolation_trials: int = 5
    isolation_epochs: int = 2000  # give up (report "not isolated") after this many epochs
    analysis_epochs: int = 20_000  # epochs drawn per m for the analytic comparison
    guesses: int = 200  # an attacker's guesses per epoch in the analytic comparison
    seed: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data["m_changes"] = [list(change) for change in self.m_changes]
        data["delays"] = list(self.delays)
        data["isolation_k"] = list(self.isolation_k)
        return data


# ``--quick``: one tenth of the clients, bots and capacities (every utilisation stays the
# same), a quarter of an hour, fewer samples: seconds instead of a minute.
QUICK: dict[str, Any] = {
    "clients": 1000,
    "bots": 10_000,
    "capacity": 50.0,
    "buffer": 200,
    "link_capacity": 200.0,
    "link_buffer": 400,
    "horizon": 900.0,
    "m_changes": ((450.0, 4),),
    "samples": 20_000,
    "isolation_trials": 3,
    "analysis_epochs": 4000,
    "guesses": 100,
}


def quick(params: ModelParams | None = None, **overrides: Any) -> ModelParams:
    """The ``--quick`` scale, with ``overrides`` on top."""
    base = replace(params or ModelParams(), **QUICK)
    return validate(with_horizon(base, **overrides))


def with_horizon(params: ModelParams, **overrides: Any) -> ModelParams:
    """``params`` with ``overrides``; a new horizon without new m changes moves the default
    threat-level change along to half the new horizon."""
    if "horizon" in overrides and "m_changes" not in overrides and params.m_changes:
        overrides["m_changes"] = ((overrides["horizon"] / 2, params.m_changes[-1][1]),)
    return replace(params, **overrides)


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(params: ModelParams, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(params, name)
        if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{option(name)} must be greater than 0, got {value!r}")


def _non_negative(params: ModelParams, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(params, name)
        if isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{option(name)} must not be negative, got {value!r}")


def _check_m(value: int, what: str) -> None:
    if isinstance(value, bool) or not 1 <= value <= MAX_M:
        raise ConfigError(f"{what} must be between 1 and {MAX_M}, got {value!r}")


def validate(params: ModelParams) -> ModelParams:
    """``params`` if every value makes sense, else ``ConfigError`` naming the first bad one."""
    _positive(params, ("servers", "clients", "active", "capacity", "buffer", "link_capacity"))
    _positive(params, ("link_buffer", "link_weight", "tick", "horizon", "step", "samples"))
    _positive(params, ("isolation_trials", "isolation_epochs", "analysis_epochs", "guesses"))
    _non_negative(params, ("bots", "insiders", "client_rate", "bot_rate", "subset", "pause"))
    _non_negative(params, ("insider_delay", "retry_window"))
    if params.insider_flood not in ("server", "link"):
        raise ConfigError(f"--insider-flood must be server or link, got {params.insider_flood!r}")
    for name in (f.name for f in fields(params)):
        value = getattr(params, name)
        integral = {"servers", "clients", "bots", "insiders", "active", "buffer", "link_buffer"}
        if name in integral and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{option(name)} must be an integer, got {value!r}")
    if params.active > params.servers:
        raise ConfigError(f"--active {params.active} must not exceed --servers ({params.servers})")
    if params.subset > params.servers:
        raise ConfigError(f"--subset {params.subset} must not exceed --servers ({params.servers})")
    if params.insiders >= params.clients:
        raise ConfigError(
            f"--insiders {params.insiders} must be fewer than --clients ({params.clients})"
        )
    if params.step > params.tick:
        raise ConfigError(f"--step {params.step:g} must not exceed --tick ({params.tick:g})")
    if params.horizon / params.step > 1_000_000:
        raise ConfigError("--horizon / --step must not exceed 1000000 time slots")
    _check_m(params.m, "--m")
    for at, m in params.m_changes:
        _check_m(m, "the m of --m-change")
        if not math.isfinite(at) or not 0 < at < params.horizon:
            raise ConfigError(f"--m-change time {at:g} must be inside (0, --horizon)")
    for delay in params.delays:
        if not math.isfinite(delay) or delay < 0:
            raise ConfigError(f"--delays must be non-negative numbers, got {delay!r}")
    for k in params.isolation_k:
        if not 1 <= k <= params.servers:
            raise ConfigError(f"--isolation-k {k} must be between 1 and --servers")
    # Memory bounds of the vectorised arrays (each about 8 bytes an entry).
    if params.clients * params.isolation_epochs > 200_000_000:
        raise ConfigError("--clients x --isolation-epochs must not exceed 200000000")
    slots = params.horizon / params.step
    if params.servers * slots > 50_000_000:
        raise ConfigError("--servers x --horizon / --step must not exceed 50000000")
    if params.clients * (params.horizon / params.tick + 2) > 50_000_000:
        raise ConfigError("--clients x --horizon / --tick must not exceed 50000000")
    if params.samples > 5_000_000:
        raise ConfigError(f"--samples must not exceed 5000000, got {params.samples}")
    return params
