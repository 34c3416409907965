"""A server's replay memory is bounded for all connections together, not only per connection:
the live connections' replay logs (``over_total``, ``CheckpointPusher.bound_logs``)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.replaystream import TOTAL_RUNS
from migrate.streamstate import StreamState, over_total
from proxy.checkpoints import CheckpointPusher, LiveConnection


def test_the_largest_logs_are_given_up_first_and_only_as_many_as_needed() -> None:
    assert over_total([], 10) == []
    assert over_total([4, 6], 10) == []
    assert over_total([4, 9, 6], 10) == [1]
    assert over_total([5, 5, 5, 5], 10) == [0, 1]
    assert over_total([0, 0, 30], 10) == [2]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=30), st.integers(0, 5000))
def test_what_is_left_fits_and_nothing_smaller_was_taken_before_a_larger(sizes, limit) -> None:
    chosen = over_total(sizes, limit)
    assert len(set(chosen)) == len(chosen)
    left = [size for i, size in enumerate(sizes) if i not in chosen]
    assert sum(left) <= limit
    if chosen:
        # Largest first, and every one taken is at least as large as every one left.
        assert [sizes[i] for i in chosen] == sorted((sizes[i] for i in chosen), reverse=True)
        assert min(sizes[i] for i in chosen) >= max(left, default=0)
        # Minimal: without the last one taken, the rest would not fit.
        assert sum(left) + sizes[chosen[-1]] > limit


def test_a_server_gives_up_its_largest_logs_past_the_total_at_once() -> None:
    max_replay = 1000
    context = SimpleNamespace(max_replay=max_replay, group_key=bytes(32), live_relay="copy")
    pusher = CheckpointPusher(context)  # type: ignore[arg-type]
    assert pusher.log_limit == TOTAL_RUNS * max_replay
    pushed = []
    pusher.push_logged = lambda connection, now: pushed.append(connection)  # type: ignore[method-assign]
    streams = []
    for port, size in enumerate([900, 900, 900, 900, 900, 900, 900, 900, 500]):
        stream = StreamState("generic", replay_limit=max_replay)
        stream.feed_c2s(b"u" * size)
        streams.append(stream)
        relay = SimpleNamespace(observer_lock=threading.Lock())
        pusher.connections[("10.0.0.2", 40000 + port)] = SimpleNamespace(stream=stream, relay=relay)  # type: ignore[assignment]
    # 7,700 bytes: within 8,000.
    assert pusher.bound_logs(0.0) == 0
    assert all(stream.unmigratable is None for stream in streams)
    streams[-1].feed_c2s(b"u" * 400)  # 8,100: the largest goes, reported at once (a push)
    assert pusher.bound_logs(0.1) == 1
    assert streams[0].unmigratable is not None
    assert "total bound (8000 bytes" in streams[0].unmigratable
    assert streams[0].log == bytearray()
    assert [c.stream for c in pushed] == [streams[0]]
    assert all(stream.unmigratable is None for stream in streams[1:])


def _leaving_connection(
    events: list[tuple[str, int]], port: int, pushed_s2c: int, s2c_pos: int
) -> Any:
    """A stand-in for a live connection: its checkpoint facts and what is done to it, in order."""
    connection = SimpleNamespace(
        port=port, pushed_s2c=pushed_s2c, stream=SimpleNamespace(s2c_pos=s2c_pos)
    )
    connection.lacks_checkpoint = lambda: LiveConnection.lacks_checkpoint(connection)  # type: ignore[arg-type]
    connection.leave_silently = lambda: events.append(("left", port))
    return connection


def _record_pushes(pusher: CheckpointPusher, events: list[tuple[str, int]]) -> None:
    def push(connection: Any, now: float) -> None:
        events.append(("pushed", connection.port))

    pusher.push_logged = push  # type: ignore[method-assign]


def test_a_leaving_server_first_pushes_the_checkpoint_a_young_connection_lacks() -> None:
    # A connection accepted after the leave round (its client roams late) may have had no
    # push yet when the gate closes: without one its client cannot move it and resets it.
    context = SimpleNamespace(
        max_replay=1000, group_key=bytes(32), clock=lambda: 5.0, live_relay="copy"
    )
    pusher = CheckpointPusher(context)  # type: ignore[arg-type]
    events: list[tuple[str, int]] = []
    _record_pushes(pusher, events)
    cases = {
        40001: (-1, 0),  # never pushed, nothing from the service yet
        40002: (-1, 352),  # never pushed, an answer relayed (accepted just before leaving)
        40003: (0, 352),  # pushed at the accept, its answer relayed since
        40004: (0, 0),  # pushed at the accept, still nothing from the service: it is enough
        40005: (352, 704),  # a checkpoint inside the stream: a hand-over replays from it
    }
    for port, (pushed_s2c, s2c_pos) in cases.items():
        pusher.connections[("10.0.0.2", port)] = _leaving_connection(
            events, port, pushed_s2c, s2c_pos
        )
    assert pusher.leave() == 5
    assert pusher.connections == {}
    assert [port for what, port in events if what == "pushed"] == [40001, 40002, 40003]
    assert {port for what, port in events if what == "left"} == set(cases)
    for port in (40001, 40002, 40003):  # each pushed before it was dropped
        assert events.index(("pushed", port)) < events.index(("left", port))


def test_a_server_leaving_some_clients_pushes_only_theirs() -> None:
    context = SimpleNamespace(
        max_replay=1000, group_key=bytes(32), clock=lambda: 5.0, live_relay="copy"
    )
    pusher = CheckpointPusher(context)  # type: ignore[arg-type]
    events: list[tuple[str, int]] = []
    _record_pushes(pusher, events)
    for address, port in (("10.0.0.2", 40001), ("10.0.0.3", 40002)):
        pusher.connections[(address, port)] = _leaving_connection(events, port, -1, 352)
    assert pusher.leave_clients({"10.0.0.2"}) == 1
    assert events == [("pushed", 40001), ("left", 40001)]
    assert list(pusher.connections) == [("10.0.0.3", 40002)]
