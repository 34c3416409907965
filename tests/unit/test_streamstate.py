import hashlib
import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.checkpoint import TcpSnapshot
from migrate.streamstate import StreamHash, StreamState

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 19:10:00 GMT\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)
REQUEST = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


def chunked(data: bytes, cuts: list[int]) -> list[memoryview]:
    """Chunks as the relay hands them over: views into one reused bytearray."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    buffer = bytearray(len(data) + 16)
    views = []
    for a, b in itertools.pairwise(points):
        buffer[: b - a] = data[a:b]
        views.append(bytes(memoryview(buffer)[: b - a]))
    return [memoryview(bytearray(v)) for v in views]


@settings(max_examples=200)
@given(
    body=st.binary(max_size=2000),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
    hour=st.integers(0, 23),
)
def test_date_values_are_masked_and_nothing_else(body, cuts, hour):
    original = RESPONSE + body
    other_time = original.replace(b"19:10:00", f"{hour:02d}:59:59".encode())
    one, two = StreamHash(True), StreamHash(True)
    for chunk in chunked(original, cuts):
        one.update(chunk)
    two.update(other_time)
    assert one.digest() == two.digest()
    tampered = StreamHash(True)
    tampered.update(original[:-1] + bytes([original[-1] ^ 1]))
    assert tampered.digest() != one.digest()


@settings(max_examples=300)
@given(
    cut=st.integers(0, len(RESPONSE)),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    hour=st.integers(0, 23),
)
def test_two_replicas_cut_at_the_same_place_hash_alike_even_inside_a_date_line(cut, cuts, hour):
    # A checkpoint may be taken between two reads of one response head; the new server
    # regenerates exactly to that place: the Date value present so far is masked on both.
    original = RESPONSE[:cut]
    other_time = RESPONSE.replace(b"19:10:00", f"{hour:02d}:59:59".encode())[:cut]
    one, two = StreamHash(True), StreamHash(True)
    for chunk in chunked(original, cuts):
        one.update(chunk)
    two.update(other_time)
    assert one.digest() == two.digest()
    date = RESPONSE.index(b"Date: ")
    if cut > 0 and not date <= cut - 1 < date + len(b"Date: ") + 29:
        # Any other byte still counts.
        tampered = StreamHash(True)
        tampered.update(original[:-1] + bytes([original[-1] ^ 1]))
        assert tampered.digest() != one.digest()


def test_plain_hash_is_sha256():
    h = StreamHash(False)
    h.update(memoryview(bytearray(b"abc")))
    assert h.digest() == hashlib.sha256(b"abc").digest()
    assert h.copy().digest() == h.digest()


def snapshot():
    return TcpSnapshot(1, 2, 1448, 7, 7, True, True, 0)


def checkpoint(state, acked):
    return state.checkpoint(
        conn_id=b"c" * 16,
        client=("10.0.0.5", 4000),
        vport=80,
        epoch=1,
        counter=1,
        now=0.0,
        tcp=snapshot(),
        s2c_acked=acked,
    )


def test_fresh_point_advances_only_when_the_client_has_acknowledged_the_response():
    state = StreamState("http")
    state.feed_c2s(REQUEST)
    state.feed_s2c(RESPONSE)
    assert state.boundary_due
    before_ack = checkpoint(state, acked=len(RESPONSE) - 1)
    assert (before_ack.c2s_fresh, before_ack.s2c_fresh) == (0, 0)
    assert before_ack.c2s_hash == hashlib.sha256(REQUEST).digest()
    after_ack = checkpoint(state, acked=len(RESPONSE))
    assert (after_ack.c2s_fresh, after_ack.s2c_fresh) == (len(REQUEST), len(RESPONSE))
    assert after_ack.c2s_hash == hashlib.sha256(b"").digest()
    state.feed_c2s(REQUEST)
    assert checkpoint(state, acked=len(RESPONSE)).c2s_hash == hashlib.sha256(REQUEST).digest()


def test_a_message_ends_after_a_100_continue_and_after_an_exchange_only():
    state = StreamState("auto")
    head = b"PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nExpect: 100-continue\r\n\r\n"
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    state.feed_c2s(head)
    assert not state.message_ends_at(0)  # the fresh point itself is not past it
    state.feed_s2c(cont[:10])
    assert not state.message_ends_at(10)
    state.feed_s2c(cont[10:])
    assert state.codec_name == "http"
    assert state.message_ends_at(len(cont))
    assert not state.message_ends_at(len(cont) - 1)
    state.feed_c2s(b"12345678")
    created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    state.feed_s2c(created)
    assert state.message_ends_at(len(cont) + len(created))  # an exchange: a candidate
    assert not state.message_ends_at(len(cont) + 5)
    # Another protocol has no interim responses.
    redis = StreamState("resp")
    redis.feed_c2s(b"*1\r\n$4\r\nPING\r\n")
    assert not redis.message_ends_at(3)
    redis.feed_s2c(b"+PONG\r\n")
    assert redis.message_ends_at(7)


def test_replay_log_is_bounded():
    state = StreamState("generic", replay_limit=100)
    state.feed_c2s(os.urandom(101))
    assert state.unmigratable is not None
    assert checkpoint(state, acked=0).unmigratable


def test_a_resumed_state_computes_the_same_checkpoint():
    original = StreamState("http")
    original.feed_c2s(REQUEST)
    original.feed_s2c(RESPONSE[:40])
    first = checkpoint(original, acked=0)
    resumed = StreamState("http", c2s_start=first.c2s_fresh, s2c_start=first.s2c_fresh)
    resumed.feed_c2s(REQUEST)
    resumed.feed_s2c(RESPONSE[:40].replace(b"Wed", b"Wed"))
    again = checkpoint(resumed, acked=0)
    assert (again.c2s_hash, again.s2c_hash, again.s2c_pos) == (
        first.c2s_hash,
        first.s2c_hash,
        first.s2c_pos,
    )


def test_a_checkpoint_taken_before_auto_recognised_the_protocol_keeps_recognising_it():
    # A connection accepted just before its server left: its one checkpoint was taken before
    # any byte, with --codec auto undecided. The next server re-creates it from that
    # checkpoint and the replayed request, and its own checkpoint must mask HTTP Date values
    # like any HTTP one, or the server after it (another answer time) finds "different bytes".
    undecided = checkpoint(StreamState("auto"), acked=0)
    assert undecided.codec == "auto"
    second = StreamState(
        undecided.codec, c2s_start=undecided.c2s_fresh, s2c_start=undecided.s2c_fresh
    )
    second.feed_c2s(REQUEST)
    second.feed_s2c(RESPONSE)
    taken = checkpoint(second, acked=0)
    assert taken.codec == "http"
    third = StreamState(taken.codec, c2s_start=taken.c2s_fresh, s2c_start=taken.s2c_fresh)
    third.feed_c2s(REQUEST)
    third.feed_s2c(RESPONSE.replace(b"19:10:00", b"19:10:01"))
    assert checkpoint(third, acked=0).s2c_hash == taken.s2c_hash


def test_a_keyed_running_hash_is_blake3_and_only_replicas_with_the_key_agree():
    import blake3

    from migrate.checkpoint import stream_hash_key

    key = stream_hash_key(b"g" * 32, b"c" * 16)
    original = StreamState("http", hash_key=key)
    original.feed_c2s(REQUEST)
    original.feed_s2c(RESPONSE[:50])
    original.feed_s2c(RESPONSE[50:])
    taken = checkpoint(original, acked=0)
    assert taken.keyed_hash
    masked = RESPONSE.replace(b"Wed, 25 Nov 2026 19:10:00 GMT", b"*" * 29)
    assert taken.s2c_hash == blake3.blake3(masked, key=key).digest()

    def replica(hash_key: bytes) -> bytes:
        state = StreamState(
            taken.codec, c2s_start=taken.c2s_fresh, s2c_start=taken.s2c_fresh, hash_key=hash_key
        )
        state.feed_c2s(REQUEST)
        state.feed_s2c(RESPONSE.replace(b"19:10:00", b"23:59:59"))
        return checkpoint(state, acked=0).s2c_hash

    assert replica(key) == taken.s2c_hash
    assert replica(stream_hash_key(b"h" * 32, b"c" * 16)) != taken.s2c_hash  # another pool
    assert replica(stream_hash_key(b"g" * 32, b"d" * 16)) != taken.s2c_hash  # another connection


def resp(*args: str) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)


def test_a_redis_connection_checkpoints_its_session_state_and_only_unanswered_commands():
    state = StreamState("resp")
    session = resp("AUTH", "pw") + resp("SELECT", "3")
    state.feed_c2s(session)
    state.feed_s2c(b"+OK\r\n+OK\r\n")
    for k in range(1000):  # a long-lived connection: the log does not grow with its age
        state.feed_c2s(resp("GET", f"key{k}"))
        state.feed_s2c(b"$1\r\nv\r\n")
    state.feed_c2s(resp("SET", "a", "1"))  # unanswered: replayed
    point = checkpoint(state, acked=state.s2c_pos)
    assert point.codec == "resp"
    assert point.state == session
    assert point.c2s_pos - point.c2s_fresh == len(resp("SET", "a", "1"))
    assert state.replay_log() == resp("SET", "a", "1")
    # A new server resumes with the state and computes the same commitments.
    resumed = StreamState(
        "resp", c2s_start=point.c2s_fresh, s2c_start=point.s2c_fresh, state=point.state
    )
    resumed.feed_c2s(state.replay_log())
    again = checkpoint(resumed, acked=point.s2c_fresh)
    assert (again.c2s_hash, again.s2c_hash, again.state) == (
        point.c2s_hash,
        point.s2c_hash,
        point.state,
    )


def test_an_unreplayable_connection_is_marked_at_once():
    state = StreamState("resp")
    state.feed_c2s(resp("SUBSCRIBE", "news"))
    assert state.unmigratable is not None
    assert "not replayable" in state.unmigratable
    assert "SUBSCRIBE" in state.unmigratable
    assert checkpoint(state, acked=0).unmigratable


def test_commands_without_replies_keep_the_log_short():
    state = StreamState("memcached", replay_limit=1000)
    for _ in range(200):
        state.feed_c2s(b"set k 0 0 5 noreply\r\nhello\r\n")
        checkpoint(state, acked=state.s2c_pos)
    assert state.unmigratable is None
    assert state.replay_log() == b""
    assert len(state.candidates) == 1


def _exchange(index: int, body_size: int, date: bool) -> tuple[bytes, bytes]:
    request = b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % index
    head = b"HTTP/1.1 200 OK\r\nServer: nginx\r\n"
    if date:
        head += b"Date: Wed, 25 Nov 2026 19:%02d:00 GMT\r\n" % (index % 60)
    body = bytes((index + k) % 251 for k in range(body_size))
    return request, head + b"Content-Length: %d\r\n\r\n" % body_size + body


@settings(max_examples=150, deadline=None)
@given(
    exchanges=st.lists(
        st.tuples(st.integers(0, 3000), st.booleans(), st.integers(1, 9), st.integers(0, 3)),
        min_size=1,
        max_size=40,
    ),
    codec=st.sampled_from(["http", "auto", "generic"]),
)
def test_hashing_candidates_late_gives_the_same_checkpoints(exchanges, codec):
    """The backlog of unhashed chunks (``hash_backlog``) changes when candidates hash, never
    what: checkpoints equal those of a state that hashes every chunk at once, whatever the
    chunking, the acknowledgements and the moments of the checkpoints."""
    eager = StreamState(codec, hash_backlog=0)
    states = [eager, StreamState(codec), StreamState(codec, hash_backlog=300)]
    buffer = bytearray(8192)
    for index, (body_size, date, pieces, checkpoint_at) in enumerate(exchanges):
        request, response = _exchange(index, body_size, date)
        step = max(1, len(response) // pieces)
        for state in states:
            # As the relay hands chunks over: views into one reused buffer.
            buffer[: len(request)] = request
            state.feed_c2s(memoryview(buffer)[: len(request)])
            for start in range(0, len(response), step):
                piece = response[start : start + step]
                buffer[: len(piece)] = piece
                state.feed_s2c(memoryview(buffer)[: len(piece)])
        if checkpoint_at:
            # Acknowledged: all, none of the newest response, or a part of it.
            acked = eager.s2c_pos - (0, len(response), len(response) // 2)[checkpoint_at - 1]
            points = [checkpoint(state, acked=acked) for state in states]
            assert points[1:] == points[:1] * 2
    final = [checkpoint(state, acked=eager.s2c_pos) for state in states]
    assert final[1:] == final[:1] * 2


@settings(max_examples=100, deadline=None)
@given(
    exchanges=st.lists(st.integers(0, 400), min_size=1, max_size=300),
    every=st.integers(1, 200),
    lag=st.integers(0, 3),
)
def test_settling_when_the_backlog_is_full_gives_the_same_checkpoints(exchanges, every, lag):
    """With the client's acknowledged position at hand (``acked``), a full backlog settles
    the candidates the client acknowledged past instead of hashing them all (a keep-alive
    connection of fast GETs has one per response): the checkpoints stay those of eager
    hashing, whose settles come only with the checkpoints."""
    eager = StreamState("http", hash_backlog=0)
    late = StreamState("http", hash_backlog=2000)
    ends: list[int] = [0]  # s2c position after each response
    # The client has acknowledged all but the last ``lag`` responses, never more than what
    # the next checkpoint will be told.
    late.acked = lambda: ends[max(0, len(ends) - 1 - lag)]
    for index, body_size in enumerate(exchanges):
        request, response = _exchange(index, body_size, date=True)
        for state in (eager, late):
            state.feed_c2s(request)
            state.feed_s2c(response)
        ends.append(eager.s2c_pos)
        if index % every == every - 1:
            acked = ends[max(0, len(ends) - 1 - lag)]
            assert checkpoint(late, acked=acked) == checkpoint(eager, acked=acked)
    assert checkpoint(late, acked=eager.s2c_pos) == checkpoint(eager, acked=eager.s2c_pos)


BODY_DATE_LINE = b"\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n"


def _replica_stream(exchanges, head_hour: int, body_second: int) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """Requests and responses of ``exchanges`` (body size, a Date-like line in the body,
    chunked); the heads' Date hour and the body line's second vary per replica."""
    requests, responses = b"", b""
    for index, (size, dated_body, chunked) in enumerate(exchanges):
        requests += b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % index
        line = BODY_DATE_LINE.replace(b":00 GMT", b":%02d GMT" % body_second)
        body = bytes((index + k) % 251 for k in range(size))
        if dated_body:
            body = body[: size // 2] + line + body[size // 2 :]
        head = b"HTTP/1.1 200 OK\r\nDate: Wed, 25 Nov 2026 %02d:10:00 GMT\r\n" % head_hour
        if chunked:
            head += b"Transfer-Encoding: chunked\r\n\r\n"
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        else:
            head += b"Content-Length: %d\r\n\r\n" % len(body)
        responses += head + body
    return requests, responses


def _digest(requests: bytes, responses: bytes, cuts: list[int], **options) -> bytes:  # type: ignore[no-untyped-def]
    state = StreamState("http", **options)
    state.feed_c2s(requests)
    for chunk in chunked(responses, cuts):
        state.feed_s2c(chunk)
    return checkpoint(state, acked=0).s2c_hash


@settings(max_examples=200, deadline=None)
@given(
    exchanges=st.lists(
        st.tuples(st.integers(0, 300), st.booleans(), st.booleans()), min_size=1, max_size=10
    ),
    cuts_a=st.lists(st.integers(0, 10_000), max_size=20),
    cuts_b=st.lists(st.integers(0, 10_000), max_size=20),
    hour=st.integers(0, 23),
    backlog=st.sampled_from([0, 300, 32768]),
)
def test_replicas_cut_differently_hash_alike_and_bodies_are_hashed_as_they_are(
    exchanges, cuts_a, cuts_b, hour, backlog
):
    """Date values are masked in response heads (and chunked bodies), never in
    Content-Length bodies, whose bytes are hashed as they are: the digest depends on the
    stream's positions only, not on how the relay cut it into chunks."""
    requests, original = _replica_stream(exchanges, 19, 0)
    _, replica = _replica_stream(exchanges, hour, 0)
    one = _digest(requests, original, cuts_a, hash_backlog=backlog)
    assert _digest(requests, replica, cuts_b) == one
    if any(dated and not chunked for _, dated, chunked in exchanges):
        # A body differs only in a Date-like line of its own: that is a different body.
        _, other_body = _replica_stream(exchanges, 19, 7)
        assert _digest(requests, other_body, cuts_b) != one


