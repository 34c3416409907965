"""Servers and a client driven against each other in memory: gating, threat, trigger, revoke."""

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.control import (
    OPERATOR,
    Ack,
    ControlChannel,
    Revoke,
    Strike,
    Threat,
    Trigger,
    decode_control,
    encode_control,
)
from migrate.endpoints import parse_server_list
from migrate.errors import (
    AuthenticationError,
    InconsistentUpdateError,
    MalformedMessageError,
    ReplayedMessageError,
    RevokedClientError,
    ScheduleError,
    SubscriptionExpiredError,
)
from migrate.gating import gate_at, next_switch
from migrate.pool import PoolState, ServerPool
from migrate.registration import Bundle, ClientList, ClientRecord, Deployment, DeploymentSecret
from migrate.schedule import EpochSchedule, MSchedule
from migrate.updates import ClientRoamingState, seal_update, update_sealer

SERVERS = parse_server_list("10.0.0.1:80,10.0.0.2:80,10.0.0.3:80")
START = 1_000_000.0
DEPLOYMENT = Deployment(
    deployment_id=bytes(range(16)),
    servers=SERVERS,
    vip=ipaddress.ip_address("10.99.0.1"),
    service_port=80,
    chain_length=20_000,
    m=MSchedule(3),
    tick=0.5,
    start=START,
    delta=0.05,
    gamma=0.05,
)
SECRET = DeploymentSecret(DEPLOYMENT.deployment_id, bytes(range(32)), bytes(range(32, 64)))
ALICE = ClientRecord("alice", 1, ipaddress.ip_address("10.0.0.50"), 47474, bytes(32), 5000)
CLIENTS = ClientList(1, (ALICE,))


def pools() -> list[ServerPool]:
    return [ServerPool(DEPLOYMENT, SECRET, CLIENTS, server) for server in SERVERS]


def client() -> ClientRoamingState:
    bundle = Bundle.issue(DEPLOYMENT, SECRET, ALICE, os.urandom)
    schedule = EpochSchedule(bundle.chain(), bundle.schedule_params())
    return ClientRoamingState(
        schedule, ALICE.channel_key, DEPLOYMENT.deployment_id, 1, DEPLOYMENT.chain_length
    )


def deliver(pool: ServerPool, state: ClientRoamingState, now: float) -> None:
    sealer = update_sealer(ALICE.channel_key, DEPLOYMENT.deployment_id, 1, pool.index)
    state.receive(seal_update(sealer, pool.update_for(ALICE, now), now), now)


@settings(max_examples=200, deadline=None)
@given(offset=st.floats(0, 5000))
def test_exactly_the_scheduled_server_is_open_outside_transitions(offset):
    now = START + offset
    servers = pools()
    schedule = servers[0].schedule
    epoch = schedule.epoch_at(now)
    states = [gate_at(pool.schedule, pool.me, now) for pool in servers]
    active = [pool.me for pool, state in zip(servers, states, strict=True) if state.active]
    assert active == [epoch.server]
    assert states[servers[0].deployment.servers.index(epoch.server)].open
    near_boundary = min(now - epoch.start, epoch.end - now) <= 0.1
    if not near_boundary:
        assert [s.open for s in states].count(True) == 1
    for state in states:
        assert state.until > now
        # The state really holds until ``until``.
        probe = now + (state.until - now) * 0.999
        assert gate_at(servers[0].schedule, SERVERS[states.index(state)], probe).open == state.open


def test_client_target_is_always_open():
    servers, state = pools(), client()
    now = START + 1.0
    deliver(servers[0], state, now)
    while now < START + 600:
        target = state.schedule.epoch_at(now).server
        assert gate_at(servers[SERVERS.index(target)].schedule, target, now).open
        now += 0.137


def test_next_switch_skips_epochs_on_the_same_server():
    schedule = pools()[0].schedule
    now = START + 10
    index, start, server = next_switch(schedule, now)
    current = schedule.epoch_at(now)
    assert server != current.server
    assert all(schedule.server_for(i) == current.server for i in range(current.index, index))
    assert start == schedule.start_of(index)


