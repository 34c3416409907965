import hashlib
import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.channel import Kind
from migrate.checkpoint import (
    Carrier,
    Checkpoint,
    TcpSnapshot,
    carrier_opener,
    carrier_sealer,
    open_carrier,
    open_checkpoint,
    seal_carrier,
    seal_checkpoint,
    sealed_length,
)
from migrate.connstore import ConnectionStore, unwrap
from migrate.errors import (
    AuthenticationError,
    InconsistentUpdateError,
    MalformedMessageError,
    ReplayedMessageError,
)
from migrate.registration import ClientRecord
from migrate.reincarnation import (
    MAX_WINDOW,
    WINDOW_FLAG,
    Answer,
    Phase,
    Request,
    Status,
    admit,
    packable,
    request_opener,
    request_sealer,
)
from migrate.resp import MAX_STATE_BYTES

KEY = bytes(range(32))
DEPLOYMENT = bytes(16)

checkpoints = st.builds(
    Checkpoint,
    conn_id=st.binary(min_size=16, max_size=16),
    client=st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    vport=st.integers(1, 65535),
    epoch=st.integers(0, 2**63),
    counter=st.integers(0, 2**63),
    taken_at=st.integers(0, 2**40).map(lambda us: us / 1e6),
    tcp=st.builds(
        TcpSnapshot,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(1, 65535),
        st.integers(0, 14),
        st.integers(0, 14),
        st.booleans(),
        st.booleans(),
        st.integers(0, 2**32 - 1),
    ),
    codec=st.sampled_from(["generic", "http", "resp", "memcached"]),
    c2s_fresh=st.just(0),
    c2s_pos=st.integers(0, 2**40),
    s2c_fresh=st.just(0),
    s2c_pos=st.integers(0, 2**40),
    c2s_hash=st.binary(min_size=32, max_size=32),
    s2c_hash=st.binary(min_size=32, max_size=32),
    unmigratable=st.booleans(),
    state=st.one_of(st.just(b""), st.binary(min_size=1, max_size=MAX_STATE_BYTES)),
    keyed_hash=st.booleans(),
)


@settings(max_examples=300)
@given(checkpoint=checkpoints)
def test_checkpoint_seal_roundtrip(checkpoint):
    sealed = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    assert open_checkpoint(sealed, KEY, DEPLOYMENT) == checkpoint


@settings(max_examples=100)
@given(checkpoint=checkpoints, taken_us=st.sampled_from([-1, -(2**63), 2**53, 2**63 - 1]))
def test_checkpoint_time_beyond_exact_microseconds_is_rejected(checkpoint, taken_us):
    # found by the fuzz target: 2^62 us read as a float could not be written back unchanged
    body = bytearray(checkpoint.encode_body())
    body[40:48] = taken_us.to_bytes(8, "big", signed=True)
    with pytest.raises(MalformedMessageError, match="checkpoint time"):
        Checkpoint.decode_body(bytes(body))


@settings(max_examples=300)
@given(checkpoint=checkpoints, position=st.integers(min_value=0), flip=st.integers(1, 255))
def test_any_flipped_byte_of_a_sealed_checkpoint_is_rejected(checkpoint, position, flip):
    sealed = bytearray(seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom))
    sealed[position % len(sealed)] ^= flip
    with pytest.raises((AuthenticationError, MalformedMessageError)):
        open_checkpoint(bytes(sealed), KEY, DEPLOYMENT)


def test_checkpoint_is_bound_to_its_pool():
    checkpoint = sample_checkpoint()
    sealed = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    with pytest.raises(AuthenticationError):
        open_checkpoint(sealed, bytes(32), DEPLOYMENT)
    with pytest.raises(AuthenticationError):
        open_checkpoint(sealed, KEY, b"x" * 16)