def test_all_answered_once_every_request_has_its_whole_answer_under_a_request_codec() -> None:
    """A new server that regenerates gives up at once (not after a long idle wait) when the
    service has answered everything it was asked and is still short of the client."""
    get = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n"
    for codec in ("resp", "auto"):
        state = StreamState(codec)
        # Nothing asked yet (auto: the protocol not known yet either).
        assert state.all_answered() is (codec == "resp")
        state.feed_c2s(get + get)
        assert not state.all_answered()
        state.feed_s2c(b"$3\r\nxxx\r\n")
        assert not state.all_answered()  # one of two answered
        state.feed_s2c(b"$3\r\nxx")
        assert not state.all_answered()  # the second one in part
        state.feed_s2c(b"x\r\n")
        assert state.all_answered()
    http = StreamState("http")
    http.feed_c2s(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    http.feed_s2c(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert not http.all_answered()
    http.feed_s2c(b"cd")
    assert http.all_answered()


def test_a_service_that_may_speak_unasked_is_never_all_answered() -> None:
    generic = StreamState("generic")
    assert not generic.all_answered()  # a banner protocol speaks first
    generic.feed_c2s(b"HELO x\r\n")
    generic.feed_s2c(b"250 ok\r\n")
    assert not generic.all_answered()
    subscribed = StreamState("resp")
    subscribed.feed_c2s(b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n")
    subscribed.feed_s2c(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")
    assert not subscribed.all_answered()  # messages arrive unasked from now on
