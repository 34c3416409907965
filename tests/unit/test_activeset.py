"""k of N active servers: PROTOCOL.md section 4's sets, assignments and windows."""

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.activeset import (
    ActiveSchedule,
    ActiveSetError,
    EpochSet,
    SetWindow,
    active_indices,
    assigned_index,
    boundary,
    check_active,
    set_windows,
)
from migrate.endpoints import Endpoint, parse_server_list
from migrate.errors import ConfigError
from migrate.hashchain import KeyChain
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams

from .vectors import CHAIN_KEY, CHAIN_LENGTH, START, TICK, M

SIX = parse_server_list(",".join(f"10.0.0.{i}:80" for i in range(1, 7)))

# PROTOCOL.md section 4's test vector, verbatim: (epoch, active set, clients 1, 2, 7).
SECTION4_TABLE = [
    (1, (".6", ".5", ".2"), (".2", ".6", ".6")),
    (2, (".6", ".3", ".5"), (".3", ".3", ".6")),
    (3, (".6", ".4", ".5"), (".5", ".6", ".6")),
    (4, (".6", ".5", ".4"), (".5", ".4", ".6")),
    (5, (".1", ".2", ".5"), (".2", ".5", ".5")),
]


def server(short: str) -> Endpoint:
    return Endpoint.parse(f"10.0.0{short}:80")


def schedule(servers=SIX, key=CHAIN_KEY, length=CHAIN_LENGTH, delta=0.0, gamma=0.0):
    params = ScheduleParams(servers, TICK, START, MSchedule(M), delta, gamma)
    return EpochSchedule(KeyChain(key, length), params)


def test_section4_test_vector():
    active = ActiveSchedule(schedule(), 3)
    for epoch, members, clients in SECTION4_TABLE:
        assert active.active(epoch) == tuple(server(s) for s in members), epoch
        got = tuple(active.assigned(epoch, c) for c in (1, 2, 7))
        assert got == tuple(server(s) for s in clients), epoch


def test_h3_h4_are_the_protocol_formulas():
    # Recompute epoch 1's set by hand from the formulas, independent of the module.
    key = KeyChain(CHAIN_KEY, CHAIN_LENGTH).key(1)

    def top64(data: bytes) -> int:
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")

    first = top64(b"\x02" + key) % 6
    members = [first]
    j = 0
    while len(members) < 3:
        x = top64(b"\x03" + key + struct.pack(">I", j)) % 6
        if x not in members:
            members.append(x)
        j += 1
    assert active_indices(key, 6, 3) == tuple(members)
    assert (
        assigned_index(key, members, 7) == members[top64(b"\x04" + key + struct.pack(">I", 7)) % 3]
    )


def test_k1_is_section1_over_many_epochs():
    plain = schedule()
    active = ActiveSchedule(schedule(), 1)
    for epoch in range(1, 401):
        expected = plain.server_for(epoch)
        assert active.active(epoch) == (expected,)
        for client in (1, 2, 7, 1000, 0xFFFF_FFFE):
            assert active.assigned(epoch, client) == expected


@settings(max_examples=40, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    servers=st.integers(1, 40),
    data=st.data(),
)
def test_sets_have_k_distinct_members_led_by_s_i(key, servers, data):
    k = data.draw(st.integers(1, servers))
    endpoints = tuple(Endpoint.parse(f"10.1.{i // 250}.{i % 250 + 1}:80") for i in range(servers))
    plain = schedule(endpoints, key, 50)
    active = ActiveSchedule(schedule(endpoints, key, 50), k)
    for epoch in (1, 2, 25, 50):
        members = active.active(epoch)
        assert len(members) == k
        assert len(set(members)) == k
        assert members[0] == plain.server_for(epoch)
        # Deterministic: a second computation, and one from a client's shorter key, agree.
        assert active.active(epoch) == members
        client_side = ActiveSchedule(
            EpochSchedule(KeyChain(KeyChain(key, 50).key(epoch), epoch), plain.params), k
        )
        assert client_side.active(epoch) == members