def sample_checkpoint(replay=b"GET / HTTP/1.1\r\n\r\n", **changes):
    fields = {
        "conn_id": b"c" * 16,
        "client": ("10.0.0.50", 40000),
        "vport": 80,
        "epoch": 7,
        "counter": 3,
        "taken_at": 1000.0,
        "tcp": TcpSnapshot(1000, 2000, 1448, 7, 7, True, True, 5),
        "codec": "http",
        "c2s_fresh": 0,
        "c2s_pos": len(replay),
        "s2c_fresh": 0,
        "s2c_pos": 10,
        "c2s_hash": hashlib.sha256(replay).digest(),
        "s2c_hash": hashlib.sha256(b"0123456789").digest(),
    }
    fields.update(changes)
    return Checkpoint(**fields)


def test_carrier_roundtrip_and_replay_window():
    checkpoint = sample_checkpoint()
    sealed = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    carrier = Carrier.of(checkpoint, sealed)
    sealer = carrier_sealer(KEY, DEPLOYMENT, 1, sender=0)
    opener = carrier_opener(KEY, DEPLOYMENT, 1)
    message = seal_carrier(sealer, carrier, now=100.0)
    assert len(message) < 400  # fits one segment
    opened, got = open_carrier(opener, message, now=100.0)
    assert got == carrier
    opener.accept(opened)
    with pytest.raises(ReplayedMessageError):
        open_carrier(opener, message, now=100.0)
    other_client = carrier_opener(KEY, DEPLOYMENT, 2)
    with pytest.raises(AuthenticationError):
        open_carrier(other_client, message, now=100.0)


def test_a_session_state_is_sealed_in_a_version_2_checkpoint_and_a_carrier_still_fits():
    state = b"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n"
    checkpoint = sample_checkpoint(codec="resp", state=state)
    sealed = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    assert sealed[0] == 2
    assert sealed_length(sealed) == len(sealed)
    assert b"secret" not in sealed
    assert open_checkpoint(sealed, KEY, DEPLOYMENT) == checkpoint
    # Without state: version 1, unchanged.
    plain = seal_checkpoint(sample_checkpoint(codec="resp"), KEY, DEPLOYMENT, os.urandom)
    assert plain[0] == 1
    assert sealed_length(plain) == len(plain)
    # The header's length is authenticated: a shorter or longer state is refused.
    for length in (len(state) - 1, len(state) + 1):
        forged = sealed[:1] + length.to_bytes(2, "big") + sealed[3:]
        with pytest.raises((AuthenticationError, MalformedMessageError)):
            open_checkpoint(forged, KEY, DEPLOYMENT)
    # The largest state: the carrier, in its channel envelope, still fits one segment of a
    # 1280-byte path (IPv4 and TCP headers with options take at most 120 bytes).
    biggest = sample_checkpoint(codec="resp", state=b"x" * MAX_STATE_BYTES)
    sealed = seal_checkpoint(biggest, KEY, DEPLOYMENT, os.urandom)
    carrier = Carrier.of(biggest, sealed)
    assert Carrier.decode(carrier.encode()) == carrier
    message = seal_carrier(carrier_sealer(KEY, DEPLOYMENT, 1, sender=0), carrier, now=100.0)
    assert len(message) + 120 <= 1280
    with pytest.raises(MalformedMessageError, match="session state"):
        sample_checkpoint(state=b"x" * (MAX_STATE_BYTES + 1))
    with pytest.raises(MalformedMessageError, match="version"):
        sealed_length(b"\x04\x00\x01")


def test_a_request_carries_a_checkpoint_with_session_state():
    state = b"SELECT 2\r\n"
    request = request_for(sample_checkpoint(codec="resp", state=state))
    admitted = admit_request(request, replays_state=True)
    assert admitted.checkpoint.state == state
    # A server that would replay without the session (the wrong database) refuses.
    with pytest.raises(InconsistentUpdateError, match="session state"):
        admit_request(request)
    with pytest.raises(MalformedMessageError):
        Request.decode(request.encode()[: -len(request.replay) - 1])


# --- connection store ---------------------------------------------------------------------


@given(
    isn=st.integers(0, 2**32 - 1),
    position=st.integers(0, 2**40),
    slack=st.integers(-(2**20), 2**20),
)
def test_unwrap_recovers_positions_near_the_known_one(isn, position, slack):
    seq = (isn + 1 + position) % 2**32
    near = max(0, position + slack)
    assert unwrap(seq, isn, near) == position


