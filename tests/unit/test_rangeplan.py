"""Range hand-overs, the pure core: which responses qualify, the plan and its request, the
checks of the replica's answer, and the window a checkpoint commits to (migrate.rangeplan,
migrate.streamstate, migrate.checkpoint version 3)."""

import contextlib
import hashlib
import itertools
import os
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.checkpoint import (
    Carrier,
    RangeRecord,
    TcpSnapshot,
    carrier_sealer,
    open_checkpoint,
    seal_carrier,
    seal_checkpoint,
    sealed_length,
)
from migrate.errors import AuthenticationError, MalformedMessageError
from migrate.rangeplan import (
    WINDOW_BYTES,
    FromFreshPoint,
    Partial,
    RangeDiverged,
    RangePlan,
    Whole,
    check_answer,
    check_window_answer,
    expected_regeneration,
    head_length,
    plan,
    resendable,
    response_facts,
    window_check,
)
from migrate.streamstate import NO_HASH, StreamState, verifies_nothing

KEY = bytes(range(32))
DEPLOYMENT = bytes(16)
ETAG = b'"6751a3c0-10000000"'
REQUEST = b"GET /big.bin HTTP/1.1\r\nHost: vip\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"


def head(
    length: int,
    *,
    etag: bytes | None = ETAG,
    ranges: bytes | None = b"bytes",
    status: bytes = b"200 OK",
    extra: bytes = b"",
) -> bytes:
    fields = [b"HTTP/1.1 " + status, b"Server: nginx", b"Date: Thu, 03 Dec 2026 23:00:00 GMT"]
    fields.append(b"Content-Length: %d" % length)
    fields.append(b"Last-Modified: Thu, 03 Dec 2026 22:00:00 GMT")
    if etag is not None:
        fields.append(b"ETag: " + etag)
    if ranges is not None:
        fields.append(b"Accept-Ranges: " + ranges)
    return b"\r\n".join(fields) + b"\r\n" + extra + b"\r\n"


def tcp() -> TcpSnapshot:
    return TcpSnapshot(1, 2, 1460, 7, 7, True, True, 0)


def checkpoint_of(state: StreamState, acked: int):  # type: ignore[no-untyped-def]
    return state.checkpoint(
        conn_id=bytes(16),
        client=("10.0.0.2", 40000),
        vport=80,
        epoch=5,
        counter=1,
        now=100.0,
        tcp=tcp(),
        s2c_acked=acked,
    )


def streamed(body: bytes, cuts: list[int], *, response_head: bytes | None = None) -> StreamState:
    """A stream state that saw REQUEST and the response (head and ``body``) in chunks."""
    state = StreamState("http", range_min_body=1)
    state.feed_c2s(REQUEST)
    data = (response_head if response_head is not None else head(len(body))) + body
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for low, high in itertools.pairwise(edges):
        state.feed_s2c(data[low:high])
    return state


# -- which responses qualify ------------------------------------------------------------------


def test_a_200_with_a_strong_etag_and_byte_ranges_is_resumable() -> None:
    section = head(1000)
    facts = response_facts(b"GET", section, 500)
    assert facts is not None
    assert (facts.validator.value, facts.validator.etag) == (ETAG, True)
    assert (facts.body_start, facts.length, facts.body_end) == (500, 1000, 1500)


@pytest.mark.parametrize(
    ("method", "section", "why"),
    [
        (b"HEAD", head(1000), "HEAD has no body"),
        (b"POST", head(1000), "not GET"),
        (b"GET", head(1000, etag=b'W/"abc"'), "weak entity tag"),
        (b"GET", head(1000, etag=b"abc"), "malformed entity tag"),
        (b"GET", head(1000, ranges=None), "no Accept-Ranges"),
        (b"GET", head(1000, ranges=b"none"), "Accept-Ranges: none"),
        (b"GET", head(1000, status=b"206 Partial Content"), "a 206"),
        (b"GET", head(1000, extra=b"Transfer-Encoding: chunked\r\n"), "chunked"),
        (b"GET", head(1000, extra=b"ETag: " + ETAG + b"\r\n"), "two entity tags"),
        (b"GET", head(0), "an empty body"),
    ],
)
def test_responses_a_range_cannot_resume(method: bytes, section: bytes, why: str) -> None:
    assert response_facts(method, section, 500) is None, why


