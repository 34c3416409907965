"""Sealer counters kept above a persisted floor: no nonce twice, whatever the clock does."""

import random

import pytest

from migrate.channel import COUNTER_RESERVE_US, CounterFloor, Kind, Opener, Sealer
from tests.unit.budget import bounded_step

KEY = bytes(range(32))


class Disk:
    """The state file: what was persisted, and how often."""

    def __init__(self) -> None:
        self.floor = 0
        self.writes = 0

    def save(self, value: int) -> None:
        assert value > self.floor, "a reservation never goes back"
        self.floor = value
        self.writes += 1


def restart(disk: Disk) -> Sealer:
    return Sealer(KEY, 3, b"ctx", CounterFloor(disk.floor, disk.save))


def test_clock_steps_back_across_restarts_never_repeat_a_nonce_over_simulated_weeks() -> None:
    rng = random.Random(12)
    disk = Disk()
    clock = 1_800_000_000.0
    seen: set[int] = set()
    highest = 0
    for _run in range(200):
        sealer = restart(disk)
        for _ in range(rng.randrange(1, 50)):
            clock += rng.choice((1e-7, 0.001, 2.0, 3600.0, 86400.0 * 3))
            counter = sealer.next_counter(clock)
            assert counter not in seen
            assert counter > highest
            assert disk.floor >= counter, "used before it was persisted"
            seen.add(counter)
            highest = counter
        # The process dies; its host's clock steps back by up to a day (or forward).
        clock += rng.choice((-86400.0, -3600.0, -1.0, 0.0, 600.0))
    assert len(seen) > 1000


def test_without_a_floor_a_clock_step_back_repeats_a_nonce() -> None:
    """Why the floor exists: the old behaviour, counters from the clock alone."""
    first = Sealer(KEY, 3).next_counter(1000.0)
    assert Sealer(KEY, 3).next_counter(1000.0) == first


def test_a_busy_sealer_persists_once_per_reservation() -> None:
    disk = Disk()
    sealer = restart(disk)
    start = 1_800_000_000.0
    for i in range(10_000):
        sealer.next_counter(start + i * 0.01)  # 100 s of messages every 10 ms
    assert disk.writes == 1
    sealer.next_counter(start + COUNTER_RESERVE_US / 1e6 + 1)
    assert disk.writes == 2


def test_a_failed_save_seals_nothing() -> None:
    def full(_value: int) -> None:
        raise OSError("No space left on device")

    sealer = Sealer(KEY, 3, counters=CounterFloor(0, full))
    with pytest.raises(OSError, match="No space"):
        sealer.seal(Kind.GROUP_CONTROL, b"x", 1000.0)
    assert sealer.last_counter == 0


def test_messages_above_the_floor_still_open_and_cost_constant_work() -> None:
    disk = Disk()
    opener = Opener(KEY, b"ctx")
    now = 1_800_000_000.0
    for gap in (1.0, 3600.0, 86400.0 * 365):
        sealer = restart(disk)
        now += gap
        with bounded_step(f"a message after {gap:.0f} s"):
            opened = opener.open(sealer.seal(Kind.GROUP_CONTROL, b"x", now), now)
            opener.accept(opened)


def test_a_floor_is_never_negative() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        CounterFloor(-1, Disk().save)


def test_the_state_files_keep_the_floor_and_read_older_files_without_it() -> None:
    import json

    from client_shim.state import ClientState
    from migrate.pool import PoolState
    from migrate.schedule import MSchedule

    pool = PoolState(bytes(16), counter_floor=123_456)
    assert PoolState.decode(pool.encode()).counter_floor == 123_456
    client = ClientState(bytes(16), 1, 5, bytes(32), MSchedule(2), {0: 9}, counter_floor=77)
    assert ClientState.decode(client.encode()).counter_floor == 77
    for state in (pool, client):
        older = json.loads(state.encode())
        del older["counter_floor"]
        assert type(state).decode(json.dumps(older).encode()).counter_floor == 0


def test_the_operator_keeps_its_floor_in_its_own_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from migrate.errors import ConfigError
    from roam_cli.commands.control import operator_counter_path, operator_counters

    first = Sealer(KEY, 0xFFFF_FFFF).keep_counters(operator_counters(tmp_path))
    used = first.next_counter(2_000_000_000.0)
    assert operator_counter_path(tmp_path).stat().st_mode & 0o777 == 0o600
    # The next command, its host's clock a day behind: still above every counter used.
    again = Sealer(KEY, 0xFFFF_FFFF).keep_counters(operator_counters(tmp_path))
    assert again.next_counter(2_000_000_000.0 - 86400) > used
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        Sealer(KEY, 1).keep_counters(operator_counters(blocked)).next_counter(1.0)
