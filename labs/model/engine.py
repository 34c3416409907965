"""One defence under one attack: legitimate requests served and their response times.

Defences (docs/model.md):

* ``none``: the service on one server at a known address; every attack aims at it.
* ``replication``: all N servers serve all the time; each client has a fixed replica (clients
  spread evenly); the attacker knows every replica.
* ``roaming``: k of N servers active per epoch (``schedule``); inactive servers' gates drop
  everything addressed to the service; each client's server is re-drawn every epoch.

Attacks (``Attack.kind``), as the bots aim them in each time slot:

* ``none``;
* ``diluted``: the bots' load split evenly over all N servers (the paper's diluted attack);
* ``subset``: split evenly over a fixed random subset of ``subset`` servers (the paper's "a
  subset of M servers");
* ``follow``: the whole load on the servers that were active ``delay`` seconds earlier (the
  attacker needs ``delay`` to discover each move); against replication there is nothing to
  follow and it is the diluted attack;
* ``insider``: the whole load on the servers of the insiders (clients that leak their own
  server to the bots), as they were ``insider_delay`` seconds earlier. With ``revoke``, the
  operator revokes the insiders at the end of the epoch in which the likelihood ranking
  (``labs.model.isolation``) first puts them above every innocent client: from then on
  their bots learn nothing and the attack stops. Only roaming with k >= 2 can isolate them
  (with static replicas or k = 1 an insider's co-clients share its server in every epoch).

Floods (``Attack.flood``): ``server`` (requests that cost the server work: only a server whose
gate is open receives them; a closed gate drops them for free) or ``link`` (a volumetric
flood of the server's access link, ``link_weight`` request-equivalents per bot request,
whether its gate is open or not: the firewall is behind the link).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from labs.model.isolation import isolation_epoch
from labs.model.queueing import backlog_at, backlog_starts, sample
from labs.model.schedule import BoolArray, FloatArray, IntArray, Schedule

ATTACK_KINDS = ("none", "diluted", "subset", "follow", "insider")
FLOODS = ("server", "link")
DEFENCES = ("none", "replication", "roaming")


@dataclass(frozen=True)
class Attack:
    kind: str = "none"
    flood: str = "server"
    delay: float = 0.0  # follow: discovery delay; insider: the insiders' delay
    subset: tuple[int, ...] = ()  # the attacked servers of ``subset``
    retry_window: float = 0.0  # bots retry a closed gate this long (diluted/subset only)
    revoke: bool = False  # insider: revoked once the ranking isolates them

    def label(self) -> str:
        if self.kind == "follow":
            return f"follow {self.delay:g} s"
        if self.kind == "subset":
            return f"subset of {len(self.subset)}"
        if self.kind == "insider" and self.revoke:
            return "insider, revoked"
        return self.kind


@dataclass(frozen=True)
class Resources:
    """Capacities of the pool (docs/model.md): per server, per access link."""

    servers: int
    capacity: float
    buffer: float
    link_capacity: float
    link_buffer: float
    link_weight: float
    shared_queue: bool = False  # one bottleneck queue for all servers (the Fig. 2 topology)
    # A closing gate drops its server's backlog (the attack's flows die), or freezes it: the
    # flows stall and resume when the gate opens again (TCP retransmits; Fig. 2's lab).
    drop_on_close: bool = True


@dataclass(frozen=True)
class Load:
    clients: int
    client_rate: float
    attack_rate: float  # bots x bot_rate
    insiders: tuple[int, ...] = ()  # client ids


@dataclass(frozen=True)
class Outcome:
    offered: float  # legitimate requests offered over the horizon
    served_fraction: float
    times: FloatArray  # response times of the sampled requests that were served

    @property
    def served(self) -> float:
        return self.offered * self.served_fraction

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times, q)) if self.times.size else float("nan")

    def mean(self) -> float:
        return float(self.times.mean()) if self.times.size else float("nan")


class Layout:
    """Where each client's requests go and which gates are open, slot by slot."""

    def __init__(
        self,
        defence: str,
        servers: int,
        clients: int,
        slot_times: FloatArray,
        schedule: Schedule | None = None,
        home: IntArray | None = None,
    ) -> None:
        self.defence = defence
        self.servers = servers
        self.clients = clients
        self.slot_times = slot_times
        self.schedule = schedule
        self.home = home
        slots = slot_times.shape[0]
        if defence == "roaming":
            assert schedule is not None
            self.slot_epoch = schedule.epoch_at(slot_times)
            self.open = schedule.active_mask()[self.slot_epoch]
            epochs = schedule.epochs
            flat = (np.arange(epochs)[:, None] * servers + schedule.assign).ravel()
            counts = np.bincount(flat, minlength=epochs * servers).reshape(epochs, servers)
            self.clients_at = counts[self.slot_epoch].astype(np.float64)
        elif defence == "replication":
            assert home is not None
            self.open = np.ones((slots, servers), dtype=bool)
            per_server = np.bincount(home, minlength=servers).astype(np.float64)
            self.clients_at = np.broadcast_to(per_server, (slots, servers)).copy()
        elif defence == "none":
            self.open = np.zeros((slots, servers), dtype=bool)
            self.open[:, 0] = True
            self.clients_at = np.zeros((slots, servers))
            self.clients_at[:, 0] = clients
        else:
            raise ValueError(f"unknown defence {defence!r}")

    def server_of(self, times: FloatArray, clients: IntArray) -> IntArray:
        if self.defence == "roaming":
            assert self.schedule is not None
            return self.schedule.assign[self.schedule.epoch_at(times), clients]
        if self.defence == "replication":
            assert self.home is not None
            return self.home[clients]
        return np.zeros(times.shape, dtype=np.int64)

    def pause_delay(self, times: FloatArray, clients: IntArray, pause: float) -> FloatArray:
        """A client whose server changed at the start of the current epoch reaches no server
        until ``pause`` after it (its connections are being handed over)."""
        if self.defence != "roaming" or pause <= 0:
            return np.zeros(times.shape)
        assert self.schedule is not None
        epoch = self.schedule.epoch_at(times)
        previous = np.maximum(epoch - 1, 0)
        moved = self.schedule.assign[epoch, clients] != self.schedule.assign[previous, clients]
        since = times - self.schedule.starts[epoch]
        return np.where(moved & (since < pause), pause - since, 0.0)

    def revoked_at(self, insiders: IntArray) -> float:
        """When the insiders are revoked: the end of the first epoch of the horizon after
        which the ranking isolates them (infinity if it never does)."""
        assert self.schedule is not None
        first = int(self.schedule.epoch_at(np.zeros(1))[0])
        epoch = isolation_epoch(self.schedule.assign[first:], insiders)
        if epoch is None:
            return math.inf
        last = first + epoch - 1
        return float(self.schedule.starts[last] + self.schedule.lengths[last])

    def targets(self, attack: Attack, insiders: Sequence[int]) -> FloatArray:
        """Share of the bots' load aimed at each server in each slot, (slots, servers)."""
        slots = self.slot_times.shape[0]
        weights = np.zeros((slots, self.servers))
        if attack.kind == "none":
            return weights
        if self.defence == "none":
            weights[:, 0] = 1.0
            return weights
        kind = attack.kind
        if kind == "follow" and self.defence == "replication":
            kind = "diluted"
        if kind == "diluted":
            weights[:] = 1.0 / self.servers
        elif kind == "subset":
            weights[:, list(attack.subset)] = 1.0 / len(attack.subset)
        elif kind == "follow":
            assert self.schedule is not None
            epoch = self.schedule.epoch_at(self.slot_times - attack.delay)
            sets = self.schedule.active[epoch]
            np.put_along_axis(weights, sets, 1.0 / sets.shape[1], axis=1)
        elif kind == "insider":
            if not insiders:
                return weights
            ids = np.asarray(insiders, dtype=np.int64)
            if self.defence == "replication":
                assert self.home is not None
                hit = np.zeros(self.servers, dtype=bool)
                hit[self.home[ids]] = True
                weights[:, hit] = 1.0 / hit.sum()
            else:
                assert self.schedule is not None
                epoch = self.schedule.epoch_at(self.slot_times - attack.delay)
                leaked = self.schedule.assign[epoch][:, ids]
                hit = np.zeros((slots, self.servers), dtype=bool)
                np.put_along_axis(hit, leaked, True, axis=1)
                weights = hit / hit.sum(axis=1, keepdims=True)
                if attack.revoke:
                    weights[self.slot_times >= self.revoked_at(ids)] = 0.0
        else:
            raise ValueError(f"unknown attack {attack.kind!r}")
        return weights