def test_a_last_modified_date_is_a_validator_only_a_second_before_the_date() -> None:
    strong = head(1000, etag=None)  # modified an hour before the Date
    facts = response_facts(b"GET", strong, 500)
    assert facts is not None
    assert (facts.validator.value, facts.validator.etag) == (
        b"Thu, 03 Dec 2026 22:00:00 GMT",
        False,
    )
    same_second = strong.replace(b"22:00:00 GMT", b"23:00:00 GMT")
    assert response_facts(b"GET", same_second, 500) is None


# -- the plan and the rewritten request -------------------------------------------------------


def record(**changes: object) -> RangeRecord:
    base = RangeRecord(ETAG, True, 10_000_000, 300, 1_000_000, bytes(32))
    return replace(base, **changes)  # type: ignore[arg-type]


def range_checkpoint(rec: RangeRecord | None, s2c_pos: int = 1_065_536):  # type: ignore[no-untyped-def]
    state = StreamState("http", range_min_body=1)
    state.feed_c2s(REQUEST)
    checkpoint = checkpoint_of(state, 0)
    return replace(checkpoint, s2c_pos=s2c_pos, range=rec)


def test_the_plan_asks_for_the_window_and_everything_after() -> None:
    checkpoint = range_checkpoint(record())
    # The client is past the checkpoint: the range starts at the window.
    chosen = plan(checkpoint, REQUEST, 2_000_000)
    assert isinstance(chosen, RangePlan)
    assert (chosen.first, chosen.s2c_start) == (1_000_000 - 300, 1_000_000)
    assert chosen.request == (
        REQUEST[:-2] + b"Range: bytes=999700-\r\nIf-Range: " + ETAG + b"\r\n\r\n"
    )
    # The client is behind the window's start: the range starts at the client.
    behind = plan(checkpoint, REQUEST, 900_000)
    assert isinstance(behind, RangePlan)
    assert (behind.first, behind.s2c_start) == (900_000 - 300, 900_000)
    # Leading empty lines are dropped from the rewritten request.
    assert plan(checkpoint, b"\r\n" + REQUEST, 2_000_000) == chosen


@pytest.mark.parametrize(
    ("replay", "received", "why"),
    [
        (REQUEST, 200, "the whole head"),
        (REQUEST, 10_000_301, "past the response's end"),
        (REQUEST[:-2], 2_000_000, "no complete request head"),
        (REQUEST.replace(b"GET", b"POST"), 2_000_000, "not GET"),
        (REQUEST.replace(b"Accept:", b"Range: bytes=0-1\r\nAccept:"), 2_000_000, "own range"),
        (REQUEST.replace(b"Accept:", b"If-Range: x\r\nAccept:"), 2_000_000, "own if-range"),
        (
            REQUEST[:-2] + b"Content-Length: 3\r\n\r\nabc",
            2_000_000,
            "more than one request head",
        ),
        (REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"), 2_000_000, "HTTP/1.1"),
    ],
)
def test_requests_and_positions_a_range_cannot_serve(
    replay: bytes, received: int, why: str
) -> None:
    chosen = plan(range_checkpoint(record()), replay, received)
    assert isinstance(chosen, FromFreshPoint), why


def test_later_requests_follow_the_rewritten_one_verbatim() -> None:
    """A keep-alive client that began its next download (or pipelines): its next request is
    answered after the 206's body, which ends where the original response did."""
    checkpoint = range_checkpoint(record())
    second = REQUEST.replace(b"/big.bin", b"/other")
    chosen = plan(checkpoint, REQUEST + second, 10_000_300 + 500)
    assert isinstance(chosen, RangePlan)
    assert chosen.request.endswith(b"\r\n\r\n" + second)
    assert chosen.request.count(b"Range: bytes=") == 1
    # Past the body's end without a later request: the client cannot have those bytes.
    assert isinstance(plan(checkpoint, REQUEST, 10_000_301), FromFreshPoint)


def test_without_a_range_record_the_plan_is_the_fresh_point() -> None:
    assert isinstance(plan(range_checkpoint(None, 5000), REQUEST, 5000), FromFreshPoint)


# -- the replica's answer ---------------------------------------------------------------------


def range_plan(first: int = 999_700, rec: RangeRecord | None = None) -> RangePlan:
    rec = rec or record()
    return RangePlan(b"", first, rec.body_start + first, rec)


def partial(
    first: int, total: int, *, etag: bytes = ETAG, content_range: bytes | None = None
) -> bytes:
    content_range = content_range or b"bytes %d-%d/%d" % (first, total - 1, total)
    return head(
        total - first,
        etag=etag,
        status=b"206 Partial Content",
        extra=b"Content-Range: " + content_range + b"\r\n",
    )


def test_a_206_for_exactly_the_range_with_the_same_validator_passes() -> None:
    assert check_answer(partial(999_700, 10_000_000), range_plan()) == Partial()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (partial(999_700, 10_000_000, etag=b'"other"'), "206 has ETag"),
        (partial(999_700, 10_000_001), "Content-Range"),
        (
            partial(999_700, 10_000_000, content_range=b"bytes 999701-9999999/10000000"),
            "Content-Range",
        ),
        (head(10_000_000, etag=b'"other"'), "representation differs"),
        (head(10_000_000, status=b"416 Range Not Satisfiable"), "answered 416"),
        (head(10_000_000, status=b"412 Precondition Failed"), "answered 412"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
        (
            partial(999_700, 10_000_000)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n",
            "Content-Length",
        ),
    ],
)
def test_anything_else_diverges_with_its_reason(answer: bytes, reason: str) -> None:
    with pytest.raises(RangeDiverged, match=reason):
        check_answer(answer, range_plan())