@settings(max_examples=40, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    servers=st.integers(1, 12),
    clients=st.lists(st.integers(1, 0xFFFF_FFFE), min_size=1, max_size=20),
    data=st.data(),
)
def test_assignments_stay_in_the_set_and_agree(key, servers, clients, data):
    k = data.draw(st.integers(1, servers))
    endpoints = tuple(Endpoint.parse(f"10.2.0.{i + 1}:80") for i in range(servers))
    server_side = ActiveSchedule(schedule(endpoints, key, 30), k)
    for epoch in (1, 17, 30):
        members = server_side.active(epoch)
        client_key = KeyChain(key, 30).key(epoch)
        client_side = ActiveSchedule(
            EpochSchedule(KeyChain(client_key, epoch), server_side.schedule.params), k
        )
        for client in clients:
            assigned = server_side.assigned(epoch, client)
            assert assigned in members
            assert client_side.assigned(epoch, client) == assigned


def test_assignments_spread_over_the_set():
    # Re-drawn every epoch: over many epochs a client meets every member position.
    active = ActiveSchedule(schedule(), 3)
    positions = {active.active(e).index(active.assigned(e, 7)) for e in range(1, 60)}
    assert positions == {0, 1, 2}


@pytest.mark.parametrize("k", [0, -1, 7, 100])
def test_k_outside_1_to_n_is_refused(k):
    with pytest.raises(ActiveSetError, match=r"1\.\.6") as caught:
        ActiveSchedule(schedule(), k)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_k_must_be_an_integer():
    with pytest.raises(ActiveSetError, match="integer"):
        check_active(True, 6)  # type: ignore[arg-type]


@pytest.mark.parametrize("client", [0, -3, 0xFFFF_FFFF, 1 << 40])
def test_client_id_outside_range_is_refused(client):
    with pytest.raises(ActiveSetError, match="client id"):
        ActiveSchedule(schedule(), 3).assigned(1, client)


def test_k_equals_n_draws_every_server():
    assert sorted(ActiveSchedule(schedule(), 6).active(3)) == sorted(SIX)


# -- windows ---------------------------------------------------------------------------------


def test_boundary_rule():
    change = boundary((1, 2, 3), (3, 4, 1), start=100.0, delta=0.5, gamma=0.25)
    assert change.opens == {4: 99.5}
    assert change.closes == {2: 100.75}
    assert change.stays == frozenset({1, 3})


def test_windows_over_consecutive_epochs():
    epochs = [
        EpochSet(1, 0.0, 10.0, (0, 1)),
        EpochSet(2, 10.0, 25.0, (1, 2)),
        EpochSet(3, 25.0, 30.0, (2, 1)),
        EpochSet(4, 30.0, 42.0, (0, 3)),
    ]
    windows = set_windows(epochs, delta=1.0, gamma=0.5)
    assert windows == [
        SetWindow(0, 1, 1, -1.0, 11.5),
        SetWindow(1, 1, 3, -1.0, 31.5),  # in epochs 1-3: never closes between them
        SetWindow(2, 2, 3, 9.0, 31.5),
        SetWindow(0, 4, 4, 29.0, 43.5),  # leaves at 2, joins again at 4
        SetWindow(3, 4, 4, 29.0, 43.5),
    ]


def test_windows_refuse_a_gap():
    with pytest.raises(ValueError, match="does not follow"):
        set_windows([EpochSet(1, 0.0, 1.0, (0,)), EpochSet(3, 2.0, 3.0, (0,))], 0.0, 0.0)


def test_k1_windows_are_section1_windows_merged_over_runs():
    plain = schedule(delta=0.3, gamma=0.2)
    active = ActiveSchedule(schedule(delta=0.3, gamma=0.2), 1)
    epochs = [active.epoch_set(e) for e in range(1, 200)]
    windows = set_windows(epochs, 0.3, 0.2)
    for window in windows:
        if window.last == 199:
            continue  # cut at the last epoch given
        first = plain.window(window.first)
        assert window.opens == first.opens
        assert window.closes == plain.served_until(window.first, window.closes)
        assert plain.window(window.last).closes == window.closes
        assert plain.server_for(window.last + 1) != plain.server_for(window.last)