def replayable(data: bytes) -> bool:
    """Not the start of a protocol the store refuses at once (migrate.autodetect: a TLS
    ClientHello or an SSH banner, whose bytes it does not keep)."""
    return not data.startswith(b"SSH-") and data[:2] != b"\x16\x03"


@settings(max_examples=200)
@given(
    data=st.binary(min_size=1, max_size=3000).filter(replayable),
    cuts=st.lists(st.integers(1, 3000)),
    isn=st.integers(0, 2**32 - 1),
    order=st.randoms(use_true_random=False),
)
def test_store_reassembles_segments_in_any_order_with_duplicates(data, cuts, isn, order):
    points = sorted({0, len(data), *(c % len(data) for c in cuts)})
    segments = [(points[i], data[points[i] : points[i + 1]]) for i in range(len(points) - 1)]
    segments = segments + segments[: len(segments) // 2]  # retransmissions
    order.shuffle(segments)
    store = ConnectionStore()
    store.on_syn(40000, isn, now=0.0)
    for position, chunk in segments:
        store.on_segment(40000, (isn + 1 + position) % 2**32, chunk, False, now=1.0)
    assert store.replay_bytes(40000, 0) == data


def test_store_trims_to_the_fresh_point_and_keeps_the_newest_carrier():
    store = ConnectionStore()
    store.on_syn(40000, 5, now=0.0)
    store.on_segment(40000, 6, b"A" * 100, False, now=0.1)
    first = Carrier(b"c" * 16, 40000, 2, 60, 100, 0, b"")
    assert store.on_carrier(first, now=0.2)
    assert store.replay_bytes(40000, 60) == b"A" * 40
    assert store.replay_bytes(40000, 10) is None  # trimmed
    older = Carrier(b"c" * 16, 40000, 1, 0, 10, 0, b"")
    assert not store.on_carrier(older, now=0.3)
    foreign = Carrier(b"d" * 16, 40000, 9, 0, 10, 0, b"")
    assert not store.on_carrier(foreign, now=0.3)
    assert store.connections[40000].carrier is first


def test_store_bounds_memory_with_a_clear_policy():
    store = ConnectionStore(per_connection_limit=1000, total_limit=1500)
    store.on_syn(1, 0, now=0.0)
    store.on_syn(2, 0, now=0.0)
    store.on_segment(1, 1, b"x" * 1200, False, now=0.0)
    assert "per-connection bound" in store.connections[1].unmigratable
    store.on_segment(2, 1, b"y" * 900, False, now=0.0)
    assert store.connections[2].unmigratable is None
    store.on_syn(3, 0, now=0.0)
    store.on_segment(3, 1, b"z" * 800, False, now=0.0)
    assert "total bound" in (store.connections[2].unmigratable or "")
    assert store.replay_bytes(2, 0) is None
    store.on_segment(3, 801, b"", True, now=0.0)
    assert "FIN" in store.connections[3].unmigratable


@given(
    steps=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 700), st.booleans()), max_size=60)
)
def test_the_store_bound_holds_and_evicts_only_past_it(steps):
    # Segments (and carriers that trim) in any order: the bytes held never exceed the total
    # bound, and no connection is given up for it while the true total stays within it.
    store = ConnectionStore(per_connection_limit=10_000, total_limit=1500)
    for port in range(1, 5):
        store.on_syn(port, 0, now=0.0)

    def evicted() -> int:
        return sum("total bound" in (c.unmigratable or "") for c in store.connections.values())

    for port, size, trim in steps:
        conn = store.connections[port]
        if trim and conn.unmigratable is None:
            store.on_carrier(Carrier(b"c" * 16, port, conn.sent + 1, conn.sent, 0, 0, b""), 0.1)
            continue
        before, given_up = sum(c.stored_bytes for c in store.connections.values()), evicted()
        store.on_segment(port, 1 + conn.sent, b"x" * size, False, now=0.1)
        assert sum(c.stored_bytes for c in store.connections.values()) <= store.total_limit
        if before + size <= store.total_limit:
            assert evicted() == given_up


