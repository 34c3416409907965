import copy
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.channel import Freshness, Kind
from migrate.errors import (
    AuthenticationError,
    InconsistentUpdateError,
    InvalidKeyExtensionError,
    MalformedMessageError,
    ReorderedMessageError,
    ReplayedMessageError,
    RevokedClientError,
    StaleMessageError,
    SubscriptionExpiredError,
)
from migrate.hashchain import KeyChain
from migrate.registration import ClientRecord
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams
from migrate.updates import (
    ClientRoamingState,
    EpochSync,
    KeyExtension,
    MChange,
    RoamingUpdate,
    compose_update,
    decode_update,
    encode_update,
    seal_update,
    update_sealer,
)

from .vectors import SERVERS

TOP = bytes(range(100, 132))
N = 5000
DEPLOYMENT = bytes(16)
CHANNEL_KEY = bytes(range(32))
START = 1_000_000.0
TICK = 0.5


def record(**changes) -> ClientRecord:
    fields = {
        "name": "alice",
        "client_id": 3,
        "address": ipaddress.ip_address("10.0.0.9"),
        "roaming_port": 47474,
        "channel_key": CHANNEL_KEY,
        "until_epoch": 400,
    }
    fields.update(changes)
    return ClientRecord(**fields)


def server_schedule(m: MSchedule | None = None) -> EpochSchedule:
    params = ScheduleParams(SERVERS, TICK, START, m or MSchedule(4))
    return EpochSchedule(KeyChain(TOP, N), params)


def client_state(until=400, client_id=3) -> ClientRoamingState:
    key = KeyChain(TOP, N).key(until)
    params = ScheduleParams(SERVERS, TICK, START, MSchedule(4))
    schedule = EpochSchedule(KeyChain(key, until), params)
    return ClientRoamingState(
        schedule,
        CHANNEL_KEY,
        DEPLOYMENT,
        client_id,
        N,
        freshness=Freshness(max_age=5.0, max_skew=1.0),
    )


def snapshot(state: ClientRoamingState):
    return (
        state.schedule.chain.held_index,
        state.schedule.anchor,
        state.schedule.params.m,
        copy.deepcopy({s: (w.highest, w.bitmap) for s, w in state.opener.windows.items()}),
    )


def sealed(update: RoamingUpdate, now: float, sender=0) -> bytes:
    return seal_update(update_sealer(CHANNEL_KEY, DEPLOYMENT, 3, sender), update, now)


# --- wire format -------------------------------------------------------------------------


def _update_or_none(m_changes, sync, extension):
    if not (m_changes or sync or extension):
        return None
    return RoamingUpdate(m_changes, sync, extension)


updates = st.builds(
    _update_or_none,
    m_changes=st.lists(
        st.builds(MChange, st.integers(1, 32), st.integers(2, 2**63)), max_size=8
    ).map(tuple),
    sync=st.none()
    | st.builds(
        EpochSync,
        st.integers(1, 2**63),
        st.integers(1, 2**63),
        st.integers(-(2**40), 2**40).map(lambda us: us / 1_000_000),
    ),
    extension=st.none()
    | st.builds(KeyExtension, st.integers(1, 2**63), st.binary(min_size=32, max_size=32)),
).filter(lambda u: u is not None)


@settings(max_examples=300)
@given(update=updates)
def test_encode_decode_roundtrip(update):
    assert decode_update(encode_update(update)) == update


@settings(max_examples=300)
@given(update=updates, cut=st.integers(min_value=0))
def test_truncation_is_always_detected(update, cut):
    data = encode_update(update)
    cut %= len(data)
    with pytest.raises(MalformedMessageError):
        decode_update(data[:cut])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x00", "at least one"),
        (b"\x01\x09\x00\x00", "unknown"),
        (b"\x01\x01\x00\x08" + bytes(8), "length"),
        (b"\x01\x01\x00\x09\x21" + (5).to_bytes(8, "big"), "1..32"),
        (b"\x01\x01\x00\x09\x04" + (1).to_bytes(8, "big"), ">= 2"),
        (encode_update(RoamingUpdate(sync=EpochSync(1, 2, 0.5))) + b"\x00", "trailing"),
    ],
)
def test_parser_is_strict(data, message):
    with pytest.raises(MalformedMessageError, match=message):
        decode_update(data)