def test_a_pool_of_one_server_has_no_switch_and_says_so_at_once():
    from dataclasses import replace

    from .budget import bounded_step

    schedule = pools()[0].schedule
    one = EpochSchedule(
        schedule.chain, replace(schedule.params, servers=schedule.params.servers[:1])
    )
    with (
        bounded_step("the next switch of a one-server pool"),
        pytest.raises(ScheduleError, match="one server"),
    ):
        next_switch(one, START + 10)


def test_threat_change_takes_effect_everywhere_at_the_same_epoch():
    servers, state = pools(), client()
    now = START + 100.0
    current = servers[0].schedule.epoch_at(now).index
    threat = Threat(6, current + 4)
    for pool in servers:
        pool.apply(threat, now)
    deliver(servers[1], state, now + 0.01)
    for index in range(current, current + 40):
        starts = {pool.schedule.start_of(index) for pool in servers}
        assert len(starts) == 1
        assert state.schedule.start_of(index) == pytest.approx(starts.pop(), abs=0.02)
    assert servers[0].schedule.params.m.m_for(current + 4) == 6
    with pytest.raises(InconsistentUpdateError, match="after the current epoch"):
        servers[0].apply(Threat(2, current), now)


def test_reactive_trigger_moves_every_server_and_the_client():
    servers, state = pools(), client()
    now = START + 200.0
    deliver(servers[0], state, now - 5)
    before = servers[0].schedule.epoch_at(now)
    trigger = servers[2].make_trigger(now)
    assert trigger.leave_epoch == before.index
    for pool in servers:
        pool.apply(trigger, now + 0.001)
    after = servers[0].schedule.epoch_at(now + 0.01)
    assert after.index == trigger.next_epoch
    assert after.server != before.server
    assert after.start == now
    deliver(servers[1], state, now + 0.02)
    assert state.schedule.epoch_at(now + 0.03).index == trigger.next_epoch
    gates = [gate_at(pool.schedule, pool.me, now + 0.2) for pool in servers]
    assert [g.active for g in gates].count(True) == 1
    assert gates[SERVERS.index(after.server)].active
    # The old server closes after the transitional interval.
    old = SERVERS.index(before.server)
    assert not gate_at(servers[old].schedule, before.server, now + 0.2).open
    # A trigger that does not match our chain is refused.
    bogus = Trigger(after.index, after.index + 7, now + 1)
    with pytest.raises(InconsistentUpdateError):
        servers[0].apply(bogus, now + 1)


def test_state_survives_a_restart():
    pool = pools()[0]
    now = START + 50
    current = pool.schedule.epoch_at(now).index
    pool.apply(Threat(5, current + 3), now)
    pool.apply(pool.make_trigger(now), now)
    pool.apply(Revoke(1), now)
    saved = PoolState.decode(pool.state.encode())
    restarted = ServerPool(DEPLOYMENT, SECRET, CLIENTS, SERVERS[0], saved)
    for index in range(current + 1, current + 30):
        assert restarted.schedule.start_of(index) == pool.schedule.start_of(index)
    assert restarted.legitimate(current) == []
    with pytest.raises(RevokedClientError):
        restarted.update_for(ALICE, now)


def _epochs_where(pool, moves: bool) -> int:
    """The first epoch from 10 whose next epoch is on another server (``moves``) or on the
    same one."""
    server = pool.schedule.server_for
    return next(e for e in range(10, 10_000) if (server(e) != server(e + 1)) == moves)


def test_a_client_past_its_last_epoch_is_left_out_of_every_gate():
    # Issue 12, finding 2: the gate's list filtered revoked clients only.
    short = ClientRecord("bob", 2, ipaddress.ip_address("10.0.0.60"), 47474, bytes(32), 40)
    leased = ClientRecord(
        "carol", 3, ipaddress.ip_address("10.0.0.70"), 47474, bytes(32), 40, 10, 90
    )
    pool = ServerPool(DEPLOYMENT, SECRET, ClientList(1, (ALICE, short, leased)), SERVERS[0])
    names = lambda epoch: [c.name for c in pool.legitimate(epoch)]  # noqa: E731
    assert names(40) == ["alice", "bob", "carol"]
    assert names(41) == ["alice", "carol"]  # bob holds no key of epoch 41
    assert names(90) == ["alice", "carol"]  # carol's lease runs to its ceiling
    assert names(91) == ["alice"]
    assert names(5001) == []
    assert pool.admissible(2, 40)
    assert not pool.admissible(2, 41)
    assert pool.admissible(3, 90)
    assert not pool.admissible(3, 91)
    assert not pool.admissible(99, 1)  # unknown
    with pytest.raises(SubscriptionExpiredError, match="holds keys up to epoch 40"):
        pool.check_client_allowed(short, 41)
    pool.check_client_allowed(short, 40)
    pool.apply(Revoke(1), START + 1)
    assert not pool.admissible(1, 40)
    with pytest.raises(RevokedClientError):
        pool.check_client_allowed(ALICE, 40)