def _next_open(open_: BoolArray) -> IntArray:
    """For each slot and server, the first slot at or after it with the gate open (or
    ``slots`` if none)."""
    slots = open_.shape[0]
    result = np.empty(open_.shape, dtype=np.int64)
    following = np.full(open_.shape[1], slots, dtype=np.int64)
    for t in range(slots - 1, -1, -1):
        following = np.where(open_[t], t, following)
        result[t] = following
    return result


def bot_loads(
    layout: Layout, attack: Attack, resources: Resources, load: Load, step: float
) -> tuple[FloatArray, FloatArray]:
    """The bots' offered rate at each server and at each access link, (slots, servers)."""
    shape = layout.open.shape
    weights = layout.targets(attack, load.insiders)
    aimed = load.attack_rate * weights
    if attack.flood == "link":
        return np.zeros(shape), aimed * resources.link_weight
    at_server = aimed * layout.open
    retrying = attack.kind in {"diluted", "subset"} and attack.retry_window > 0
    if retrying:
        # Requests sent to a closed gate are retried (SYN retransmissions) and land when it
        # opens, if that is within the retry window; a follow attacker retargets instead.
        closed = aimed * ~layout.open
        later = _next_open(layout.open)
        slot_index = np.arange(shape[0])[:, None]
        lands = (
            (closed > 0) & (later < shape[0]) & ((later - slot_index) * step <= attack.retry_window)
        )
        t_idx, s_idx = np.nonzero(lands)
        np.add.at(at_server, (later[t_idx, s_idx], s_idx), closed[t_idx, s_idx])
    return at_server, np.zeros(shape)


