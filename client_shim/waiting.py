"""The machines one wait of a hand-over watches (``Migrator._run``), kept up to date in time
linear in the answers and timers, not in their product.

A roam's wait for the PREPARE or COMMIT answers of n connections wakes up at about every
answer (or every few). Looking at every machine at every wake-up (its state, then its timer)
made a roam cost the client n * n steps: answers to 7800 connections 0.3 ms apart took the
wait 0.77 s of CPU against 0.11 s this way (a microbenchmark of the two loops on uvloop), in
the middle of the roam, on the CPUs the servers preparing those connections need. Here an
answer marks its own machine (``touch``), a wake-up looks at the marked ones only
(``settle``), and the earliest timer is kept: machines leaving can only make it later, so the
kept one is at worst early, and the full look (``refresh``) runs when it comes.

Pure: no loop, no clock; the migrator feeds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from migrate.handover import TIMER_QUANTUM_S, ClientState


class Machine(Protocol):
    @property
    def port(self) -> int: ...

    @property
    def state(self) -> ClientState: ...

    def get_timer(self) -> float | None: ...


M = TypeVar("M", bound=Machine)


class Waiting(Generic[M]):
    """The machines of ``machines`` still in ``state``, and when the earliest of their timers
    is due."""

    def __init__(self, machines: Iterable[M], state: ClientState) -> None:
        self.state = state
        self.machines = {m.port: m for m in machines if m.state is state}
        self.touched: set[int] = set()
        self.next_timer = self._earliest()
        self._looked = False  # ``due`` made the full look: ``pending`` makes the next

    def pending(self) -> bool:
        """Whether a machine is still in the state; after a ``due`` that looked at all of
        them (their timers were fed since), every one is looked at again first."""
        if self._looked:
            self._looked = False
            self.refresh()
        return bool(self.machines)

    def touch(self, port: int) -> None:
        """``port``'s machine has been fed an answer since the last look."""
        self.touched.add(port)

    def settle(self) -> None:
        """Look again at the machines touched since the last look: those out of the state
        leave; a new timer of those still in it may be the earliest."""
        touched, self.touched = self.touched, set()
        for port in touched:
            machine = self.machines.get(port)
            if machine is None:
                continue
            if machine.state is not self.state:
                del self.machines[port]
            elif (timer := machine.get_timer()) is not None and (
                self.next_timer is None or timer < self.next_timer
            ):
                self.next_timer = timer

    def wait_s(self, now: float) -> float:
        """How long to wait for an answer before the earliest timer is due (no timer: none)."""
        if self.next_timer is None:
            return 0.0
        return max(0.0, self.next_timer - now) + TIMER_QUANTUM_S

    def due(self, now: float) -> list[M]:
        """The machines whose timer is due at ``now``; none while the earliest is not (the
        full look is only made when it may find one)."""
        if self.next_timer is not None and self.next_timer > now:
            return []
        self._looked = True
        return [m for m in self.machines.values() if (t := m.get_timer()) is not None and t <= now]

    def refresh(self) -> None:
        """Everything looked at again (after the due were fed their timers)."""
        self.machines = {p: m for p, m in self.machines.items() if m.state is self.state}
        self.next_timer = self._earliest()

    def _earliest(self) -> float | None:
        timers = [t for m in self.machines.values() if (t := m.get_timer()) is not None]
        return min(timers, default=None)