@given(
    offset=st.integers(1, 2**31 - 1) | st.integers(-(2**31), -19),
    payload=st.binary(max_size=64),
)
def test_a_fin_away_from_the_streams_end_is_not_the_clients(offset, payload):
    # Forged on the client's host (the capture sees it), ahead of the stream's end or before
    # its start: the connection keeps its hand-over.
    store = ConnectionStore()
    store.on_syn(40000, 7, now=0.0)
    store.on_segment(40000, 8, b"GET / HTTP/1.1\r\n\r\n", False, now=0.1)
    sent = store.connections[40000].sent
    fin_seq = (8 + sent + offset) % 2**32
    if offset < 0:
        payload = payload[: -offset - 19]  # ends before the stream's first byte
    store.on_segment(40000, fin_seq, payload, True, now=0.2)
    conn = store.connections[40000]
    assert conn.unmigratable is None
    assert store.replay_bytes(40000, 0) == b"GET / HTTP/1.1\r\n\r\n"


def test_a_fin_at_the_streams_end_ends_the_hand_overs():
    store = ConnectionStore()
    store.on_syn(40000, 7, now=0.0)
    store.on_segment(40000, 8, b"abc", False, now=0.1)
    store.on_segment(40000, 11, b"de", True, now=0.2)  # data and FIN in one segment
    assert "FIN" in (store.connections[40000].unmigratable or "")


def test_a_syn_on_a_live_port_changes_nothing_until_its_handshake_completes():
    store = ConnectionStore()
    store.on_syn(40000, 7, now=0.0)
    store.on_segment(40000, 8, b"abc", False, now=0.1)
    store.on_syn(40000, 9_000_000, now=0.2)  # forged, or a reuse of the port
    store.on_segment(40000, 11, b"def", False, now=0.3)  # the live connection goes on
    assert store.connections[40000].client_isn == 7
    assert store.replay_bytes(40000, 0) == b"abcdef"
    # The handshake's ACK (or first data) of the new one: the port was reused.
    store.on_segment(40000, 9_000_001, b"", False, now=0.4)
    conn = store.connections[40000]
    assert (conn.client_isn, conn.opened_at, conn.sent) == (9_000_000, 0.2, 0)


def test_bytes_beyond_any_window_are_not_stored():
    store = ConnectionStore(per_connection_limit=1000)
    store.on_syn(40000, 0, now=0.0)
    store.on_segment(40000, 1 + 5000, b"far ahead", False, now=0.1)
    assert store.connections[40000].pending == {}
    store.on_segment(40000, 1 + 500, b"ahead", False, now=0.1)  # a gap the client may fill
    assert store.connections[40000].pending == {500: b"ahead"}


# --- re-incarnation requests --------------------------------------------------------------

ALICE = ClientRecord("alice", 1, ipaddress.ip_address("10.0.0.50"), 47474, KEY, 1000)


def request_for(checkpoint, replay=b"GET / HTTP/1.1\r\n\r\n", **changes):
    sealed = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    fields = {
        "phase": Phase.PREPARE,
        "epoch": 8,
        "client_port": 40000,
        "vport": 80,
        "c2s_sent": len(replay),
        "s2c_received": 10,
        "replay_from": 0,
        "checkpoint": sealed,
        "replay": replay,
    }
    fields.update(changes)
    return Request(**fields)


def admit_request(
    request,
    source="10.0.0.50",
    record=ALICE,
    granted=1000,
    serves=True,
    now=1001.0,
    length=3.0,
    replays_state=False,
):
    sealer = request_sealer(record.channel_key, DEPLOYMENT, record.client_id)
    opener = request_opener(record.channel_key, DEPLOYMENT, record.client_id)
    message = sealer.seal(Kind.REINCARNATE_REQUEST, request.encode(), now=50.0)
    opened = opener.open(message, now=50.0)
    decoded = Request.decode(opened.plaintext)
    assert decoded == request
    return admit(
        opened,
        decoded,
        record,
        source,
        granted,
        serves,
        KEY,
        DEPLOYMENT,
        now=now,
        epoch_length=length,
        replays_state=replays_state,
    )


