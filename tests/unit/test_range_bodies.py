"""``roam server --range-bodies window``: checkpoints inside a Range-capable body commit to a
window of it only, the relay may pass over the rest unseen, and a new server still resumes
such a connection by Range, verified, or refuses it."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from migrate.checkpoint import Checkpoint
from migrate.rangeplan import WINDOW_BYTES
from migrate.streamstate import NO_HASH, StreamState
from proxy.replay import Diverged
from tests.unit.test_range_replay import (
    ETAG,
    REQUEST,
    Service,
    checkpoint_of,
    regenerate,
    response_head,
)

BODY = os.urandom(3 * 1024 * 1024 + 12345)
HEAD = response_head(len(BODY), ETAG)
SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def fed(mode: str, stream: bytes, cuts: list[int], *, skip: bool, requests: bytes = REQUEST):
    """A server's stream state after ``requests`` and ``stream`` in chunks ending at ``cuts``;
    with ``skip``, of each chunk all that ``skippable`` allows but its last WINDOW_BYTES is
    passed over (what a splice relay does with each tee)."""
    state = StreamState("http", range_min_body=1, range_bodies=mode)
    state.feed_c2s(requests)
    position = 0
    for end in [*cuts, len(stream)]:
        count = end - position
        if skip and count > WINDOW_BYTES:
            dropped = min(state.skippable(), count - WINDOW_BYTES)
            if dropped > 0:
                state.skip_s2c(dropped)
                position += dropped
        state.feed_s2c(stream[position:end])
        position = end
    return state


def checkpoint(state: StreamState, acked: int = 0) -> Checkpoint:
    return checkpoint_of(state, epoch=5, counter=1, acked=acked)


def test_a_window_checkpoint_commits_to_the_window_and_otherwise_says_what_a_full_one_says():
    at = len(HEAD) + 2_000_000
    full = checkpoint(fed("hash", HEAD + BODY[:2_000_000], [], skip=False))
    window = checkpoint(fed("window", HEAD + BODY[:2_000_000], [], skip=False))
    assert full.range is not None
    assert full.range.full_hash
    assert full.s2c_hash != NO_HASH
    assert window.range is not None
    assert not window.range.full_hash
    assert window.s2c_hash == NO_HASH
    assert window.range.window_start == at - WINDOW_BYTES
    assert (
        window.range.window_hash
        == hashlib.sha256(BODY[2_000_000 - WINDOW_BYTES : 2_000_000]).digest()
    )
    assert window == replace(full, s2c_hash=NO_HASH, range=replace(full.range, full_hash=False))


WHOLE = len(HEAD) + len(BODY) + len(SMALL)


@settings(max_examples=60, deadline=None)
@example(cuts=[len(HEAD) + n * (1 << 20) for n in range(4)], stop=WHOLE)
@example(cuts=[len(HEAD) + 10, len(HEAD) + len(BODY) - 5], stop=WHOLE)
@given(
    cuts=st.lists(st.integers(1, len(HEAD) + len(BODY) + len(SMALL) - 1), max_size=12),
    stop=st.integers(1, len(HEAD) + len(BODY) + len(SMALL)),
)
def test_passing_over_what_skippable_allows_leaves_every_checkpoint_as_it_was(cuts, stop):
    """A checkpoint taken after any chunk is the same whether the relay read the body's
    bytes or dropped all but each chunk's last 64 KiB; so is the next exchange's, hashed
    whole again (a small response after the download on the same connection)."""
    stream = (HEAD + BODY + SMALL)[:stop]
    cuts = sorted({cut for cut in cuts if cut < stop})
    requests = REQUEST + b"GET /small HTTP/1.1\r\nHost: vip\r\n\r\n"
    read = fed("window", stream, cuts, skip=False, requests=requests)
    passed = fed("window", stream, cuts, skip=True, requests=requests)
    assert passed.s2c_pos == read.s2c_pos == stop
    for acked in (0, stop):
        assert checkpoint(passed, acked) == checkpoint(read, acked)
    if stop == WHOLE:
        # The download over and acknowledged: the small answer's checkpoint has its hash.
        assert (
            checkpoint(passed, stop).s2c_hash
            == checkpoint(fed("hash", stream, cuts, skip=False, requests=requests), stop).s2c_hash
        )


def test_nothing_is_passed_over_while_some_hash_still_needs_the_body():
    # --range-bodies hash: the fresh point's hash runs through the body.
    state = fed("hash", HEAD + BODY[:500_000], [], skip=False)
    assert state.skippable() == 0
    with pytest.raises(ValueError, match="cannot be skipped"):
        state.skip_s2c(1)
    # window, but an earlier answer the client has not acknowledged: its fresh point's hash
    # covers the download too, until the client's acknowledgement settles it.
    requests = b"GET /small HTTP/1.1\r\nHost: vip\r\n\r\n" + REQUEST
    state = fed("window", SMALL + HEAD + BODY[:500_000], [], skip=False, requests=requests)
    assert state.skippable() == 0
    state.settle(len(SMALL))
    assert state.skippable() == len(BODY) - 500_000 - WINDOW_BYTES
    # Never the body's last WINDOW_BYTES, nor more than is ahead.
    with pytest.raises(ValueError, match="cannot be skipped"):
        state.skip_s2c(len(BODY) - 500_000)
    state.skip_s2c(state.skippable())
    assert state.skippable() == 0
    assert state.skipped_s2c == len(BODY) - 500_000 - WINDOW_BYTES


def test_an_unknown_range_bodies_value_is_named():
    with pytest.raises(ValueError, match="range_bodies 'none'"):
        StreamState("http", range_bodies="none")


def window_checkpoint(at: int) -> Checkpoint:
    """The window server's checkpoint ``at`` body bytes into the download, its relay having
    passed over what it could."""
    stream = HEAD + BODY[:at]
    cuts = list(range(len(HEAD), len(stream), 1 << 20))
    return checkpoint(fed("window", stream, cuts, skip=True))


def test_a_new_server_resumes_a_window_checkpoint_by_range_verified():
    checkpoint = window_checkpoint(2_500_000)
    received = len(HEAD) + 2_600_000
    replayer = asyncio.run(regenerate(Service(BODY, ETAG), checkpoint, received))
    assert replayer.by_range
    assert replayer.verified
    unsent = bytes(replayer.unsent)
    assert unsent == BODY[2_600_000 : 2_600_000 + len(unsent)]


def test_a_replica_differing_in_the_window_is_refused():
    checkpoint = window_checkpoint(2_500_000)
    changed = bytearray(BODY)
    changed[2_500_000 - 100] ^= 1  # same length and ETag
    with pytest.raises(Diverged, match="body differs from the client's"):
        asyncio.run(regenerate(Service(bytes(changed), ETAG), checkpoint, len(HEAD) + 2_600_000))


def test_a_replica_ignoring_ranges_is_regenerated_whole_and_checked_by_the_window():
    """Without the full hash a whole regeneration is checked as a range would be: by the
    window before the checkpoint's position (the bytes before it pass unchecked)."""
    checkpoint = window_checkpoint(2_500_000)
    received = len(HEAD) + 2_600_000
    replayer = asyncio.run(regenerate(Service(BODY, ETAG, ranges=False), checkpoint, received))
    assert not replayer.by_range
    assert replayer.verified
    unsent = bytes(replayer.unsent)
    assert unsent == BODY[2_600_000 : 2_600_000 + len(unsent)]
    changed = bytearray(BODY)
    changed[2_500_000 - 1] ^= 1
    with pytest.raises(Diverged, match="body differs from the client's"):
        asyncio.run(regenerate(Service(bytes(changed), ETAG, ranges=False), checkpoint, received))