def test_a_200_with_the_same_validator_is_regenerated_whole() -> None:
    """With the full hash, or without it (then the window decides: proxy.replay)."""
    assert check_answer(head(10_000_000), range_plan()) == Whole()
    resumed = range_plan(rec=record(full_hash=False))
    assert check_answer(head(10_000_000), resumed) == Whole()


# -- the window asked for alone (a client far behind its checkpoint: proxy.replay) -----------


def test_the_window_alone_is_asked_for_exactly_and_without_the_later_requests() -> None:
    rec = record()  # body from s2c 300, the window from s2c 1_000_000
    second = REQUEST.replace(b"/big.bin", b"/other")
    check = window_check(range_plan(500_000, rec), REQUEST + second, 1_065_536)
    assert check is not None
    assert (check.first, check.last, check.length) == (999_700, 1_065_235, 65_536)
    assert check.request == (
        REQUEST[:-2] + b"Range: bytes=999700-1065235\r\nIf-Range: " + ETAG + b"\r\n\r\n"
    )
    check_window_answer(partial_of(999_700, 1_065_235, 10_000_000), check)


@pytest.mark.parametrize(
    ("replay", "s2c_pos", "why"),
    [
        (REQUEST, 1_000_000, "an empty window"),
        (REQUEST, 10_000_301, "past the body's end"),
        (REQUEST[:-2], 1_065_536, "no complete request head"),
        (REQUEST.replace(b"GET", b"POST"), 1_065_536, "not GET"),
    ],
)
def test_no_window_check_where_a_range_cannot_ask_for_it(
    replay: bytes, s2c_pos: int, why: str
) -> None:
    assert window_check(range_plan(), replay, s2c_pos) is None, why