def test_valid_request_is_admitted():
    admitted = admit_request(request_for(sample_checkpoint()))
    assert admitted.checkpoint.conn_id == b"c" * 16


@pytest.mark.parametrize(
    ("changes", "request_changes", "admit_changes", "text"),
    [
        ({}, {}, {"source": "10.0.0.66"}, "not its address"),
        ({}, {}, {"granted": 7}, "holds keys up to epoch 7"),
        ({}, {}, {"serves": False}, "not the server of epoch"),
        ({"client": ("10.0.0.50", 40001)}, {}, {}, "not to the requesting connection"),
        ({"unmigratable": True}, {}, {}, "unmigratable"),
        ({}, {"replay": b"GET /evil HTTP/1.1\r\n", "c2s_sent": 20}, {}, "commitment"),
    ],
)
def test_bad_requests_are_refused(changes, request_changes, admit_changes, text):
    request = request_for(sample_checkpoint(**changes), **request_changes)
    with pytest.raises(Exception, match=text):
        admit_request(request, **admit_changes)


def test_revoked_client_is_refused():
    from dataclasses import replace

    with pytest.raises(Exception, match="revoked"):
        admit_request(request_for(sample_checkpoint()), record=replace(ALICE, revoked=True))


def test_request_and_answer_parsing_is_strict():
    request = request_for(sample_checkpoint())
    data = request.encode()
    with pytest.raises(MalformedMessageError):
        Request.decode(data[:40])
    with pytest.raises(MalformedMessageError, match="phase"):
        Request.decode(b"\x09" + data[1:])
    with pytest.raises(MalformedMessageError, match="do not end"):
        Request.decode(data + b"extra")
    answer = Answer(Phase.COMMIT, 40000, Status.DIVERGED, "hash mismatch")
    assert Answer.decode(answer.encode()) == answer
    with pytest.raises(MalformedMessageError):
        Answer.decode(b"\x01")
    # The answer is always smaller than the request it answers (no amplification).
    assert len(answer.encode()) * 3 < len(data)


@given(window=st.integers(0, MAX_WINDOW) | st.none(), epoch=st.integers(0, 2**64 - 1))
def test_a_go_carries_the_clients_receive_window_or_none(window, epoch):
    go = Request(Phase.GO, epoch, 40000, 80, 0, 0, 0, b"", b"", window=window)
    data = go.encode()
    assert Request.decode(data) == go
    assert packable(go) == packable(Request(Phase.GO, 1, 40000, 80, 0, 0, 0, b"", b"")) + (
        0 if window is None else 4
    )
    if window is not None:
        assert data[0] == Phase.GO | WINDOW_FLAG  # a GO without it is as before this field
        with pytest.raises(MalformedMessageError, match="truncated"):
            Request.decode(data[:-1])


def test_a_receive_window_is_refused_where_it_does_not_belong():
    with pytest.raises(MalformedMessageError, match="window of 1024 bytes in a COMMIT"):
        request_for(sample_checkpoint(), phase=Phase.COMMIT, window=1024)
    with pytest.raises(MalformedMessageError, match="window of 1073725441 bytes in a GO"):
        Request(Phase.GO, 7, 40000, 80, 0, 0, 0, b"", b"", window=MAX_WINDOW + 1)
    abort = Request(Phase.ABORT, 7, 40000, 80, 0, 0, 0, b"", b"").encode()
    with pytest.raises(MalformedMessageError, match="in a ABORT request"):
        Request.decode(bytes([abort[0] | WINDOW_FLAG]) + abort[1:] + bytes(4))
    commit = request_for(sample_checkpoint()).encode()
    flagged = bytes([commit[0] | WINDOW_FLAG]) + commit[1:37] + (64).to_bytes(4, "big")
    with pytest.raises(MalformedMessageError, match="in a PREPARE request"):
        Request.decode(flagged + commit[37:])
    with pytest.raises(MalformedMessageError, match="port out of range"):
        Request(Phase.GO, 7, 0, 80, 0, 0, 0, b"", b"")


