"""The queueing approximation of one resource (a server, or a server's access link).

A resource has a capacity ``C`` (requests, or request-equivalents, per second) and room for
``K`` of them (queue plus service). Time is cut into slots of ``step`` seconds; in a slot the
offered rate ``lam`` is constant (legitimate load + the bots' load that reaches it).

Two parts, each the simple answer for one regime:

* **Fluid backlog** (overload builds up over time): ``B`` grows at ``lam - C`` while the
  resource is overloaded and drains at ``C - lam`` otherwise, within ``[0, K]``; a request
  arriving ``u`` seconds into a slot finds ``B(u) = clip(B0 + (lam - C) u, 0, K)`` and waits
  ``B(u) / C`` (first come, first served). A server whose gate closes (it leaves the active
  set) drops its backlog: the attack's flows die with it, legitimate connections move
  (the paper: "with the start of each roaming epoch, all the existing attacking flows are
  dropped"). An access link's backlog is not reset by a gate (the router before it queues).
* **M/M/1/K** (random queueing below capacity): with ``rho = lam / C < 1`` an arriving request
  is refused with the stationary blocking probability ``P_K(rho)``, else finds ``n`` in the
  system with probability proportional to ``rho^n`` (``n < K``) and stays ``Erlang(n+1, C)``.
  At ``rho >= 1`` it is served after the fluid wait plus one service time ``Exp(C)``, and
  refused with probability ``P_K(rho)`` (about ``1 - 1/rho``) once the backlog is full:
  the server takes ``C`` of the ``lam`` per second it is offered.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


def backlog_starts(
    load: FloatArray,
    capacity: FloatArray,
    buffer: FloatArray,
    step: float,
    reset: BoolArray,
    frozen: BoolArray | None = None,
) -> FloatArray:
    """The fluid backlog at the start of each slot: ``load`` and ``reset`` are (slots,
    resources), ``capacity`` that or (resources,); ``reset[t, q]`` empties resource q at the
    start of slot t; ``frozen[t, q]`` keeps its backlog as it is during slot t (a closed gate
    whose flows wait for it to open again)."""
    slots, resources = load.shape
    starts = np.empty_like(load)
    backlog = np.zeros(resources)
    growth = (load - capacity) * step
    if frozen is not None:
        growth = np.where(frozen, 0.0, growth)
    for t in range(slots):
        backlog[reset[t]] = 0.0
        starts[t] = backlog
        backlog = np.clip(backlog + growth[t], 0.0, buffer)
    return starts


def backlog_at(
    backlog0: FloatArray, lam: FloatArray, capacity: FloatArray, buffer: FloatArray, u: FloatArray
) -> FloatArray:
    """The fluid backlog ``u`` seconds into a slot that started with ``backlog0``."""
    return np.clip(backlog0 + (lam - capacity) * u, 0.0, buffer)


def blocking(rho: FloatArray, buffer: FloatArray) -> FloatArray:
    """M/M/1/K's stationary blocking probability ``P_K(rho)``, stable for any rho >= 0."""
    rho = np.asarray(rho, dtype=np.float64)
    k = np.broadcast_to(np.asarray(buffer, dtype=np.float64), rho.shape)
    result = np.empty_like(rho)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        low = rho < 1.0 - 1e-12
        high = rho > 1.0 + 1e-12
        mid = ~(low | high)
        r = rho[low]
        result[low] = (1.0 - r) * r ** k[low] / (1.0 - r ** (k[low] + 1.0))
        inv = 1.0 / rho[high]
        result[high] = (1.0 - inv) / (1.0 - inv ** (k[high] + 1.0))
        result[mid] = 1.0 / (k[mid] + 1.0)
    return np.nan_to_num(result, nan=0.0)


def sample(
    rng: np.random.Generator,
    lam: FloatArray,
    capacity: FloatArray,
    buffer: FloatArray,
    wait: FloatArray,
    full: BoolArray,
) -> tuple[BoolArray, FloatArray]:
    """For requests at a resource with offered rate ``lam``, capacity and buffer, that find a
    fluid wait of ``wait`` seconds and the backlog ``full`` or not: (admitted, time spent
    there). Arrays of one length, one entry per request."""
    rho = lam / capacity
    overloaded = rho >= 1.0
    p_block = blocking(rho, buffer)
    refuse_p = np.where(overloaded, np.where(full, p_block, 0.0), p_block)
    admitted = rng.random(lam.shape) >= refuse_p
    # Number found in the system (M/M/1/K, admitted arrivals), below capacity only.
    u = rng.random(lam.shape)
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        r = np.where(overloaded, 0.5, np.maximum(rho, 1e-300))
        tail = 1.0 - r**buffer
        found = np.floor(np.log1p(-u * tail) / np.log(r))
    found = np.where(overloaded | ~np.isfinite(found), 0.0, np.clip(found, 0.0, buffer - 1.0))
    service = rng.gamma(found + 1.0, 1.0 / capacity)
    return admitted, wait + service