def partial_of(first: int, last: int, total: int, *, etag: bytes = ETAG) -> bytes:
    fields = [
        b"HTTP/1.1 206 Partial Content",
        b"Content-Length: %d" % (last + 1 - first),
        b"Content-Range: bytes %d-%d/%d" % (first, last, total),
        b"ETag: " + etag,
    ]
    return b"\r\n".join(fields) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (head(10_000_000), "answered 200 to the window"),
        (head(10_000_000, status=b"412 Precondition Failed"), "answered 412"),
        (partial_of(999_700, 1_065_235, 10_000_000, etag=b'"x"'), "206 has ETag"),
        (partial_of(999_700, 1_065_236, 10_000_000), "Content-Range"),
        (partial_of(999_699, 1_065_235, 10_000_000), "Content-Range"),
        (partial_of(999_700, 1_065_235, 10_000_001), "Content-Range"),
        (partial(999_700, 10_000_000), "Content-Range"),
        (b"HTTP/1.1 206 x\r\nContent-Range: nope\r\n\r\n", "ETag"),
    ],
)
def test_any_other_answer_to_the_window_diverges_with_its_reason(
    answer: bytes, reason: str
) -> None:
    check = window_check(range_plan(500_000), REQUEST, 1_065_536)
    assert check is not None
    with pytest.raises(RangeDiverged, match=reason):
        check_window_answer(answer, check)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 2**40),
    st.integers(0, 2**20),
    st.data(),
)
def test_the_window_asked_is_the_checkpoints_whatever_the_positions(
    length: int, body_start: int, data: st.DataObject
) -> None:
    """For any window inside any body: the bytes asked are ``[window_start, s2c_pos)``, a
    206 naming them passes and one shifted by a byte does not."""
    window_start = data.draw(st.integers(body_start, body_start + length - 1))
    s2c_pos = data.draw(st.integers(window_start + 1, body_start + length))
    rec = record(length=length, body_start=body_start, window_start=window_start)
    check = window_check(range_plan(0, rec), REQUEST, s2c_pos)
    assert check is not None
    assert check.length == s2c_pos - window_start
    assert check.request.count(b"\r\nRange: bytes=%d-%d\r\n" % (check.first, check.last)) == 1
    assert body_start + check.first == window_start
    check_window_answer(partial_of(check.first, check.last, length), check)
    with pytest.raises(RangeDiverged):
        check_window_answer(partial_of(check.first, check.last + 1, length), check)


def test_a_head_longer_than_the_limit_diverges() -> None:
    assert head_length(b"HTTP/1.1 206 OK\r\n") is None
    assert head_length(b"HTTP/1.1 206 OK\r\n\r\nbody") == 19
    with pytest.raises(RangeDiverged, match="exceeds"):
        head_length(b"X" * (64 * 1024))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 20_000_000))
def test_the_parsers_take_any_bytes(data: bytes, received: int) -> None:
    """Arbitrary replays and answers: a plan or a reason, a verdict or RangeDiverged."""
    assert isinstance(plan(range_checkpoint(record()), data, received), RangePlan | FromFreshPoint)
    assert response_facts(b"GET", data, 0) is None or data.startswith(b"HTTP/1.1 200")
    with contextlib.suppress(RangeDiverged):
        check_answer(data, range_plan())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"Range", b"If-Range", b"X-A", b"Accept"]), max_size=4))
def test_a_rewritten_request_has_exactly_one_range_and_if_range(names: list[bytes]) -> None:
    replay = REQUEST[:-2] + b"".join(n + b": v\r\n" for n in names) + b"\r\n"
    chosen = plan(range_checkpoint(record()), replay, 2_000_000)
    if b"Range" in names or b"If-Range" in names:
        assert isinstance(chosen, FromFreshPoint)
    else:
        assert isinstance(chosen, RangePlan)
        assert chosen.request.count(b"\r\nRange: ") == 1
        assert chosen.request.count(b"\r\nIf-Range: ") == 1
        assert chosen.request.endswith(b"\r\n\r\n")


# -- the checkpoint's window ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3 * WINDOW_BYTES),
    st.lists(st.integers(0, 4 * WINDOW_BYTES), max_size=12),
    st.integers(0, 4 * WINDOW_BYTES),
)
def test_a_checkpoint_in_the_body_commits_to_the_window_before_it(
    length: int, cuts: list[int], stop: int
) -> None:
    """Whatever the chunking and wherever the checkpoint falls in the body, the record hashes
    exactly the WINDOW_BYTES (or fewer, from the body's start) before the position."""
    body = os.urandom(length)
    response_head = head(length)
    stop = len(response_head) + 1 + stop % length  # inside the body, after one byte at least
    state = streamed(body[: stop - len(response_head)], cuts, response_head=response_head)
    checkpoint = checkpoint_of(state, 0)
    rec = checkpoint.range
    assert rec is not None
    assert (rec.body_start, rec.length, rec.validator) == (len(response_head), length, ETAG)
    assert rec.window_start == max(len(response_head), stop - WINDOW_BYTES)
    data = response_head + body
    assert rec.window_hash == hashlib.sha256(data[rec.window_start : stop]).digest()
    assert rec.full_hash
    assert checkpoint.s2c_hash != NO_HASH
    # Sealed as version 3 and read back; its carrier still fits one segment.
    sealed = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    assert sealed[0] == 3
    assert sealed_length(sealed) == len(sealed)
    assert open_checkpoint(sealed, KEY, DEPLOYMENT) == checkpoint


