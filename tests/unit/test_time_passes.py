"""Time as it passes: the pure core driven through simulated weeks, quiet gaps and clock steps.

Every other unit test lives for seconds of simulated time. Here schedules, gates, roaming
updates, leases, control messages, re-incarnation requests, checkpoints and connection
positions meet gaps of seconds to months, clocks stepped back and forward, and chains near
their end. Each simulated message runs inside ``bounded_step``: work that grows with the gap
fails the test. The replay window itself is covered in ``test_channel.py``; the hash chain's
traversal is only used through its public API (its own costs are another module's promise).
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from migrate.channel import Freshness, Kind, derive_key
from migrate.checkpoint import Checkpoint, TcpSnapshot, open_checkpoint, seal_checkpoint
from migrate.connstore import SEQ_MOD, unwrap
from migrate.control import ControlChannel, Revoke, Trigger
from migrate.errors import (
    InconsistentUpdateError,
    ReorderedMessageError,
    ReplayedMessageError,
    RoamError,
    StaleMessageError,
    SubscriptionExpiredError,
)
from migrate.gating import gate_at
from migrate.hashchain import KeyChain
from migrate.pool import ServerPool
from migrate.registration import ClientList, ClientRecord, Deployment, DeploymentSecret
from migrate.reincarnation import Phase, Request, request_opener, request_sealer
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams
from migrate.updates import (
    RELEARN_AFTER,
    ClientRoamingState,
    compose_update,
    seal_update,
    update_sealer,
)

from .budget import bounded_step
from .vectors import SERVERS

TOP = bytes(range(100, 132))
CHANNEL_KEY = bytes(range(32))
DEPLOYMENT_ID = bytes(16)
START = 1_700_000_000.0
DAY = 86_400.0
TICK = 1.0
M = 6  # epochs of 1..64 s, 32.5 s on average: a day is about 2700 epochs
LONG_CHAIN = 1 << 18  # about 97 days of such epochs


def params() -> ScheduleParams:
    return ScheduleParams(SERVERS, TICK, START, MSchedule(M), delta=0.05, gamma=0.05)


def server_schedule(length: int = LONG_CHAIN) -> EpochSchedule:
    return EpochSchedule(KeyChain(TOP, length), params())


def record(until: int, lease: int = 0) -> ClientRecord:
    return ClientRecord(
        "alice",
        3,
        ipaddress.ip_address("10.0.0.9"),
        47474,
        CHANNEL_KEY,
        until_epoch=until,
        lease_epochs=lease,
    )


def client_state(until: int, length: int = LONG_CHAIN) -> ClientRoamingState:
    chain = KeyChain(KeyChain(TOP, length).key(until), until)
    return ClientRoamingState(
        EpochSchedule(chain, params()),
        CHANNEL_KEY,
        DEPLOYMENT_ID,
        3,
        length,
        freshness=Freshness(max_age=5.0, max_skew=1.0),
    )


# --- roaming updates: quiet gaps --------------------------------------------------------------

gaps = st.floats(min_value=1.0, max_value=40 * DAY)
_SERVER: list[EpochSchedule] = []


def shared_server() -> EpochSchedule:
    """One long schedule for every example: its answers do not depend on its history (see
    ``test_gate_and_epoch_agree_with_a_fresh_schedule_through_clock_steps``)."""
    if not _SERVER:
        _SERVER.append(server_schedule())
    return _SERVER[0]


@pytest.mark.parametrize("quiet", [1.0, 3600.0, DAY, 7 * DAY, 30 * DAY], ids=str)
def test_an_update_after_weeks_of_quiet_costs_one_step(quiet):
    """A client asleep for weeks (laptop lid, a long outage) wakes up to one update.

    Found: the update's log-only ``correction`` (the new anchor minus the old prediction)
    walked the schedule from the epoch last asked about to the new anchor, epoch by epoch:
    1.1 s of CPU in the client's event loop for one update after 30 days, 0.2 s after a week.
    """
    server = shared_server()
    now = START + 10.0
    wake = now + quiet
    # A subscription that ends a little after the client wakes up: the chain's own walk from
    # its held key stays short, so what is measured is the update's handling.
    then = 2.0  # the next update, at the ordinary period
    until = server.epoch_at(wake + then).index + 8
    alice = record(until)
    client = client_state(until)
    sealer = update_sealer(CHANNEL_KEY, DEPLOYMENT_ID, 3, 0)
    client.receive(
        seal_update(sealer, compose_update(server, now, alice, server.chain.held_index), now), now
    )
    client.schedule.epoch_at(now)
    for gap in (quiet, then):
        now += gap
        message = seal_update(
            sealer, compose_update(server, now, alice, server.chain.held_index), now
        )
        with bounded_step(f"an update after {gap / DAY:.3f} days of quiet"):
            client.receive(message, now)
        ours, theirs = client.schedule.epoch_at(now), server.epoch_at(now)
        assert (ours.index, ours.server) == (theirs.index, theirs.server)
        assert ours.start == pytest.approx(theirs.start, abs=1e-3)


# --- roaming updates: clock steps -------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    step=st.one_of(st.floats(min_value=-250.0, max_value=-7.0), st.floats(7.0, 250.0)),
    stepped=st.sampled_from(["client", "servers"]),
    skew=st.floats(min_value=-100.0, max_value=100.0),
)
def test_updates_are_accepted_again_soon_after_a_clock_step(step, stepped, skew):
    """NTP (or an operator) steps the client's clock, or the servers', by seconds to minutes.

    Found: the offset estimate is the largest of the last samples, and only accepted updates
    are sampled; judged by the old estimate, every update after a step of more than
    ``max_age + max_skew`` (6 s) was stale, so the client refused all updates for ever (until
    restarted), in both directions. Now a few authentic new updates that agree on the new
    offset re-teach it, as at start.
    """
    server = server_schedule(20_000)
    alice = record(10_000)
    client = client_state(10_000, 20_000)
    sealer = update_sealer(CHANNEL_KEY, DEPLOYMENT_ID, 3, 0)
    period = 2.0
    now = START + 1000.0  # servers' clock
    for _ in range(4):
        now += period
        message = seal_update(
            sealer, compose_update(server, now, alice, server.chain.held_index), now
        )
        client.receive(message, now + skew)
    client_skew = skew + (step if stepped == "client" else 0.0)
    servers_step = step if stepped == "servers" else 0.0
    # Beyond ``initial_skew`` (300 s) between the clocks, a client cannot start either.
    assume(abs(servers_step - client_skew) < 290.0)
    refused = 0
    for _ in range(RELEARN_AFTER + 2):
        now += period
        stamped = now + servers_step  # what the servers' stepped clock says
        update = compose_update(server, stamped, alice, server.chain.held_index)
        message = seal_update(sealer, update, stamped)
        try:
            with bounded_step("an update after a clock step"):
                client.receive(message, now + client_skew)
        except StaleMessageError:
            refused += 1
            continue
        break
    else:
        pytest.fail(f"the client refused {refused} updates in a row after a {step:+.1f} s step")
    assert refused < RELEARN_AFTER
    # The client follows the servers' boundaries as their (stepped) clock now keeps them.
    local = now + client_skew
    current = client.schedule.epoch_at(local)
    assert current.index == server.epoch_at(now + servers_step).index
    assert current.start == pytest.approx(
        server.epoch(current.index).start - servers_step + client_skew, abs=0.05
    )


def test_a_replayed_update_never_teaches_a_clock_step():
    """One captured update, delayed and replayed many times, counts once and is refused;
    after the client re-learns a real step, the capture stays refused a week later."""
    server = server_schedule(20_000)
    alice = record(10_000)
    client = client_state(10_000, 20_000)
    sealer = update_sealer(CHANNEL_KEY, DEPLOYMENT_ID, 3, 0)
    now = START + 100.0
    client.receive(
        seal_update(sealer, compose_update(server, now, alice, server.chain.held_index), now), now
    )
    now += 2.0
    captured = seal_update(sealer, compose_update(server, now, alice, server.chain.held_index), now)
    for attempt in range(10 * RELEARN_AFTER):
        with pytest.raises(StaleMessageError):
            client.receive(captured, now + 30.0 + attempt)
    assert client.clock_offset == pytest.approx(0.0)
    step = 40.0  # a real step of the client's clock: fresh updates re-teach the offset
    for _ in range(RELEARN_AFTER + 1):
        now += 2.0
        message = seal_update(
            sealer, compose_update(server, now, alice, server.chain.held_index), now
        )
        try:
            client.receive(message, now + step)
        except StaleMessageError:
            continue
    assert client.clock_offset == pytest.approx(-step)
    for replay_at in (now + step + 1.0, now + step + 7 * DAY):
        with (
            bounded_step("a captured update replayed"),
            pytest.raises((ReplayedMessageError, ReorderedMessageError, StaleMessageError)),
        ):
            client.receive(captured, replay_at)


# --- schedules and gates ---------------------------------------------------------------------

times = st.lists(
    st.one_of(
        st.floats(min_value=0.001, max_value=120.0),  # ordinary progress
        st.floats(min_value=-3600.0, max_value=-0.001),  # the clock steps back
        st.floats(min_value=3600.0, max_value=2 * DAY),  # quiet, or a step forward
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=20, deadline=None)
@given(moves=times)
def test_gate_and_epoch_agree_with_a_fresh_schedule_through_clock_steps(moves):
    """The cursor and caches of a long-running schedule never change an answer: after any
    history of steps back and forward, a server's gate and the running epoch are those a
    freshly started server computes. Each question costs the epochs it walks, no more."""
    long_running = server_schedule(40_000)
    me = SERVERS[0]
    now = START + 1.0
    gate_at(long_running, me, now)  # the chain's first pebbling is paid at start, once
    # Inside the chain (past its last epoch no gate opens: tested below); about 1.6 days.
    last = server_schedule(40_000).epoch(40_000)
    for move in moves:
        now = min(max(START + 0.5, now + move), last.start + last.length / 2)
        before = long_running.cursor_epoch
        fresh = server_schedule(40_000)
        expected_epoch = fresh.epoch_at(now)
        expected_gate = gate_at(fresh, me, now)
        walked = abs(expected_epoch.index - before)
        with bounded_step(f"a gate after {move:+.1f} s", steps=2 + walked // 20):
            gate = gate_at(long_running, me, now)
        assert gate == expected_gate
        assert gate.until > now
        assert long_running.epoch_at(now) == expected_epoch


def test_a_gate_at_the_end_of_the_chain_says_so_in_one_step():
    """Past the last epoch of the chain no server may open: the question is answered with a
    typed error at once, not by a walk or a loop."""
    schedule = server_schedule(300)
    last = schedule.epoch(300)
    inside = last.start + last.length / 2
    with bounded_step("the gate in the last epoch"):
        gate = gate_at(schedule, last.server, inside)
    assert gate.open
    assert gate.epoch == 300
    assert gate.until <= last.end + 0.1
    for later in (last.end + 1.0, last.end + 365 * DAY):
        with (
            bounded_step("the gate after the chain's end"),
            pytest.raises(SubscriptionExpiredError),
        ):
            gate_at(schedule, last.server, later)


# --- leases ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    until=st.integers(1, 10**6),
    lease=st.integers(0, 10**5),
    expires=st.integers(0, 2 * 10**6),
    chain=st.integers(1, 2**32),
    epochs=st.lists(st.integers(1, 2**32), min_size=1, max_size=20),
)
def test_a_lease_never_shrinks_and_never_outlives_its_ceiling(until, lease, expires, chain, epochs):
    """Over any run of epochs, even far ahead: the grant never goes back (a client never loses
    a key it was given), never passes the chain or the client's expiry, and a revoked client
    keeps only what it was granted at subscription."""
    expires = max(expires, until) if expires else 0
    alice = ClientRecord(
        "alice",
        3,
        ipaddress.ip_address("10.0.0.9"),
        47474,
        CHANNEL_KEY,
        until_epoch=until,
        lease_epochs=lease,
        expires_epoch=expires,
    )
    ceiling = min(expires or chain, chain)
    previous = 0
    for epoch in sorted(epochs):
        grant = alice.grant_for(epoch, chain)
        assert grant >= previous
        assert grant <= max(until, ceiling)
        if lease == 0:
            assert grant == min(until, ceiling)
        previous = grant
    revoked = ClientRecord(
        "alice",
        3,
        ipaddress.ip_address("10.0.0.9"),
        47474,
        CHANNEL_KEY,
        until,
        lease,
        expires,
        revoked=True,
    )
    assert revoked.grant_for(max(epochs), chain) == min(until, ceiling)


def test_an_update_for_a_client_whose_keys_ended_long_ago_is_refused_at_once():
    """A subscription that ended weeks ago: composing its update is refused in one step."""
    server = server_schedule()
    alice = record(50)
    for later in (START + 1 * DAY, START + 20 * DAY):
        server.epoch_at(later)  # a running server's cursor follows time
        with (
            bounded_step("an update for an expired client"),
            pytest.raises(SubscriptionExpiredError),
        ):
            compose_update(server, later, alice, server.chain.held_index)


# --- group control ---------------------------------------------------------------------------

POOL_DEPLOYMENT = Deployment(
    deployment_id=bytes(range(16)),
    servers=SERVERS,
    vip=ipaddress.ip_address("10.99.0.1"),
    service_port=80,
    chain_length=40_000,
    m=MSchedule(3),
    tick=0.5,
    start=START,
    delta=0.05,
    gamma=0.05,
)
POOL_SECRET = DeploymentSecret(
    POOL_DEPLOYMENT.deployment_id, bytes(range(32)), bytes(range(32, 64))
)
ALICE = ClientRecord("alice", 1, ipaddress.ip_address("10.0.0.50"), 47474, bytes(32), 5000)


@pytest.mark.parametrize("distance", [-DAY, -120.0, 120.0, 3600.0, 30 * DAY, 3650 * DAY])
def test_a_trigger_far_from_now_is_refused_without_walking_the_schedule(distance):
    """Found: a trigger's time was used as given: the receiver walked the schedule to it
    (0.5 s to the end of a 20 000-epoch chain for a trigger a year ahead) and left its cursor
    there, so the next question about *now* walked all the way back."""
    pool = ServerPool(POOL_DEPLOYMENT, POOL_SECRET, ClientList(1, (ALICE,)), SERVERS[0])
    now = START + 100.0
    current = pool.schedule.epoch_at(now).index
    trigger = Trigger(current, current + 1, now + distance)
    with (
        bounded_step(f"a trigger {distance:+.0f} s away"),
        pytest.raises((InconsistentUpdateError, SubscriptionExpiredError)),
    ):
        pool.validate(trigger, now)
    with bounded_step("the next question about now"):
        assert pool.schedule.epoch_at(now).index == current


def test_a_trigger_made_now_is_still_taken():
    pool = ServerPool(POOL_DEPLOYMENT, POOL_SECRET, ClientList(1, (ALICE,)), SERVERS[0])
    now = START + 100.0
    trigger = pool.make_trigger(now)
    for delay in (0.0, 1.5, 9.0):
        pool.validate(trigger, now + delay)


def test_a_control_message_replayed_after_a_week_is_refused_in_one_step():
    sender = ControlChannel(POOL_SECRET.group_key, POOL_DEPLOYMENT.deployment_id, 1)
    receiver = ControlChannel(POOL_SECRET.group_key, POOL_DEPLOYMENT.deployment_id, 0)
    now = START + 10.0
    captured = sender.seal(Revoke(1), now)
    opened, _ = receiver.open(captured, now)
    receiver.accept(opened)
    later = now + 7 * DAY
    fresh = sender.seal(Revoke(1), later)
    with bounded_step("a control message after a week of quiet"):
        opened, _ = receiver.open(fresh, later)
        receiver.accept(opened)
    for message in (captured, fresh):
        with (
            bounded_step("a replayed control message"),
            pytest.raises((ReplayedMessageError, StaleMessageError)),
        ):
            receiver.open(message, later + 1.0)


# --- re-incarnation requests -------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(quiet=st.lists(gaps, min_size=1, max_size=4))
def test_requests_after_long_silences_are_taken_once_each(quiet):
    """A client silent for days sends a GO (any authentic request) now and then: each new one
    opens in one step, and none ever opens twice, however long after."""
    sealer = request_sealer(CHANNEL_KEY, DEPLOYMENT_ID, 3)
    opener = request_opener(CHANNEL_KEY, DEPLOYMENT_ID, 3)
    go = Request(Phase.GO, 7, 40000, 80, 0, 0, 0, b"", b"").encode()
    now = START
    sent: list[bytes] = []
    for gap in quiet:
        now += gap
        message = sealer.seal(Kind.REINCARNATE_REQUEST, go, now)
        with bounded_step(f"a request after {gap:.0f} s of silence"):
            opener.accept(opener.open(message, now))
        sent.append(message)
        for old in sent:
            with pytest.raises((ReplayedMessageError, StaleMessageError)):
                opener.open(old, now + 0.5)


# --- checkpoints and positions -----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    taken_at=st.floats(min_value=0.0, max_value=2**53 / 1e6 - 1.0),
    epoch=st.integers(1, 2**64 - 1),
    counter=st.integers(0, 2**64 - 1),
    positions=st.lists(st.integers(0, 2**63), min_size=2, max_size=2),
)
def test_a_checkpoint_taken_at_any_time_of_a_long_life_opens_as_it_was(
    taken_at, epoch, counter, positions
):
    """Times from 1970 to the year 2255, epochs and counters of a chain run for ever,
    positions of a connection that moved exabytes: sealed and opened, nothing changes."""
    fresh, pos = sorted(positions)
    checkpoint = Checkpoint(
        conn_id=bytes(16),
        client=("10.0.0.9", 40000),
        vport=80,
        epoch=epoch,
        counter=counter,
        taken_at=round(taken_at, 6),
        tcp=TcpSnapshot(1, 2, 1460, 7, 7, True, True, 5),
        codec="http",
        c2s_fresh=fresh,
        c2s_pos=pos,
        s2c_fresh=fresh,
        s2c_pos=pos,
        c2s_hash=bytes(32),
        s2c_hash=bytes(32),
        unmigratable=False,
    )
    key = derive_key(bytes(range(32)), "checkpoint")
    sealed = seal_checkpoint(checkpoint, key, DEPLOYMENT_ID, bytes)
    opened = open_checkpoint(sealed, key, DEPLOYMENT_ID)
    assert opened == checkpoint


@settings(max_examples=300, deadline=None)
@given(
    isn=st.integers(0, SEQ_MOD - 1),
    position=st.integers(0, 2**50),
    behind=st.integers(-(2**31) + 1, 2**31 - 1),
)
def test_positions_survive_any_number_of_sequence_wraps(isn, position, behind):
    """A connection that lives for months wraps its 32-bit sequence numbers many times: a
    segment within half the sequence space of what is known maps back to its exact position."""
    near = max(0, position + behind)
    seq = (isn + 1 + position) % SEQ_MOD
    with bounded_step("one segment's position"):
        assert unwrap(seq, isn, near) == position


def test_roam_errors_stay_typed():
    """Every refusal above is a ``RoamError`` the daemons log with its reason."""
    for error in (StaleMessageError, InconsistentUpdateError, SubscriptionExpiredError):
        assert issubclass(error, RoamError)


def test_a_checkpoint_time_past_2_to_the_32_seconds_keeps_its_microseconds():
    """Found by hypothesis: sealing multiplied the float by 10^6, which rounded twice."""
    checkpoint = Checkpoint(
        conn_id=bytes(16),
        client=("10.0.0.9", 40000),
        vport=80,
        epoch=1,
        counter=1,
        taken_at=4294967296.171391,
        tcp=TcpSnapshot(1, 2, 1460, 7, 7, True, True, 5),
        codec="http",
        c2s_fresh=0,
        c2s_pos=0,
        s2c_fresh=0,
        s2c_pos=0,
        c2s_hash=bytes(32),
        s2c_hash=bytes(32),
        unmigratable=False,
    )
    key = derive_key(bytes(range(32)), "checkpoint")
    opened = open_checkpoint(
        seal_checkpoint(checkpoint, key, DEPLOYMENT_ID, bytes), key, DEPLOYMENT_ID
    )
    assert opened.taken_at == checkpoint.taken_at