def test_rate_contract_strikes_then_revokes():
    pool = pools()[0]
    roam = _epochs_where(pool, moves=True)
    assert pool.report_offence(1, epoch=roam) == "strike"
    assert pool.report_offence(1, epoch=roam) == "strike"  # same epoch: one offence
    assert pool.blocked(roam) == {1}
    assert pool.blocked(roam + 1) == set()  # second chance after the roam
    assert pool.report_offence(1, epoch=roam + 2) == "revoke"


def test_a_block_lasts_until_the_service_roams():
    pool = pools()[0]
    stay = _epochs_where(pool, moves=False)
    pool.report_offence(1, epoch=stay)
    assert pool.blocked(stay + 1) == {1}  # the service is still here: still blocked
    leaves = next(
        e
        for e in range(stay + 1, 10_000)
        if pool.schedule.server_for(e) != pool.schedule.server_for(stay)
    )
    assert pool.blocked(leaves) == set()
    assert pool.blocked(stay - 1) == set()


def test_a_strike_at_another_server_counts_everywhere():
    now = START + 25.0
    current = pools()[0].schedule.epoch_at(now).index
    told, other = pools()[0], pools()[1]
    assert told.apply(Strike(1, current), now).endswith(f"epoch {current}")
    assert told.blocked(current) == set()  # blocked only where it offended
    assert told.report_offence(1, epoch=current + 3) == "revoke"  # its second offence
    assert other.report_offence(1, epoch=current) == "strike"
    with pytest.raises(InconsistentUpdateError, match="unknown client"):
        other.apply(Strike(99, current), now)
    fresh = pools()[2]
    with pytest.raises(InconsistentUpdateError, match="runs here"):
        fresh.apply(Strike(1, current + 50), now)
    assert fresh.strikes == {}


def test_control_channel_roundtrip_and_rejections():
    operator = ControlChannel(SECRET.group_key, DEPLOYMENT.deployment_id, OPERATOR)
    server = ControlChannel(SECRET.group_key, DEPLOYMENT.deployment_id, 0)
    message = operator.seal(Threat(4, 99), now=START)
    opened, parsed = server.open(message, now=START)
    assert parsed == Threat(4, 99)
    server.accept(opened)
    with pytest.raises(ReplayedMessageError):
        server.open(message, now=START)
    other = ControlChannel(bytes(32), DEPLOYMENT.deployment_id, OPERATOR)
    with pytest.raises(AuthenticationError):
        server.open(other.seal(Threat(4, 99), now=START), now=START)


@pytest.mark.parametrize(
    "message", [Threat(3, 5), Trigger(3, 9, 1234.5), Revoke(7), Ack(2**40), Strike(7, 12)]
)
def test_control_encoding_roundtrip(message):
    assert decode_control(encode_control(message)) == message


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", "empty"),
        (b"\x09", "unknown"),
        (b"\x01\x03", "expected"),
        (b"\x01\x40" + (5).to_bytes(8, "big"), "1..32"),
        (b"\x02" + (5).to_bytes(8, "big") + (5).to_bytes(8, "big") + bytes(8), "later"),
        (b"\x03" + bytes(4), "client id 0"),
        (b"\x05" + bytes(12), "client id 0 or epoch 0"),
        (b"\x05" + bytes(11), "expected 12"),
    ],
)
def test_control_parser_is_strict(data, text):
    with pytest.raises(MalformedMessageError, match=text):
        decode_control(data)