# --- checkpoint expiry and key rotation (issue 12, findings 3 and 10) ---------------------


def test_a_checkpoint_expires_after_its_maximum_age_in_epochs():
    from migrate.reincarnation import CHECKPOINT_AGE_FLOOR_S, MAX_CHECKPOINT_AGE_EPOCHS

    request = request_for(sample_checkpoint())  # taken at 1000.0 in epoch 7, for epoch 8
    # Fresh: a second old, or as old as the limit allows.
    assert admit_request(request, now=1001.0)
    limit = max(CHECKPOINT_AGE_FLOOR_S, MAX_CHECKPOINT_AGE_EPOCHS * 60.0)
    assert admit_request(request, now=1000.0 + limit, length=60.0)
    # Hoarded: just past the limit, a week, a century later.
    for later in (limit + 0.5, 7 * 86400.0, 100 * 365 * 86400.0):
        with pytest.raises(Exception, match="expired"):
            admit_request(request, now=1000.0 + later, length=60.0)
    # Short epochs still leave the floor (a hand-over takes seconds).
    assert admit_request(request, now=1000.0 + CHECKPOINT_AGE_FLOOR_S - 0.1, length=0.5)
    with pytest.raises(Exception, match="expired"):
        admit_request(request, now=1000.0 + CHECKPOINT_AGE_FLOOR_S + 0.1, length=0.5)
    # From the future (beyond clock skew), or of a later epoch than the one asked for.
    with pytest.raises(Exception, match="expired"):
        admit_request(request, now=900.0)
    with pytest.raises(Exception, match="earlier epoch"):
        admit_request(request_for(sample_checkpoint(epoch=9)))


def test_the_checkpoint_key_rotates_per_epoch_range_with_overlap():
    from migrate.checkpoint import CHECKPOINT_KEY_EPOCHS, CheckpointKeys, checkpoint_key

    group = bytes(range(32, 64))
    keys = CheckpointKeys(group)
    span = CHECKPOINT_KEY_EPOCHS
    assert checkpoint_key(group, 0) == checkpoint_key(group, span - 1)
    assert checkpoint_key(group, span - 1) != checkpoint_key(group, span)
    assert len({checkpoint_key(group, r * span) for r in range(5)}) == 5
    taken = sample_checkpoint(epoch=span - 1)
    sealed = seal_checkpoint(taken, keys.for_epoch(taken.epoch), DEPLOYMENT, os.urandom)
    # Across the range's edge, the previous range's key still opens it (the overlap)...
    assert open_checkpoint(sealed, keys.candidates(span), DEPLOYMENT) == taken
    assert open_checkpoint(sealed, keys.candidates(span - 1), DEPLOYMENT) == taken
    # ...two ranges on, it has rotated out.
    with pytest.raises(AuthenticationError, match="rotated out"):
        open_checkpoint(sealed, keys.candidates(2 * span), DEPLOYMENT)
    # A key of another range never opens it.
    with pytest.raises(AuthenticationError):
        open_checkpoint(sealed, checkpoint_key(group, 3 * span), DEPLOYMENT)
    # Memory stays bounded however many ranges pass.
    for epoch in range(0, 100 * span, span):
        keys.candidates(epoch)
    assert len(keys._keys) <= CheckpointKeys.KEPT


def test_requests_for_an_epoch_are_taken_only_around_its_start():
    from migrate.reincarnation import LATE_REQUEST_S, PREPARE_AHEAD_S, in_request_window

    start = 1_000_000.0
    assert in_request_window(start, start - PREPARE_AHEAD_S)
    assert in_request_window(start, start)
    assert in_request_window(start, start + LATE_REQUEST_S)
    assert not in_request_window(start, start - PREPARE_AHEAD_S - 0.1)
    assert not in_request_window(start, start + LATE_REQUEST_S + 0.1)
    # At no other time of a long epoch (an hour, a week), nor long before it.
    for later in (60.0, 3600.0, 7 * 86400.0):
        assert not in_request_window(start, start + later)
        assert not in_request_window(start, start - later)