def test_two_syncs_are_refused():
    one = encode_update(RoamingUpdate(sync=EpochSync(1, 2, 0.5)))
    doubled = b"\x02" + one[1:] + one[1:]
    with pytest.raises(MalformedMessageError, match="two epoch syncs"):
        decode_update(doubled)


# --- the client's state ------------------------------------------------------------------


def test_sync_corrects_a_skewed_client_clock():
    server = server_schedule()
    now = START + 123.4
    update = compose_update(server, now, record(), N)
    client = client_state()
    skew = 40.0  # the client's clock is 40 s ahead
    outcome = client.receive(sealed(update, now), now + skew)
    assert outcome.anchor is not None
    assert outcome.correction == pytest.approx(skew)
    expected = server.epoch_at(now)
    got = client.schedule.epoch_at(now + skew)
    assert got.index == expected.index
    assert got.start == pytest.approx(expected.start + skew)
    for index in range(expected.index, expected.index + 30):
        assert client.schedule.start_of(index) == pytest.approx(server.start_of(index) + skew)
        assert client.schedule.server_for(index) == server.server_for(index)


def test_key_extension_within_policy():
    server = server_schedule()
    now = START + 60.0
    current = server.epoch_at(now).index
    update = compose_update(server, now, record(lease_epochs=1000), N)
    assert update.extension is not None
    assert update.extension.index == current + 1000
    client = client_state()
    outcome = client.receive(sealed(update, now), now)
    assert outcome.key_extended_to == current + 1000
    assert client.schedule.chain.held_index == current + 1000
    assert client.schedule.server_for(current + 1000) == server.server_for(current + 1000)


def test_no_extension_without_lease_and_none_for_revoked():
    server = server_schedule()
    assert compose_update(server, START + 10, record(), N).extension is None
    with pytest.raises(RevokedClientError):
        compose_update(server, START + 10, record(revoked=True, lease_epochs=50), N)


def test_expired_client_cannot_be_synced():
    server = server_schedule()
    late = server.start_of(450)
    with pytest.raises(SubscriptionExpiredError):
        compose_update(server, late, record(until_epoch=400), N)


def test_m_change_reaches_the_client_and_both_agree():
    now = START + 30.0
    server = server_schedule()
    current = server.epoch_at(now).index
    changed = server.params.m.announce(7, current + 3, current)
    server.set_m_schedule(changed)
    update = compose_update(server, now, record(), N)
    assert MChange(7, current + 3) in update.m_changes
    client = client_state()
    outcome = client.receive(sealed(update, now), now)
    assert outcome.m_schedule_changed
    assert client.schedule.params.m == changed
    for index in range(current, current + 20):
        assert client.schedule.start_of(index) == pytest.approx(server.start_of(index))


def test_client_that_missed_an_m_change_is_corrected_after_it_took_effect():
    server = server_schedule()
    server.set_m_schedule(MSchedule(4, ((5, 9),)))
    now = server.start_of(40) + 0.1
    update = compose_update(server, now, record(), N)
    assert update.m_changes == (MChange(9, 5),)
    client = client_state()  # still believes m = 4 everywhere
    client.receive(sealed(update, now), now)
    for index in range(40, 60):
        assert client.schedule.start_of(index) == pytest.approx(server.start_of(index))


def test_sync_when_target_is_before_current_epoch():
    server = server_schedule()
    now = server.start_of(400) + 0.1  # at the end of the client's keys: j == r
    update = compose_update(server, now, record(until_epoch=400), N)
    assert update.sync.target == update.sync.current == 400
    client = client_state(until=400)
    client.receive(sealed(update, now), now)
    assert client.schedule.epoch_at(now).index == 400


