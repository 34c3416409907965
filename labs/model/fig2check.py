"""The model at the scale of the paper's Figure 2 (``roam lab fig2``), next to the lab's
recorded figures.

The lab (labs/experiments/fig2.py, poisson.py; docs/results.md): two servers behind one
2 Mbit/s bottleneck, a 1 MB file (4 s of the bottleneck), 20 legitimate requests with
Poisson gaps of mean 8 s, an attacker with Poisson gaps of mean 1 s for 300 s, fixed 60 s
epochs alternating S1, S2. In the model's terms:

* one bottleneck shared by both servers (it carries both servers' responses), of capacity
  0.25 files/s, each open server's backlog served at an equal share, with unbounded room
  (the lab's attacker never gives up; its requests time out only after 600 s);
* a server flood (the responses to attack requests load the bottleneck only if the server's
  gate is open);
* the diluted attacker's requests to a closed gate are retried for 30 s (its connect
  timeout, ``attack_connect_timeout_s``) and land when the gate opens; the follow attacker
  abandons them (``abandon_on_retarget``);
* legitimate connections move at a roam (live migration, no pause worth counting); the
  leaving server's attack flows are either dropped or frozen until its gate reopens (the lab
  does not pin this down: both are run, docs/model.md).

``LAB_MEANS`` are the means recorded in docs/results.md (``roam lab fig2 --quick``,
2026-11-25): measured figures, not model output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from labs.model import engine
from labs.model.schedule import Schedule

EPOCH_S = 60.0
LEGIT_REQUESTS = 20
LEGIT_GAP_S = 8.0
ATTACK_RATE = 1.0
ATTACK_S = 300.0
CAPACITY = 0.25  # 1 MB files per second through 2 Mbit/s
RETRY_S = 30.0
DELAYS = (0.0, 15.0, 30.0, 45.0, 60.0)
HORIZON_S = 1500.0
STEP_S = 0.25

# docs/results.md, "Figures": mean response time (paper seconds) of the 20 requests.
LAB_MEANS: dict[tuple[str, str, float | None], float] = {
    ("replication", "none", None): 9.2,
    ("replication", "diluted", None): 272.5,
    ("roaming-live", "none", None): 8.7,
    ("roaming-live", "diluted", None): 166.6,
    ("roaming-live", "follow", 0.0): 164.3,
    ("roaming-live", "follow", 15.0): 72.9,
    ("roaming-live", "follow", 30.0): 29.0,
    ("roaming-live", "follow", 45.0): 17.7,
    ("roaming-live", "follow", 60.0): 13.1,
}


def alternating_schedule(horizon: float) -> Schedule:
    """Fixed 60 s epochs alternating server 0, 1, 0, ... from time 0; the fictive epoch
    before it is server 1 (as the lab's "the other server" before the first epoch)."""
    epochs = int(horizon // EPOCH_S) + 2
    starts = np.arange(-1, epochs - 1, dtype=np.float64) * EPOCH_S
    servers = (np.arange(epochs) + 1) % 2
    active = servers[:, None].astype(np.int64)
    return Schedule(
        starts=starts,
        lengths=np.full(epochs, EPOCH_S),
        length_index=np.zeros(epochs, dtype=np.int64),
        m=np.zeros(epochs, dtype=np.int64),
        active=active,
        assign=np.repeat(active, 2, axis=1),  # both of the lab's "clients" (see run_fig2)
        servers=2,
    )


@dataclass(frozen=True)
class Point:
    """One point of Figure 2: the model's mean response time with the attack's flows dropped
    at a roam and with them frozen until their server's gate opens again, and the lab's."""

    mode: str
    attack: str
    delay: float | None
    dropped: float
    frozen: float
    lab_mean: float | None

    @property
    def low(self) -> float:
        return min(self.dropped, self.frozen)

    @property
    def high(self) -> float:
        return max(self.dropped, self.frozen)

    def distance(self) -> float | None:
        """How far the lab's mean lies outside the model's bracket, relative to the nearer
        end (0 inside it)."""
        if self.lab_mean is None:
            return None
        if self.lab_mean < self.low:
            return self.lab_mean / self.low - 1
        if self.lab_mean > self.high:
            return self.lab_mean / self.high - 1
        return 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "attack": self.attack,
            "delay_s": self.delay,
            "model_mean_s_flows_dropped": self.dropped,
            "model_mean_s_flows_frozen": self.frozen,
            "lab_mean_s": self.lab_mean,
            "lab_outside_model": self.distance(),
        }


def _request_times(rng: np.random.Generator, repeats: int) -> np.ndarray:
    gaps = rng.exponential(LEGIT_GAP_S, size=(repeats, LEGIT_REQUESTS))
    return np.cumsum(gaps, axis=1).ravel()


def _means(
    seed: int, repeats: int, drop_on_close: bool
) -> list[tuple[str, str, float | None, float]]:
    slot_times = np.arange(0.0, HORIZON_S, STEP_S)
    resources = engine.Resources(
        servers=2,
        capacity=CAPACITY,
        buffer=1e12,
        link_capacity=1e12,
        link_buffer=1e12,
        link_weight=1.0,
        shared_queue=True,
        drop_on_close=drop_on_close,
    )
    # The lab's client C sends each replicated request to a random server: two model clients
    # at half the rate, one homed on each server, do the same.
    load = engine.Load(clients=2, client_rate=0.5 / LEGIT_GAP_S, attack_rate=ATTACK_RATE)
    layouts = {
        "replication": engine.Layout(
            "replication", 2, 2, slot_times, home=np.arange(2, dtype=np.int64)
        ),
        "roaming-live": engine.Layout(
            "roaming", 2, 2, slot_times, schedule=alternating_schedule(HORIZON_S)
        ),
    }
    configurations: list[tuple[str, engine.Attack, float | None]] = [
        ("replication", engine.Attack("none"), None),
        ("replication", engine.Attack("diluted", retry_window=RETRY_S), None),
        ("roaming-live", engine.Attack("none"), None),
        ("roaming-live", engine.Attack("diluted", retry_window=RETRY_S), None),
    ]
    configurations += [("roaming-live", engine.Attack("follow", delay=d), d) for d in DELAYS]
    means = []
    for index, (mode, attack, delay) in enumerate(configurations):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 7, index]))
        times = _request_times(np.random.default_rng([seed, 8]), repeats)
        outcome = engine.simulate(
            rng,
            layouts[mode],
            attack,
            resources,
            load,
            step=STEP_S,
            horizon=HORIZON_S,
            pause=0.0,
            samples=0,
            request_times=times,
            attack_until=ATTACK_S,
        )
        means.append((mode, attack.kind, delay, outcome.mean()))
    return means


