"""The paper's analytic figures (section IV-C b) next to the model's simulated ones.

* An adversary without the keys guesses both the start of an epoch and its server with
  probability ``1 / (2^m N)``: the epoch length is one of ``2^m`` equally likely values and
  the server one of N. With k active servers, a guessed server is active with probability
  ``k / N``: ``k / (2^m N)``. Simulated: in each of many epochs of the model's schedule, the
  attacker draws ``guesses`` (length, server) pairs uniformly; a hit guesses the epoch's
  length and an active server.
* An attack on a fixed subset of M servers finds the service outside it about ``(N - M) / N``
  of the time. Simulated: the time-weighted share of the schedule's epochs whose active
  server (k = 1), or the share of the active set (k > 1, where clients spread evenly over
  it), lies outside a random subset of M servers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labs.model.schedule import draw_active


@dataclass(frozen=True)
class GuessFigure:
    m: int
    k: int
    servers: int
    trials: int
    hits: int

    @property
    def analytic(self) -> float:
        return float(self.k / (2**self.m * self.servers))

    @property
    def simulated(self) -> float:
        return self.hits / self.trials

    def as_json(self) -> dict[str, float | int]:
        return {
            "m": self.m,
            "k": self.k,
            "servers": self.servers,
            "trials": self.trials,
            "hits": self.hits,
            "analytic": self.analytic,
            "simulated": self.simulated,
        }


@dataclass(frozen=True)
class OutsideFigure:
    m: int
    k: int
    servers: int
    subset: int
    epochs: int
    simulated: float

    @property
    def analytic(self) -> float:
        return (self.servers - self.subset) / self.servers

    def as_json(self) -> dict[str, float | int]:
        return {
            "m": self.m,
            "k": self.k,
            "servers": self.servers,
            "subset": self.subset,
            "epochs": self.epochs,
            "analytic": self.analytic,
            "simulated": self.simulated,
        }


def guess_figure(
    rng: np.random.Generator, *, m: int, k: int, servers: int, epochs: int, guesses: int
) -> GuessFigure:
    """Guesses against ``epochs`` freshly drawn epochs at this m and k, in chunks."""
    hits = 0
    chunk = max(1, 2_000_000 // max(guesses, servers))
    done = 0
    while done < epochs:
        n = min(chunk, epochs - done)
        length_index = rng.integers(0, 2**m, size=n)
        mask = np.zeros((n, servers), dtype=bool)
        np.put_along_axis(mask, draw_active(rng, n, servers, k), True, axis=1)
        g_len = rng.integers(0, 2**m, size=(n, guesses))
        g_srv = rng.integers(0, servers, size=(n, guesses))
        right_time = g_len == length_index[:, None]
        right_server = np.take_along_axis(mask, g_srv, axis=1)
        hits += int(np.count_nonzero(right_time & right_server))
        done += n
    return GuessFigure(m=m, k=k, servers=servers, trials=epochs * guesses, hits=hits)


def outside_figure(
    rng: np.random.Generator, *, m: int, k: int, servers: int, subset: int, epochs: int
) -> OutsideFigure:
    """The time-weighted share outside a random subset, over ``epochs`` epochs at this m."""
    attacked = np.zeros(servers, dtype=bool)
    attacked[rng.choice(servers, size=subset, replace=False)] = True
    lengths = (1 + rng.integers(0, 2**m, size=epochs)).astype(np.float64)
    active = draw_active(rng, epochs, servers, k)
    outside = (~attacked[active]).mean(axis=1)
    share = float((outside * lengths).sum() / lengths.sum())
    return OutsideFigure(m=m, k=k, servers=servers, subset=subset, epochs=epochs, simulated=share)
