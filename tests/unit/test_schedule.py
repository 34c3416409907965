import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.endpoints import Endpoint, parse_server_list
from migrate.errors import ConfigError, RoamError, ScheduleError, SubscriptionExpiredError
from migrate.hashchain import KeyChain
from migrate.schedule import MAX_RUN_WALK, Anchor, EpochSchedule, MSchedule, ScheduleParams

from .vectors import CHAIN_KEY, CHAIN_LENGTH, SERVERS, START, TABLE, TICK, M


def vector_schedule(**overrides) -> EpochSchedule:
    params = {"servers": SERVERS, "tick": TICK, "start": START, "m": MSchedule(M)}
    params.update(overrides)
    return EpochSchedule(KeyChain(CHAIN_KEY, CHAIN_LENGTH), ScheduleParams(**params))


def test_public_vector_table():
    schedule = vector_schedule()
    got = [(e.index, e.start, e.length, str(e.server)) for e in schedule.epochs(1, 5)]
    assert got == TABLE


def test_epoch_at_follows_the_table_both_ways():
    schedule = vector_schedule()
    assert schedule.epoch_at(0.0).index == 1
    assert schedule.epoch_at(47.999).index == 1
    assert schedule.epoch_at(48.0).index == 2
    assert schedule.epoch_at(200.0).index == 5
    assert schedule.epoch_at(100.0).index == 3  # walking backwards from the cursor
    assert schedule.epoch_at(0.5).index == 1
    with pytest.raises(ScheduleError, match="before"):
        schedule.epoch_at(-1.0)


def test_after_the_held_key_the_schedule_refuses():
    chain = KeyChain(CHAIN_KEY, CHAIN_LENGTH)
    schedule = EpochSchedule(
        KeyChain(chain.key(3), 3), ScheduleParams(SERVERS, TICK, START, MSchedule(M))
    )
    assert schedule.epoch_at(116.9).index == 3
    with pytest.raises(SubscriptionExpiredError, match="epoch 4"):
        schedule.epoch_at(117.0)
    with pytest.raises(SubscriptionExpiredError):
        schedule.server_for(4)


def test_keys_held_by_a_client_give_the_same_schedule():
    full = vector_schedule()
    client = EpochSchedule(
        KeyChain(KeyChain(CHAIN_KEY, CHAIN_LENGTH).key(500), 500),
        ScheduleParams(SERVERS, TICK, START, MSchedule(M)),
    )
    assert list(full.epochs(1, 40)) == list(client.epochs(1, 40))


@settings(max_examples=60, deadline=None)
@given(
    top=st.binary(min_size=32, max_size=32),
    m=st.integers(1, 12),
    tick=st.sampled_from([0.01, 0.1, 0.25, 1.0, 3.0]),
    start=st.floats(0, 2e9),
    servers=st.integers(1, 7),
    data=st.data(),
)
def test_schedule_is_monotone_and_covers_time(top, m, tick, start, servers, data):
    pool = tuple(Endpoint.parse(f"10.1.0.{i + 1}:443") for i in range(servers))
    schedule = EpochSchedule(KeyChain(top, 200), ScheduleParams(pool, tick, start, MSchedule(m)))
    previous = None
    for epoch in schedule.epochs(1, 60):
        assert tick <= epoch.length <= (2**m) * tick
        assert epoch.server in pool
        if previous is not None:
            assert epoch.start == pytest.approx(previous.end, abs=1e-6)
            assert epoch.start > previous.start
        previous = epoch
    # Every instant in range belongs to exactly the epoch whose interval contains it.
    offset = data.draw(st.floats(0, previous.end - start - 1e-3))
    now = start + offset
    found = schedule.epoch_at(now)
    assert found.start <= now < found.end + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    top=st.binary(min_size=32, max_size=32),
    times=st.lists(st.floats(-20.0, 700.0), min_size=1, max_size=3),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("at"), st.integers(0, 2)),
            st.tuples(st.just("anchor"), st.integers(1, 150), st.floats(0.0, 300.0)),
            st.tuples(st.just("m"), st.integers(1, 6)),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_a_schedule_asked_again_and_again_answers_as_a_fresh_one(top, times, steps):
    """``epoch_at`` keeps its last answer (asked for every connection and every 20 ms): kept
    across any sequence of questions (the same few instants again and again), re-anchorings
    and m changes, it answers as a schedule that never kept anything."""
    pool = tuple(Endpoint.parse(f"10.1.0.{i + 1}:443") for i in range(3))
    kept = EpochSchedule(KeyChain(top, 200), ScheduleParams(pool, 1.0, 0.0, MSchedule(2)))
    anchor, m = None, MSchedule(2)
    for step in steps:
        if step[0] == "anchor":
            anchor = Anchor(step[1], step[2])
            kept.reanchor(anchor)
        elif step[0] == "m":
            m = MSchedule(step[1])
            kept.set_m_schedule(m)
        now = times[step[1] % len(times)] if step[0] == "at" else times[0]
        fresh = EpochSchedule(KeyChain(top, 200), ScheduleParams(pool, 1.0, 0.0, m), anchor)
        try:
            expected: object = fresh.epoch_at(now)
        except RoamError as error:
            expected = type(error)
        try:
            answer: object = kept.epoch_at(now)
        except RoamError as error:
            answer = type(error)
        assert answer == expected