def run_fig2(seed: int = 1, repeats: int = 500) -> list[Point]:
    """Every (mode, attack) point of the lab's Figure 2 (roaming-live), from the model, with
    the attack's flows dropped at a roam and frozen until their gate reopens."""
    dropped = _means(seed, repeats, drop_on_close=True)
    frozen = _means(seed, repeats, drop_on_close=False)
    return [
        Point(
            mode=mode,
            attack=attack,
            delay=delay,
            dropped=d,
            frozen=f,
            lab_mean=LAB_MEANS.get((mode, attack, delay)),
        )
        for (mode, attack, delay, d), (_, _, _, f) in zip(dropped, frozen, strict=True)
    ]


def render(points: list[Point]) -> str:
    lines = [
        "mean response time (paper seconds); model with the attack's flows dropped at a roam / "
        "frozen until their gate reopens",
        "mode          attack   delay  flows dropped  flows frozen  lab mean  lab outside model",
    ]
    for p in points:
        delay = "-" if p.delay is None else f"{p.delay:g}"
        lab = "-" if p.lab_mean is None else f"{p.lab_mean:.1f}"
        distance = p.distance()
        outside = (
            "-" if distance is None else ("inside" if distance == 0 else f"{100 * distance:+.0f} %")
        )
        lines.append(
            f"{p.mode:<13} {p.attack:<8} {delay:>5}  {p.dropped:>13.1f}  {p.frozen:>12.1f}"
            f"  {lab:>8}  {outside:>17}"
        )
    return "\n".join(lines)
