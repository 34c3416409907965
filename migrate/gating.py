"""When a server's firewall lets the service's traffic in (paper section IV-C a).

Theory of operation: server ``S`` is *open* at ``now`` if some epoch ``i`` with ``S_i = S`` has
its window ``[T_i - delta, T_{i+1} + delta + gamma)`` containing ``now``; otherwise every packet
for the service is dropped. Consecutive epochs on the same server merge into one open
interval. A server shim asks two questions: "am I open now" (``gate_at``) and "when must I
look again" (``GateState.until``: the next time the answer can change), and sleeps until
then, so the firewall changes state at the schedule's instants and not at polling ticks.

The client side asks the dual question: which server to send to at ``now``
(``EpochSchedule.epoch_at(now).server``) and when that changes (``next_switch``).
"""

from __future__ import annotations

from dataclasses import dataclass

from migrate.endpoints import Endpoint
from migrate.errors import ScheduleError, SubscriptionExpiredError
from migrate.schedule import EpochSchedule

SCAN_LIMIT = 4096  # epochs looked ahead for the next change of server


@dataclass(frozen=True, slots=True)
class GateState:
    open: bool
    epoch: int  # the epoch running at ``now``
    active: bool  # this server is S_epoch (not just inside a neighbour's transitional window)
    until: float  # re-evaluate no later than this; the state cannot change before it


def gate_at(schedule: EpochSchedule, me: Endpoint, now: float) -> GateState:
    """Whether ``me`` is open at ``now``, and the next instant the answer may change.

    The answer can only change at a window edge (``T_i - delta`` or ``T_{i+1} + delta +
    gamma``) of an epoch near ``now``; ``until`` is the first such edge after ``now``. Where
    two windows of ``me`` overlap, re-evaluating at the inner edge finds the gate still open,
    which costs a wake-up and nothing else.
    """
    try:
        current = schedule.epoch_at(now)
    except ScheduleError:
        # Before the schedule starts: only epoch 1's server opens, delta early.
        first = schedule.window(1)
        if now >= first.opens:
            return GateState(first.server == me, 1, False, first.closes)
        return GateState(False, 1, False, first.opens)
    held = schedule.chain.held_index
    is_open = any(window.server == me for window in schedule.open_windows(now))
    edges: list[float] = []
    for index in range(max(1, current.index - 1), min(held, current.index + 2) + 1):
        window = schedule.window(index)
        edges.extend(edge for edge in (window.opens, window.closes) if edge > now)
    until = min(edges)
    return GateState(is_open, current.index, current.server == me, until)


def next_switch(schedule: EpochSchedule, now: float) -> tuple[int, float, Endpoint]:
    """For a client: the next epoch whose server differs from the current one.

    Returns ``(epoch, start, server)``. Epochs that stay on the same server are not switches.
    """
    if len(set(schedule.params.servers)) == 1:
        # Every epoch is the one server's: a walk would look SCAN_LIMIT epochs ahead at every
        # epoch (both shims did, a third of their CPU on 0.5 s epochs) to find nothing.
        raise ScheduleError("the pool has one server: the service never changes server")
    current = schedule.epoch_at(now)
    held = schedule.chain.held_index
    index = current.index + 1
    while index <= held and index - current.index <= SCAN_LIMIT:
        epoch = schedule.epoch(index)
        if epoch.server != current.server:
            return epoch.index, epoch.start, epoch.server
        index += 1
    if index > held:
        raise SubscriptionExpiredError(f"no change of server before the last epoch held ({held})")
    epoch = schedule.epoch(index)
    return epoch.index, epoch.start, epoch.server


def next_departure(schedule: EpochSchedule, now: float) -> int:
    """For a reactive trigger: the first epoch after the current one on another server."""
    index, _, _ = next_switch(schedule, now)
    return index