def test_open_servers_near_a_boundary():
    active = ActiveSchedule(schedule(delta=0.5, gamma=0.5), 3)
    # Epoch 4 starts at 117.0: set (.6, .4, .5) -> (.6, .5, .4), nothing moves.
    assert active.open_servers(116.9) == {server(".6"), server(".4"), server(".5")}
    # Epoch 5 starts at 170.0: (.6, .5, .4) -> (.1, .2, .5).
    assert active.open_servers(169.0) == {server(".6"), server(".5"), server(".4")}
    assert active.open_servers(169.6) == {
        server(s) for s in (".6", ".5", ".4", ".1", ".2")
    }  # joiners open at T - delta
    assert active.open_servers(170.9) == {
        server(s) for s in (".6", ".5", ".4", ".1", ".2")
    }  # leavers close at T + delta + gamma
    assert active.open_servers(171.0) == {server(".1"), server(".2"), server(".5")}


def test_k1_open_servers_match_section1():
    plain = schedule(delta=0.5, gamma=0.5)
    active = ActiveSchedule(schedule(delta=0.5, gamma=0.5), 1)
    for now in [x * 0.7 for x in range(0, 600)]:
        expected = {w.server for w in plain.open_windows(now)}
        assert active.open_servers(now) == expected, now


def test_assignments_of_a_span_match_the_schedule():
    from migrate.activeset import assignments
    from migrate.errors import KeyNotHeldError

    active = ActiveSchedule(schedule(), 3)
    found = assignments(KeyChain(CHAIN_KEY, CHAIN_LENGTH), 990, 1000, 6, 3)
    assert sorted(found) == list(range(990, 1001))
    for epoch, facts in found.items():
        assert tuple(SIX[i] for i in facts.active) == active.active(epoch)
        assert SIX[facts.server_of(5)] == active.assigned(epoch, 5)
    with pytest.raises(KeyNotHeldError):
        assignments(KeyChain(CHAIN_KEY, CHAIN_LENGTH), 999, 1001, 6, 3)
    with pytest.raises(ActiveSetError, match="span"):
        assignments(KeyChain(CHAIN_KEY, CHAIN_LENGTH), 5, 4, 6, 3)


def test_a_server_admits_its_assigned_clients_and_both_admit_near_a_boundary():
    active = ActiveSchedule(schedule(delta=0.5, gamma=0.5), 3)
    # Epoch 1 (0..48): client 1 on .2, client 2 on .6; epoch 2 (48..88): both on .3.
    assert active.admits(server(".2"), 1, 10.0)
    assert not active.admits(server(".6"), 1, 10.0)
    assert active.admits(server(".6"), 2, 10.0)
    assert not active.admits(server(".3"), 1, 10.0)
    assert active.admits(server(".3"), 1, 47.6)  # the new server opens delta early
    assert active.admits(server(".2"), 1, 48.9)  # the old one closes delta + gamma late
    assert not active.admits(server(".2"), 1, 49.0)
    assert active.admits(server(".3"), 2, 60.0)
    assert not active.admits(server(".5"), 2, 60.0)  # in the set, but not client 2's


@settings(max_examples=30, deadline=None)
@given(now=st.floats(0.0, 2000.0), client=st.integers(1, 50))
def test_every_client_is_admitted_by_exactly_its_server_mid_epoch(now, client):
    active = ActiveSchedule(schedule(delta=0.2, gamma=0.2), 3)
    epoch = active.schedule.epoch_at(now)
    if not epoch.start + 0.4 <= now < epoch.end - 0.2:
        return  # near a boundary two servers admit it
    admitting = [s for s in SIX if active.admits(s, client, now)]
    assert admitting == [active.assigned(epoch.index, client)]