def rejected_without_change(client, message, now, error):
    before = snapshot(client)
    with pytest.raises(error):
        client.receive(message, now)
    assert snapshot(client) == before


def test_forged_truncated_replayed_reordered_and_stale_updates_change_nothing():
    server = server_schedule()
    now = START + 50.0
    client = client_state()
    first = sealed(compose_update(server, now, record(), N), now)
    second = sealed(compose_update(server, now + 1, record(), N), now + 1)
    forged = bytearray(first)
    forged[-1] ^= 1
    rejected_without_change(client, bytes(forged), now, AuthenticationError)
    rejected_without_change(client, first[:30], now, MalformedMessageError)
    client.receive(second, now + 1)
    rejected_without_change(client, second, now + 1.1, ReplayedMessageError)
    rejected_without_change(client, first, now + 1.2, ReorderedMessageError)
    old = sealed(compose_update(server, now + 2, record(), N), now + 2)
    rejected_without_change(client, old, now + 30, StaleMessageError)


def test_update_for_another_client_does_not_open():
    server = server_schedule()
    now = START + 5
    message = sealed(compose_update(server, now, record(), N), now)
    other = client_state(client_id=4)
    rejected_without_change(other, message, now, AuthenticationError)


def test_bad_key_extension_changes_nothing_even_when_authentic():
    now = START + 5
    client = client_state()
    bogus = RoamingUpdate(sync=EpochSync(5, 6, 1.0), extension=KeyExtension(900, bytes(32)))
    rejected_without_change(client, sealed(bogus, now), now, InvalidKeyExtensionError)
    too_far = RoamingUpdate(extension=KeyExtension(N + 1, bytes(32)))
    rejected_without_change(client, sealed(too_far, now + 0.1), now + 0.1, InvalidKeyExtensionError)


def test_inconsistent_sync_changes_nothing():
    server = server_schedule()
    now = START + 100.0
    update = compose_update(server, now, record(), N)
    # Epoch j = r + 6 cannot start as soon as the real r + 1 does: epoch r is then in the past.
    wrong = RoamingUpdate(
        sync=EpochSync(update.sync.current, update.sync.target + 5, update.sync.until_target)
    )
    client = client_state()
    rejected_without_change(client, sealed(wrong, now), now, InconsistentUpdateError)
    beyond = RoamingUpdate(sync=EpochSync(10, 401, 1.0))
    rejected_without_change(client, sealed(beyond, now + 0.1), now + 0.1, InconsistentUpdateError)


def test_kind_is_roaming_update():
    server = server_schedule()
    message = sealed(compose_update(server, START + 1, record(), N), START + 1)
    assert message[3] == Kind.ROAMING_UPDATE


def test_a_delayed_update_does_not_shift_the_schedule():
    server = server_schedule()
    client = client_state()
    skew, delay = 40.0, 0.002
    now = START + 200.0
    client.receive(sealed(compose_update(server, now, record(), N), now), now + skew + delay)
    expected = client.schedule.start_of(client.schedule.epoch_at(now + skew).index + 1)
    # An attacker holds the next update back for 3 s: the offset estimate filters the delay.
    later = now + 20.0
    outcome = client.receive(
        sealed(compose_update(server, later, record(), N), later), later + skew + 3.0
    )
    assert outcome.clock_offset == pytest.approx(-(skew + delay))
    index = client.schedule.epoch_at(later + skew).index
    assert client.schedule.start_of(index) == pytest.approx(server.start_of(index) + skew, abs=0.01)
    assert expected == pytest.approx(client.schedule.start_of(server.epoch_at(now).index + 1))


def test_freshness_is_judged_in_the_servers_clock_after_the_first_update():
    server = server_schedule()
    client = client_state()
    skew = 100.0
    now = START + 10.0
    client.receive(sealed(compose_update(server, now, record(), N), now), now + skew)
    held_back = sealed(compose_update(server, now + 1, record(), N), now + 1)
    rejected_without_change(client, held_back, now + 1 + skew + 8.0, StaleMessageError)
