"""A vectorised k-of-N roaming schedule (PROTOCOL.md sections 1 and 4), drawn from numpy.

The protocol derives every epoch's length, active set and client assignment from SHA-256 of a
hash-chain key. A model of 10^4 clients over hundreds of epochs does not need the hashes
themselves, only their distribution: under the usual random-oracle assumption each digest is
uniform, so ``MSB_m`` is uniform on ``0 .. 2^m - 1``, the active set is a uniformly random
ordered set of k distinct servers, and a client's index in the set is uniform on ``0 .. k-1``,
independently per epoch. That is what is drawn here, from a seeded generator.

Epoch 0 is a fictive epoch that ends at time 0 (the start of the model's horizon): a follow
attacker aiming at "the set of ``delay`` seconds ago" at the start aims at it, as the lab's
follow attacker aims at "the other server" before the first epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class Schedule:
    """Epochs ``0 .. E-1``: ``starts[e]`` (seconds), ``lengths[e]``, ``length_index[e]`` (the
    ``MSB_m`` value, so ``lengths = (1 + length_index) * tick``), ``m[e]``, ``active[e]`` (k
    server indices) and ``assign[e, c]`` (client c's server)."""

    starts: FloatArray
    lengths: FloatArray
    length_index: IntArray
    m: IntArray
    active: IntArray
    assign: IntArray
    servers: int

    @property
    def k(self) -> int:
        return int(self.active.shape[1])

    @property
    def epochs(self) -> int:
        return int(self.starts.shape[0])

    def epoch_at(self, times: FloatArray) -> IntArray:
        """The epoch of each time (times before epoch 0's start map to epoch 0)."""
        index = np.searchsorted(self.starts, times, side="right") - 1
        return np.clip(index, 0, self.epochs - 1).astype(np.int64)

    def active_mask(self) -> BoolArray:
        """``mask[e, s]``: server s is active in epoch e."""
        mask = np.zeros((self.epochs, self.servers), dtype=bool)
        np.put_along_axis(mask, self.active, True, axis=1)
        return mask


def m_at(times: FloatArray, m0: int, changes: Sequence[tuple[float, int]]) -> IntArray:
    """The m in force at each time: ``m0``, then each change's m from its time on (a change
    applies to the epochs that start at or after it, as a roaming update's ``l``)."""
    result = np.full(times.shape, m0, dtype=np.int64)
    for at, m in sorted(changes):
        result[times >= at] = m
    return result


def draw_active(rng: np.random.Generator, epochs: int, servers: int, k: int) -> IntArray:
    """``epochs`` ordered sets of k distinct servers, uniformly at random."""
    if k == 1:
        return rng.integers(0, servers, size=(epochs, 1), dtype=np.int64)
    keys = rng.random((epochs, servers))
    return np.argsort(keys, axis=1)[:, :k].astype(np.int64)


def build(
    rng: np.random.Generator,
    *,
    servers: int,
    k: int,
    clients: int,
    m0: int,
    changes: Sequence[tuple[float, int]],
    tick: float,
    horizon: float,
) -> Schedule:
    """The epochs that cover ``[0, horizon)``, plus the fictive epoch 0 before time 0."""
    starts: list[float] = []
    lengths: list[float] = []
    indices: list[int] = []
    ms: list[int] = []
    # The fictive epoch 0 has the starting m and ends at 0.
    first_m = m0
    first_index = int(rng.integers(0, 2**first_m))
    first_length = (1 + first_index) * tick
    starts.append(-first_length)
    lengths.append(first_length)
    indices.append(first_index)
    ms.append(first_m)
    now = 0.0
    while now < horizon:
        m = int(m_at(np.array([now]), m0, changes)[0])
        index = int(rng.integers(0, 2**m))
        length = (1 + index) * tick
        starts.append(now)
        lengths.append(length)
        indices.append(index)
        ms.append(m)
        now += length
    epochs = len(starts)
    active = draw_active(rng, epochs, servers, k)
    slot = rng.integers(0, k, size=(epochs, clients), dtype=np.int64)
    assign = np.take_along_axis(active, slot, axis=1)
    return Schedule(
        starts=np.array(starts),
        lengths=np.array(lengths),
        length_index=np.array(indices, dtype=np.int64),
        m=np.array(ms, dtype=np.int64),
        active=active,
        assign=assign,
        servers=servers,
    )
