"""``client_shim.waiting``: a hand-over's wait looks again only at the answered machines, and
still sees every machine leave and every timer come due, as a look at all of them would."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from client_shim.waiting import Waiting
from migrate.handover import TIMER_QUANTUM_S, ClientState

WAITS = ClientState.COMMITTING


@dataclass
class Fake:
    port: int
    state: ClientState = WAITS
    timer: float | None = 10.0
    looks: int = 0

    def get_timer(self) -> float | None:
        self.looks += 1
        return self.timer


def test_answers_cost_one_look_each_not_one_look_at_every_machine() -> None:
    machines = [Fake(port) for port in range(5000)]
    waiting = Waiting(machines, WAITS)
    for machine in machines:
        machine.looks = 0
    for machine in machines:  # each answer on its own wake-up
        machine.state = ClientState.COMMITTED
        waiting.touch(machine.port)
        assert waiting.pending()
        waiting.settle()
        assert waiting.due(1.0) == []
    assert not waiting.pending()
    assert sum(m.looks for m in machines) == 0  # the machines that left needed no timer look


def test_a_due_timer_is_found_and_the_next_look_is_at_everything() -> None:
    a, b, c = Fake(1, timer=5.0), Fake(2, timer=7.0), Fake(3, timer=None)
    waiting = Waiting([a, b, c, Fake(4, state=ClientState.COMMITTED)], WAITS)
    assert set(waiting.machines) == {1, 2, 3}
    assert waiting.wait_s(4.0) == 1.0 + TIMER_QUANTUM_S
    assert waiting.due(4.9) == []
    assert waiting.due(5.0) == [a]
    a.state, a.timer = ClientState.RESET, None  # its timer fed: it gave up
    assert waiting.pending()
    assert set(waiting.machines) == {2, 3}
    assert waiting.next_timer == 7.0


def test_a_new_earlier_timer_of_an_answered_machine_is_kept_a_later_one_found_at_its_look() -> None:
    a, b = Fake(1, timer=5.0), Fake(2, timer=7.0)
    waiting = Waiting([a, b], WAITS)
    b.timer = 3.0  # an answer asked for an earlier retry
    waiting.touch(2)
    waiting.settle()
    assert waiting.next_timer == 3.0
    a.timer = 9.0  # later: the kept 3.0 is early, never late
    b.timer = 8.0
    waiting.touch(1)
    waiting.touch(2)
    waiting.settle()
    assert waiting.due(3.0) == []  # nothing due after all: everything is looked at again
    assert waiting.pending()
    assert waiting.next_timer == 8.0


def test_no_timer_at_all_means_no_wait_and_a_look_each_time() -> None:
    waiting = Waiting([Fake(1, timer=None)], WAITS)
    assert waiting.wait_s(0.0) == 0.0
    assert waiting.due(0.0) == []
    assert waiting.pending()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 19),
            st.sampled_from([WAITS, ClientState.COMMITTED, ClientState.RESET]),
            st.none() | st.floats(0, 100),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_the_kept_view_agrees_with_a_look_at_every_machine(
    events: list[tuple[int, ClientState, float | None, bool]],
) -> None:
    """Answers (touched) and timers fed (after ``due``) in any order: the machines still
    waiting and the earliest timer are never later than a full look says."""
    machines = [Fake(port, timer=float(port)) for port in range(20)]
    waiting = Waiting(machines, WAITS)
    now = 0.0
    for port, state, timer, answered in events:
        machine = machines[port]
        if machine.state is not WAITS:
            continue  # the machines only go forward: one that left never comes back
        if answered:
            machine.state, machine.timer = state, timer
            waiting.touch(port)
            waiting.settle()
        else:  # time passes to the next due timer, and the due are fed theirs
            now = max(now, waiting.next_timer if waiting.next_timer is not None else now)
            for due in waiting.due(now):
                if due.port == port:  # the event's machine, if due, is fed its timer
                    due.state, due.timer = state, timer
        if not waiting.pending():
            assert all(m.state is not WAITS for m in machines)
            return
        really = {m.port for m in machines if m.state is WAITS}
        assert really <= set(waiting.machines)
        timers = [m.timer for m in machines if m.state is WAITS and m.timer is not None]
        if timers:
            assert waiting.next_timer is not None
            assert waiting.next_timer <= min(timers)