def test_no_record_at_the_head_past_the_body_or_without_a_validator() -> None:
    body = os.urandom(5000)
    assert checkpoint_of(streamed(b"", []), 0).range is None  # head only, no body byte yet
    ended = streamed(body, [77])
    assert checkpoint_of(ended, 0).range is not None  # at the body's very end: still
    ended.feed_c2s(REQUEST)
    ended.feed_s2c(b"HTTP/1.1 200 OK\r\n")
    assert checkpoint_of(ended, 0).range is None  # past it (the client has not acked it)
    weak = head(5000, etag=b'W/"x"')
    assert checkpoint_of(streamed(body[:100], [], response_head=weak), 0).range is None


def test_the_second_response_on_a_connection_gets_its_record_once_the_first_is_acked() -> None:
    first = os.urandom(3000)
    second = os.urandom(9000)
    state = StreamState("http", range_min_body=1)
    state.feed_c2s(REQUEST)
    state.feed_s2c(head(3000) + first)
    state.feed_c2s(REQUEST)
    state.feed_s2c(head(9000) + second[:4000])
    end_of_first = len(head(3000)) + 3000
    # The client has not acknowledged the first response: the fresh point is its start.
    assert checkpoint_of(state, end_of_first - 1).range is None
    checkpoint = checkpoint_of(state, end_of_first)
    assert checkpoint.range is not None
    assert checkpoint.range.body_start == end_of_first + len(head(9000))


def test_the_first_body_bytes_of_a_resumable_response_make_a_checkpoint_due() -> None:
    """The first checkpoint that can carry a record goes out at once, not a period later."""
    state = StreamState("http", range_min_body=1)
    state.feed_c2s(REQUEST)
    state.feed_s2c(head(9000))
    assert not state.boundary_due
    state.feed_s2c(b"x")
    assert state.boundary_due
    assert checkpoint_of(state, 0).range is not None
    assert not state.boundary_due
    state.feed_s2c(b"y" * 100)
    assert not state.boundary_due


def test_a_version_3_checkpoint_is_authenticated_and_bounded() -> None:
    state = streamed(os.urandom(200_000)[:150_000], [1000], response_head=head(200_000))
    checkpoint = checkpoint_of(state, 0)
    sealed = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    forged = sealed[:1] + (int.from_bytes(sealed[1:3], "big") - 1).to_bytes(2, "big") + sealed[3:-1]
    with pytest.raises((AuthenticationError, MalformedMessageError)):
        open_checkpoint(forged, KEY, DEPLOYMENT)
    longest = replace(
        checkpoint, range=replace(checkpoint.range, validator=b'"' + b"x" * 126 + b'"')
    )
    sealed = seal_checkpoint(longest, KEY, DEPLOYMENT, os.urandom)
    carrier = Carrier.of(longest, sealed)
    assert Carrier.decode(carrier.encode()) == carrier
    message = seal_carrier(carrier_sealer(KEY, DEPLOYMENT, 1, sender=0), carrier, now=100.0)
    assert len(message) + 120 <= 1280
    with pytest.raises(MalformedMessageError, match="validator"):
        replace(checkpoint.range, validator=b"x" * 129)
    with pytest.raises(MalformedMessageError, match="range record"):
        sealed_length(b"\x03\x00\x05")
    with pytest.raises(MalformedMessageError, match="window"):
        replace(checkpoint, s2c_pos=checkpoint.range.window_start)


# -- a whole hand-over, simulated: the original, the replica, the spliced result ----------------