def simulate(
    rng: np.random.Generator,
    layout: Layout,
    attack: Attack,
    resources: Resources,
    load: Load,
    *,
    step: float,
    horizon: float,
    pause: float,
    samples: int,
    request_times: FloatArray | None = None,
    attack_until: float | None = None,
) -> Outcome:
    """Sample legitimate requests (uniform in time and over clients, i.e. Poisson arrivals of
    equal rate per client, unless ``request_times`` are given) and serve them."""
    slots = layout.slot_times.shape[0]
    bot_server, bot_link = bot_loads(layout, attack, resources, load, step)
    if attack_until is not None:
        stop = layout.slot_times >= attack_until
        bot_server[stop] = 0.0
        bot_link[stop] = 0.0
    legit = layout.clients_at * load.client_rate
    server_in = legit + bot_server
    link_in = legit + bot_link
    closed = ~layout.open
    left = np.zeros(layout.open.shape, dtype=bool)
    left[1:] = layout.open[:-1] & closed[1:]
    # Each server's fluid backlog, served at its share of the capacity: all of it, or with a
    # shared bottleneck an equal share among the open servers (closed ones take none).
    if resources.shared_queue:
        n_open = np.maximum(layout.open.sum(axis=1, keepdims=True), 1)
        share = np.broadcast_to(resources.capacity / n_open, server_in.shape)
        # The stochastic part sees the whole bottleneck: every open server's load.
        group_in = np.broadcast_to(
            (server_in * layout.open).sum(axis=1, keepdims=True), server_in.shape
        )
    else:
        share = np.full(server_in.shape, resources.capacity)
        group_in = server_in
    if resources.drop_on_close:
        server_b0 = backlog_starts(server_in, share, np.array(resources.buffer), step, left)
    else:
        server_b0 = backlog_starts(
            server_in, share, np.array(resources.buffer), step, np.zeros_like(left), frozen=closed
        )
    link_b0 = backlog_starts(
        link_in,
        np.array(resources.link_capacity),
        np.array(resources.link_buffer),
        step,
        np.zeros_like(left),
    )

    if request_times is None:
        times = rng.random(samples) * horizon
    else:
        times = np.asarray(request_times, dtype=np.float64)
    clients: IntArray = np.asarray(
        rng.integers(0, load.clients, size=times.shape[0]), dtype=np.int64
    )
    server = layout.server_of(times, clients)
    slot = np.clip((times // step).astype(np.int64), 0, slots - 1)
    offset = times - slot * step
    delay = layout.pause_delay(times, clients, pause)
    n = times.shape[0]
    link_cap = np.full(n, resources.link_capacity)
    link_buf = np.full(n, float(resources.link_buffer))
    link_lam = link_in[slot, server]
    link_b = backlog_at(link_b0[slot, server], link_lam, link_cap, link_buf, offset)
    ok_link, t_link = sample(
        rng, link_lam, link_cap, link_buf, link_b / link_cap, link_b >= link_buf * (1 - 1e-9)
    )
    cap = np.full(n, resources.capacity)
    buf = np.full(n, float(resources.buffer))
    own = share[slot, server]
    backlog = backlog_at(server_b0[slot, server], server_in[slot, server], own, buf, offset)
    ok_server, t_server = sample(
        rng, group_in[slot, server], cap, buf, backlog / own, backlog >= buf * (1 - 1e-9)
    )
    served = ok_link & ok_server
    total = delay + t_link + t_server
    offered = load.clients * load.client_rate * horizon
    fraction = float(served.mean()) if served.size else 0.0
    return Outcome(offered=offered, served_fraction=fraction, times=total[served])