def test_a_client_behind_the_head_is_regenerated_from_the_start_and_checked_by_the_window():
    """The client holds a checkpoint from inside the body but has not received the whole head
    yet: no range plan; the regeneration from the response's start reaches the checkpoint's
    position and its window decides."""
    checkpoint = window_checkpoint(2_500_000)
    received = len(HEAD) - 10
    replayer = asyncio.run(regenerate(Service(BODY, ETAG), checkpoint, received))
    assert not replayer.by_range
    assert replayer.verified
    assert bytes(replayer.unsent[10:]) == BODY[: len(replayer.unsent) - 10]
    changed = bytearray(BODY)
    changed[2_500_000 - 1] ^= 1
    with pytest.raises(Diverged, match="body differs from the client's"):
        asyncio.run(regenerate(Service(bytes(changed), ETAG), checkpoint, received))


def test_a_body_that_ends_before_the_first_possible_checkpoint_passes_all_but_its_last_byte():
    """A re-incarnation regenerating what its client has (``before``: its position) takes no
    checkpoint at the end of a body the client has whole: all of it but the last byte may
    pass (the codec sees the end); a body the position lies in, or ends at, keeps its last
    window as always."""
    state = fed("window", HEAD + BODY[:500_000], [], skip=False)
    end = len(HEAD) + len(BODY)
    ahead = len(BODY) - 500_000
    assert state.skippable(before=end + 1) == ahead - 1
    assert state.skippable(before=end) == ahead - WINDOW_BYTES
    assert state.skippable(before=end - 10) == ahead - WINDOW_BYTES
    assert state.skippable() == ahead - WINDOW_BYTES
    with pytest.raises(ValueError, match="cannot be skipped"):
        state.skip_s2c(ahead - 1)  # without ``before``: the window stays
    with pytest.raises(ValueError, match="cannot be skipped"):
        state.skip_s2c(ahead, before=end + 1)  # never the last byte
    state.skip_s2c(ahead - 1, before=end + 1)
    assert state.s2c_pos == end - 1
    assert state.skippable(before=end + 1) == 0


@settings(max_examples=60, deadline=None)
@given(
    reads=st.lists(st.integers(1, 300_000), min_size=1, max_size=20),
    past=st.integers(1, len(SMALL)),
)
def test_a_regeneration_past_a_body_checkpoints_as_if_it_had_read_it(reads, past):
    """A re-incarnation regenerating to a client ``past`` bytes into the answer after the
    download (``before``): passing over all of the download's body but its last byte, in
    reads of any size, leaves every checkpoint as reading those bytes in the same pieces
    does (the codec's boundaries fall where the reads end)."""
    stream = HEAD + BODY + SMALL
    before = len(HEAD) + len(BODY) + past
    requests = REQUEST + b"GET /small HTTP/1.1\r\nHost: vip\r\n\r\n"
    state = StreamState("http", range_min_body=1, range_bodies="window")
    state.feed_c2s(requests)
    sizes = itertools.cycle(reads)
    ends = []
    while state.s2c_pos < len(stream):
        skip = min(state.skippable(before=before), before - state.s2c_pos)
        if skip > 0:
            state.skip_s2c(skip, before=before)
        else:
            end = min(len(stream), state.s2c_pos + next(sizes))
            state.feed_s2c(stream[state.s2c_pos : end])
        ends.append(state.s2c_pos)
    assert state.skipped_s2c >= len(BODY) - 300_000 - 1  # all but a read's worth and a byte
    read = fed("window", stream, ends[:-1], skip=False, requests=requests)
    for acked in (0, before, len(stream)):
        assert checkpoint(state, acked) == checkpoint(read, acked)