def resume(
    original: bytes, replica: bytes, checkpoint_at: int, client_at: int, cuts: list[int]
) -> bytes:
    """What the client ends up with: the original up to ``client_at``, then the new server's
    bytes, re-created from ``replica`` by a Range hand-over (raises RangeDiverged or
    AssertionError where the real Replayer raises Diverged)."""
    response_head = head(len(original))
    old = streamed(
        original[: checkpoint_at - len(response_head)], cuts, response_head=response_head
    )
    checkpoint = checkpoint_of(old, 0)
    chosen = plan(checkpoint, REQUEST, client_at)
    assert isinstance(chosen, RangePlan)
    answer = partial(chosen.first, len(replica)) + replica[chosen.first :]
    length = head_length(answer)
    assert length is not None
    assert check_answer(answer[:length], chosen) == Partial()
    new = StreamState(
        "http", c2s_start=checkpoint.c2s_fresh, s2c_start=checkpoint.s2c_fresh, range_min_body=1
    )
    new.feed_c2s(REQUEST)
    new.resume_range(chosen.record, chosen.s2c_start)
    body = answer[length:]
    rec = chosen.record
    window = body[rec.window_start - chosen.s2c_start : checkpoint.s2c_pos - chosen.s2c_start]
    if hashlib.sha256(window).digest() != rec.window_hash:
        raise RangeDiverged("window")
    new.feed_s2c(body)
    # The resumed state follows the response to its end: a new fresh point there.
    assert new.s2c_pos == len(response_head) + len(original)
    assert new.codec.boundaries == 1
    after = checkpoint_of(new, new.s2c_pos)
    assert after.s2c_fresh == new.s2c_pos
    assert after.s2c_hash != NO_HASH
    spliced = (response_head + original)[:client_at] + body[client_at - chosen.s2c_start :]
    return spliced[len(response_head) :]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(WINDOW_BYTES // 2, 4 * WINDOW_BYTES),
    st.data(),
)
def test_a_range_hand_over_gives_the_right_bytes_or_refuses(
    length: int, data: st.DataObject
) -> None:
    original = os.urandom(length)
    response_head_length = len(head(length))
    checkpoint_at = response_head_length + data.draw(st.integers(1, length))
    client_at = data.draw(st.integers(response_head_length, response_head_length + length))
    cuts = data.draw(st.lists(st.integers(0, 5 * WINDOW_BYTES), max_size=6))
    # The same file: the client ends with exactly the original.
    assert resume(original, original, checkpoint_at, client_at, cuts) == original
    # A byte changed inside the window: refused.
    window_start = max(response_head_length, checkpoint_at - WINDOW_BYTES)
    flip = data.draw(st.integers(window_start, checkpoint_at - 1)) - response_head_length
    changed = bytearray(original)
    changed[flip] ^= 0xFF
    with pytest.raises(RangeDiverged):
        resume(original, bytes(changed), checkpoint_at, client_at, cuts)


def test_a_resumed_stream_checkpoints_a_record_without_a_full_hash() -> None:
    original = os.urandom(300_000)
    response_head = head(len(original))
    old = streamed(original[:100_000], [4096], response_head=response_head)
    checkpoint = checkpoint_of(old, 0)
    chosen = plan(checkpoint, REQUEST, checkpoint.s2c_pos)
    assert isinstance(chosen, RangePlan)
    new = StreamState(
        "http", c2s_start=checkpoint.c2s_fresh, s2c_start=checkpoint.s2c_fresh, range_min_body=1
    )
    new.feed_c2s(REQUEST)
    new.resume_range(chosen.record, chosen.s2c_start)
    new.feed_s2c((response_head + original)[chosen.s2c_start : chosen.s2c_start + 150_000])
    later = checkpoint_of(new, 0)
    assert later.s2c_hash == NO_HASH
    assert later.range is not None
    assert not later.range.full_hash
    stop = later.s2c_pos
    assert (
        later.range.window_hash
        == hashlib.sha256((response_head + original)[stop - WINDOW_BYTES : stop]).digest()
    )
    # And it seals and opens (version 3 carries the flag).
    sealed = seal_checkpoint(later, KEY, DEPLOYMENT, os.urandom)
    assert not open_checkpoint(sealed, KEY, DEPLOYMENT).range.full_hash  # type: ignore[union-attr]


def test_the_expected_regeneration_of_a_range_checkpoint_does_not_grow_with_the_position() -> None:
    state = streamed(os.urandom(150_000), [1000], response_head=head(10_000_000))
    checkpoint = checkpoint_of(state, 0)
    v3 = seal_checkpoint(checkpoint, KEY, DEPLOYMENT, os.urandom)
    v1 = seal_checkpoint(replace(checkpoint, range=None), KEY, DEPLOYMENT, os.urandom)
    position = checkpoint.s2c_pos
    assert expected_regeneration(position + 1000, v3, position) == WINDOW_BYTES + 1000
    assert expected_regeneration(position + 1000, v1, position) == position + 1000
    assert expected_regeneration(500, None, 0) == 500
    assert expected_regeneration(200_000_000, v3, 200_000_000 - 5) == WINDOW_BYTES + 5