def test_m_change_applies_from_its_epoch_only():
    base = vector_schedule()
    changed = vector_schedule(m=MSchedule(M, ((4, 2),)))
    for index in range(1, 4):
        assert changed.epoch(index) == base.epoch(index)
    assert changed.length(4) <= 4 * TICK
    assert changed.length(5) <= 4 * TICK
    assert changed.start_of(5) == changed.start_of(4) + changed.length(4)


def test_m_schedule_rules():
    schedule = MSchedule(6)
    later = schedule.announce(8, 10, current_epoch=5)
    assert later.m_for(9) == 6
    assert later.m_for(10) == 8
    # A change at an earlier epoch supersedes every later one.
    again = later.announce(4, 7, current_epoch=5)
    assert again.m_for(7) == 4
    assert again.m_for(12) == 4
    with pytest.raises(ScheduleError, match="after the current epoch"):
        schedule.announce(8, 5, current_epoch=5)
    with pytest.raises(ConfigError, match=r"1\.\.32"):
        MSchedule(33)
    with pytest.raises(ConfigError):
        MSchedule(6, ((1, 4),))
    assert MSchedule.from_mapping(again.as_mapping()) == again
    # Re-stating the m already in force is not a change.
    assert schedule.merged(6, 3) == schedule


def test_anchor_moves_the_schedule_in_time():
    schedule = vector_schedule()
    schedule.reanchor(Anchor(3, 1000.0))
    assert schedule.start_of(3) == 1000.0
    assert schedule.start_of(4) == 1029.0
    assert schedule.start_of(2) == 960.0
    assert schedule.epoch_at(1030.0).index == 4


def test_windows_open_early_and_close_late():
    schedule = vector_schedule(delta=0.5, gamma=0.25)
    window = schedule.window(5)
    assert (window.opens, window.closes) == (170.0 - 0.5, 214.0 + 0.75)
    near_boundary = schedule.open_windows(169.8)
    assert {w.epoch for w in near_boundary} == {4, 5}
    assert schedule.is_open(Endpoint.parse("10.0.0.1:80"), 169.8)
    assert not schedule.is_open(Endpoint.parse("10.0.0.1:80"), 169.0)
    assert schedule.is_open(Endpoint.parse("10.0.0.3:80"), 170.7)
    assert not schedule.is_open(Endpoint.parse("10.0.0.3:80"), 170.8)
    assert not schedule.is_open(Endpoint.parse("10.0.0.2:80"), 100.0)


def test_a_server_serving_the_next_epochs_too_keeps_its_gate_open_through_them():
    # Epochs 26, 27 and 28 are all 10.0.0.2's (then 29 is 10.0.0.1's): a hand-over for 26
    # that ends late, in 27 or 28, still finds that server's gate open.
    schedule = vector_schedule(delta=0.5, gamma=0.25)
    run_end = schedule.window(28).closes
    assert run_end == 991.0 + 0.75
    assert schedule.served_until(26, 870.0) == schedule.window(26).closes  # no walk needed
    assert schedule.served_until(26, 880.0) == schedule.window(27).closes
    assert schedule.served_until(26, 950.0) == run_end
    assert schedule.served_until(26, 5000.0) == run_end  # the run ended: it stops there
    # An epoch whose successor is another server's: its own window.
    assert schedule.served_until(5, 400.0) == schedule.window(5).closes


def test_the_gate_run_walk_is_bounded():
    # One server: every epoch is its own, and the run never ends; the walk stops all the same.
    schedule = vector_schedule(servers=[Endpoint.parse("10.0.0.9:80")])
    closes = schedule.served_until(1, 1e9)
    assert closes == schedule.window(1 + MAX_RUN_WALK).closes


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tick", 0.0, "tick"),
        ("tick", float("nan"), "tick"),
        ("delta", -1.0, "delta"),
        ("start", float("inf"), "start"),
        ("servers", (), "empty"),
    ],
)
def test_bad_parameters_are_refused(field, value, message):
    params = {"servers": SERVERS, "tick": TICK, "start": START, "m": MSchedule(M)}
    params[field] = value
    with pytest.raises(ConfigError, match=message):
        ScheduleParams(**params)


def test_server_list_parsing():
    assert [str(s) for s in parse_server_list("10.0.0.1:80,[fd00::1]:443")] == [
        "10.0.0.1:80",
        "[fd00::1]:443",
    ]
    for bad in [
        "",
        "10.0.0.1",
        "10.0.0.1:0",
        "10.0.0.1:80,",
        "host:80",
        "10.0.0.1:80,10.0.0.1:80",
        "10.0.0.256:80",
        "10.0.0.1:x",
    ]:
        with pytest.raises(ConfigError):
            parse_server_list(bad)
