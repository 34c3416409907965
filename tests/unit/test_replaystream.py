"""The replay stream (migrate.replaystream): frames, chunks, the server's runs and the
client's acknowledged positions; a streamed request's wire form; the parsers under
hypothesis (profile from ``ROAM_FUZZ_PROFILE`` as in test_fuzz_parsers)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate.channel import Kind
from migrate.connstore import ConnectionStore
from migrate.errors import AuthenticationError, MalformedMessageError, RoamError
from migrate.reincarnation import (
    MAX_REPLAY_BYTES,
    STREAMED_FLAG,
    Phase,
    Request,
    admit,
    request_opener,
    request_sealer,
)
from migrate.replaystream import (
    CHUNK_BYTES,
    Ack,
    Chunk,
    FrameReader,
    Positions,
    ReplayBuffers,
    ReplayStreamError,
    chunks,
    stream_frame,
)
from tests.unit.test_checkpoint import (
    ALICE,
    DEPLOYMENT,
    KEY,
    request_for,
    sample_checkpoint,
)

_EXAMPLES = {"fuzz": 10_000, "fuzz-ci": 2000, "fuzz-quick": 300}
FUZZ = settings(
    max_examples=_EXAMPLES.get(os.environ.get("ROAM_FUZZ_PROFILE", "fuzz-ci"), 2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def chunk(start, data, base=0, port=40000):
    return Chunk(7, port, 6379, base, start, data)


# -- wire forms ----------------------------------------------------------------------------------


def test_chunks_and_acks_round_trip_and_refuse_what_is_not_theirs():
    one = chunk(5, b"abc", base=2)
    assert Chunk.decode(one.encode()) == one
    ack = Ack(40000, 2, 8)
    assert Ack.decode(ack.encode()) == ack
    with pytest.raises(MalformedMessageError, match="tag"):
        Chunk.decode(ack.encode() + b"x" * 20)
    with pytest.raises(MalformedMessageError):
        Ack.decode(one.encode()[: len(ack.encode())])
    with pytest.raises(MalformedMessageError, match="before its base"):
        chunk(1, b"x", base=2)
    with pytest.raises(MalformedMessageError, match="empty"):
        chunk(0, b"")
    with pytest.raises(MalformedMessageError, match="too long"):
        chunk(0, b"x" * (CHUNK_BYTES + 1))
    pieces = chunks(7, 40000, 6379, 0, 10, b"y" * (2 * CHUNK_BYTES + 5))
    assert [(c.start, len(c.data)) for c in pieces] == [
        (10, CHUNK_BYTES),
        (10 + CHUNK_BYTES, CHUNK_BYTES),
        (10 + 2 * CHUNK_BYTES, 5),
    ]


def test_frames_are_split_wherever_the_stream_cuts_them_and_oversized_ones_refused():
    stream = stream_frame(b"first") + stream_frame(b"second message")
    reader = FrameReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == [b"first", b"second message"]
    small = FrameReader(max_frame=10)
    with pytest.raises(MalformedMessageError, match="11 bytes"):
        small.feed((11).to_bytes(4, "big"))  # refused before its bytes came
    with pytest.raises(MalformedMessageError):
        FrameReader().feed(b"\0\0\0\0")


def test_a_streamed_request_carries_only_its_tail_and_is_whole_again_at_the_server():
    replay = os.urandom(200_000)
    checkpoint = sample_checkpoint(
        c2s_pos=150_000, c2s_hash=hashlib.sha256(replay[:150_000]).digest()
    )
    client = request_for(checkpoint, replay, streamed=len(replay) - 10)
    full = dataclasses.replace(client, streamed=0)
    with pytest.raises(MalformedMessageError, match="too long"):
        full.encode()  # all inline: more than a datagram
    wire = client.encode()
    assert wire[0] == Phase.PREPARE | STREAMED_FLAG
    assert len(wire) < 1000 + len(client.checkpoint)
    decoded = Request.decode(wire)
    assert decoded.streamed == len(replay) - 10
    assert decoded.replay == replay[-10:]
    assert decoded.with_streamed(replay[:-10]) == full
    with pytest.raises(MalformedMessageError, match="wrong length"):
        decoded.with_streamed(replay[:-11])

    # The commitment is checked on the whole: a streamed byte changed is refused.
    def admit_whole(streamed):
        sealer = request_sealer(KEY, DEPLOYMENT, ALICE.client_id)
        opener = request_opener(KEY, DEPLOYMENT, ALICE.client_id)
        opened = opener.open(sealer.seal(Kind.REINCARNATE_REQUEST, wire, now=50.0), now=50.0)
        whole = Request.decode(opened.plaintext).with_streamed(streamed)
        return admit(opened, whole, ALICE, "10.0.0.50", 1000, True, KEY, DEPLOYMENT,
                     now=1001.0, epoch_length=3.0)  # fmt: skip

    assert admit_whole(replay[:-10]).request == full
    with pytest.raises(AuthenticationError, match="commitment"):
        admit_whole(bytes([replay[0] ^ 0xFF]) + replay[1:-10])  # changed whatever it was
    # ABORT and GO never name streamed bytes; a flag with no count is refused.
    abort = Request(Phase.ABORT, 8, 40000, 80, 0, 0, 0, b"", b"").encode()
    with pytest.raises(MalformedMessageError):
        Request.decode(bytes([abort[0] | STREAMED_FLAG]) + abort[1:] + (5).to_bytes(8, "big"))
    with pytest.raises(MalformedMessageError):
        Request.decode(wire[:37] + (0).to_bytes(8, "big") + wire[45:])
    assert MAX_REPLAY_BYTES <= CHUNK_BYTES


# -- the server's runs ---------------------------------------------------------------------------


def test_runs_grow_contiguously_and_refuse_gaps_differences_and_excess():
    buffers = ReplayBuffers(max_replay=100, max_per_client=150)
    assert buffers.add(1, chunk(10, b"a" * 20, base=10), 0.0) == Ack(40000, 10, 30)
    # A repeat or an overlap with the same bytes: nothing sent twice is stored twice.
    assert buffers.add(1, chunk(20, b"a" * 15, base=10), 0.1) == Ack(40000, 10, 35)
    assert buffers.held[1] == 25
    before = copy.deepcopy(buffers)
    refusals = [
        (chunk(40, b"b", base=10), "gap"),
        (chunk(30, b"b" * 5, base=10), "differs"),
        (chunk(35, b"c" * 80, base=10), "per-connection bound"),
        (chunk(40, b"c", base=40), None),  # a new run: replaces (below)
    ]
    for bad, match in refusals[:3]:
        with pytest.raises(ReplayStreamError, match=match):
            buffers.add(1, bad, 0.2)
        assert buffers == before  # nothing changed
    assert buffers.slice(1, 40000, 12, 35) == b"a" * 23
    assert buffers.slice(1, 40000, 9, 20) is None
    assert buffers.slice(1, 40000, 20, 36) is None
    # Another base at its start replaces the run.
    buffers.add(1, chunk(40, b"c" * 90, base=40), 0.3)
    assert buffers.held[1] == 90
    assert buffers.describe(1, 40000) == "[40, 130)"
    # The client's runs together: at most max_per_client.
    with pytest.raises(ReplayStreamError, match="would hold"):
        buffers.add(1, chunk(0, b"d" * 61, port=40001), 0.4)
    buffers.add(2, chunk(0, b"d" * 61, port=40001), 0.4)  # another client: its own bound
    buffers.drop(1, 40000)
    assert 1 not in buffers.held
    assert buffers.total == 61
    buffers.retire(2, 40001, now=1.0, after=2.0)
    assert buffers.expire(2.9, ttl=5.0) == []
    assert buffers.slice(2, 40001, 0, 61) == b"d" * 61  # still there for a repeated COMMIT
    assert buffers.expire(3.0, ttl=5.0) == [(2, 40001)]
    assert buffers.total == 0


def test_all_clients_together_hold_at_most_the_servers_total():
    # Three clients, each within its own bounds; the third's run would pass the total.
    buffers = ReplayBuffers(max_replay=100, max_per_client=150, max_total=200)
    buffers.add(1, chunk(0, b"a" * 100), 0.0)
    buffers.add(2, chunk(0, b"b" * 90), 0.0)
    before = copy.deepcopy(buffers)
    with pytest.raises(ReplayStreamError, match="for all clients"):
        buffers.add(3, chunk(0, b"c" * 20), 0.1)
    assert buffers == before  # nothing changed
    buffers.add(3, chunk(0, b"c" * 10), 0.1)  # what fits is taken
    assert buffers.total == 200
    # A run that replaces one of the same client counts only what it adds.
    buffers.add(1, chunk(5, b"d" * 100, base=5), 0.2)
    assert buffers.total == 200
    buffers.drop(2, 40000)
    buffers.add(3, chunk(10, b"c" * 50), 0.3)
    assert buffers.total == 160


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 4),  # client
            st.integers(40000, 40002),  # port
            st.integers(0, 3),  # base
            st.integers(0, 60),  # offset from the run's end (0: contiguous)
            st.integers(1, 70),  # length
            st.booleans(),  # drop the run instead
        ),
        max_size=40,
    )
)
def test_the_bounds_hold_whatever_the_chunks(steps):
    buffers = ReplayBuffers(max_replay=100, max_per_client=150, max_total=260)
    for client, port, base, offset, length, drop in steps:
        if drop:
            buffers.drop(client, port)
        else:
            held = buffers.runs.get((client, port))
            start = held.end - offset if held is not None and held.base == base else base
            with contextlib.suppress(ReplayStreamError):
                buffers.add(
                    client, chunk(max(base, start), b"x" * length, base=base, port=port), 0.0
                )
        runs = buffers.runs
        assert buffers.total == sum(len(run.data) for run in runs.values()) <= 260
        for owner in {key[0] for key in runs}:
            assert buffers.held[owner] == sum(len(r.data) for k, r in runs.items() if k[0] == owner)
            assert buffers.held[owner] <= 150
        assert all(len(run.data) <= 100 for run in runs.values())


def test_acknowledged_positions_send_nothing_twice():
    positions = Positions()
    assert positions.plan("s", 1, 100, 500) == (100, 100)  # nothing held: a run from 100
    positions.on_ack("s", Ack(1, 100, 300))
    assert positions.plan("s", 1, 100, 500) == (100, 300)  # the rest only
    assert positions.plan("s", 1, 250, 300) == (100, 300)  # all held: nothing to send
    assert positions.covers("s", 1, 120, 300)
    assert not positions.covers("s", 1, 120, 301)
    positions.on_ack("s", Ack(1, 100, 200))  # a late, smaller one changes nothing
    assert positions.acked[("s", 1)] == (100, 300)
    assert positions.plan("s", 1, 400, 500) == (400, 400)  # beyond: a new run
    assert positions.plan("t", 1, 100, 500) == (100, 100)  # per server
    positions.forget("s")
    assert positions.plan("s", 1, 100, 500) == (100, 100)


def test_the_store_reports_an_unmigratable_connection_at_once_and_once():
    store = ConnectionStore(per_connection_limit=1000, total_limit=5000)
    store.on_syn(1, 0, now=0.0)
    store.on_segment(1, 1, b"x" * 600, False, now=0.0)
    assert store.take_unmigratable() == []
    store.on_segment(1, 601, b"x" * 600, False, now=0.1)
    taken = store.take_unmigratable()
    assert [port for port, _ in taken] == [1]
    assert "per-connection bound (1000)" in taken[0][1]
    store.on_segment(1, 1201, b"x" * 600, False, now=0.2)
    assert store.take_unmigratable() == []
    assert store.unmigratable == 1


# -- under hypothesis ----------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=5))
def test_stream_parsers_refuse_with_typed_errors_only(data, cuts):
    for parse in (Chunk.decode, Ack.decode, Request.decode):
        with contextlib.suppress(RoamError):
            parse(data)
    reader = FrameReader(max_frame=64)
    pieces = [
        data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
    ]
    try:
        for piece in pieces:
            for message in reader.feed(piece):
                assert 0 < len(message) <= 64
    except MalformedMessageError:
        pass


@FUZZ
@given(
    steps=st.lists(
        st.tuples(
            st.integers(1, 3),  # client
            st.integers(1, 2),  # port
            st.integers(0, 3),  # base
            st.integers(0, 60),  # start offset from base
            st.integers(1, 40),  # length
            st.sampled_from(b"ab"),  # byte value
        ),
        max_size=40,
    )
)
def test_runs_accept_or_change_nothing_and_stay_within_their_bounds(steps):
    buffers = ReplayBuffers(max_replay=50, max_per_client=80)
    for client, port, base, offset, length, value in steps:
        piece = Chunk(1, port, 80, base * 10, base * 10 + offset, bytes([value]) * length)
        before = copy.deepcopy(buffers)
        try:
            ack = buffers.add(client, piece, 0.0)
        except ReplayStreamError:
            assert buffers == before
        else:
            run = buffers.runs[(client, port)]
            assert (ack.base, ack.end) == (run.base, run.end)
            assert ack.end >= piece.end
            assert buffers.slice(client, port, piece.start, piece.end) == piece.data
        for who in {key[0] for key in buffers.runs}:
            mine = [len(r.data) for key, r in buffers.runs.items() if key[0] == who]
            assert sum(mine) == buffers.held[who] <= 80
        assert all(len(r.data) <= 50 for r in buffers.runs.values())