def test_the_meter_is_charged_what_a_range_reads_not_the_whole_response() -> None:
    from migrate.rangeplan import regeneration_bytes

    checkpoint = range_checkpoint(record())
    # From the window (1 000 000) to the client's claim.
    assert regeneration_bytes(checkpoint, REQUEST, 2_000_000) == 1_000_000
    # At least to the checkpoint's position.
    assert regeneration_bytes(checkpoint, REQUEST, 900_000) == 1_065_536 - 900_000
    # Without a usable plan: from the fresh point, as before.
    post = REQUEST.replace(b"GET", b"POST")
    assert regeneration_bytes(checkpoint, post, 2_000_000) == 2_000_000 - checkpoint.s2c_fresh


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**34))
def test_http_dates_read_as_the_standard_library_writes_them(seconds: int) -> None:
    import email.utils

    from migrate.rangeplan import http_date

    text = email.utils.formatdate(seconds, usegmt=True).encode()
    assert http_date(text) == seconds
    assert http_date(text.replace(b"GMT", b"UTC")) is None


def test_small_responses_are_not_looked_at_for_a_record() -> None:
    """Below MIN_BODY_BYTES a regeneration from the start is cheap: no record, and no head
    parsed per keep-alive GET."""
    from migrate.rangeplan import MIN_BODY_BYTES

    state = StreamState("http")
    state.feed_c2s(REQUEST)
    state.feed_s2c(head(MIN_BODY_BYTES - 1) + b"x" * 1000)
    assert checkpoint_of(state, 0).range is None
    big = StreamState("http")
    big.feed_c2s(REQUEST)
    big.feed_s2c(head(MIN_BODY_BYTES) + b"x" * 1000)
    assert checkpoint_of(big, 0).range is not None


def test_a_resumed_stream_past_its_response_with_the_client_behind_verifies_nothing() -> None:
    """Pipelined requests: the service's next response passes while the client has not yet
    acknowledged the end of the resumed one. A checkpoint then would hold neither a hash nor a
    range record (the next server diverged on it, every time): it is recognised, and not sent."""
    original = os.urandom(300_000)
    response_head = head(len(original))
    old = streamed(original[:100_000], [4096], response_head=response_head)
    checkpoint = checkpoint_of(old, 0)
    chosen = plan(checkpoint, REQUEST, checkpoint.s2c_pos)
    assert isinstance(chosen, RangePlan)
    new = StreamState(
        "http", c2s_start=checkpoint.c2s_fresh, s2c_start=checkpoint.s2c_fresh, range_min_body=1
    )
    new.feed_c2s(REQUEST + REQUEST)  # the next request is already there: pipelined
    new.resume_range(chosen.record, chosen.s2c_start)
    whole = response_head + original
    new.feed_s2c(whole[chosen.s2c_start : chosen.s2c_start + 50_000])
    inside = checkpoint_of(new, 0)
    assert not verifies_nothing(inside)  # a window of the resumed body: usable
    new.feed_s2c(whole[chosen.s2c_start + 50_000 :] + response_head + original[:70_000])
    past = checkpoint_of(new, chosen.s2c_start)  # the client still inside the resumed body
    assert verifies_nothing(past)
    done = checkpoint_of(new, len(whole) + 1)  # the client acknowledged the whole first answer
    assert not verifies_nothing(done)
    assert done.s2c_fresh == len(whole)


GET = b"GET /a HTTP/1.1\r\nHost: vip\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", True),
        (GET, True),
        (GET * 3, True),
        (GET + b"DELETE /a HTTP/1.1\r\nHost: vip\r\n\r\n", False),
        (b"POST /a HTTP/1.1\r\nHost: vip\r\nContent-Length: 2\r\n\r\nhi", False),
        (b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
        (GET + GET[:10], False),  # a request cut short
    ],
)
def test_only_whole_gets_without_a_body_are_sent_twice(data: bytes, expected: bool) -> None:
    assert resendable(data) is expected
