"""The RESP2/RESP3 (redis) codec: fresh points after answered commands, with session state."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate.codec import FreshPoint, codec_for, state_replies
from migrate.errors import ConfigError, MalformedMessageError
from migrate.resp import (
    MAX_DEPTH,
    MAX_HELD_BYTES,
    MAX_PENDING,
    MAX_STATE_BYTES,
    RespCodec,
    StateReplies,
)
from tests.unit.budget import bounded_step

from .codec_steps import c2s, feed, s2c


def cmd(*args: bytes | str) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


OK = b"+OK\r\n"


def run(*steps: tuple[str, bytes], codec: RespCodec | None = None) -> RespCodec:
    return feed(codec or RespCodec(), *steps)


def at(*steps: tuple[str, bytes]) -> tuple[int, int]:
    """Positions after these steps."""
    return (
        sum(len(d) for k, d in steps if k == "c2s"),
        sum(len(d) for k, d in steps if k == "s2c"),
    )


# --- exchanges and session state ----------------------------------------------------------


def test_codec_for_knows_resp_and_its_state():
    state = cmd("SELECT", "2")
    codec = codec_for("resp", c2s_start=10, s2c_start=20, state=state)
    assert isinstance(codec, RespCodec)
    assert codec.fresh == FreshPoint(10, 20, state)
    with pytest.raises(ConfigError, match="no session state"):
        codec_for("http", state=state)
    with pytest.raises(MalformedMessageError, match="not session state"):
        RespCodec(state=cmd("SET", "k", "v"))
    with pytest.raises(MalformedMessageError):
        RespCodec(state=b"*2\r\n$6\r\nSELECT")


def test_answered_commands_leave_only_the_session_state():
    steps = [
        c2s(cmd("AUTH", "secret") + cmd("SELECT", "2") + cmd("GET", "k")),
        s2c(OK + OK + b"$3\r\nabc\r\n"),
    ]
    codec = run(*steps)
    assert codec.fresh == FreshPoint(*at(*steps), cmd("AUTH", "secret") + cmd("SELECT", "2"))
    assert codec.boundaries == 3
    assert codec.degraded is None


def test_unanswered_commands_stay_in_the_replay():
    first = [c2s(cmd("SELECT", "1")), s2c(OK)]
    codec = run(*first, c2s(cmd("SET", "a", "1") + cmd("INCR", "n")), s2c(OK))
    # SET answered: the fresh point is just after it; INCR is unanswered and will be replayed.
    assert codec.fresh == FreshPoint(
        len(cmd("SELECT", "1") + cmd("SET", "a", "1")), 10, cmd("SELECT", "1")
    )


def test_pipelined_commands_are_answered_in_order_across_any_split():
    client = cmd("PING") + cmd("GET", "a") + b"PING\r\n" + cmd("MGET", "a", "b")
    server = b"+PONG\r\n$-1\r\n+PONG\r\n*2\r\n$1\r\nx\r\n$-1\r\n"
    whole = run(c2s(client), s2c(server))
    assert whole.fresh == FreshPoint(len(client), len(server))
    assert whole.boundaries == 4
    for cut in range(len(client) + 1):
        for scut in range(0, len(server) + 1, 3):
            codec = run(
                c2s(client[:cut]), c2s(client[cut:]), s2c(server[:scut]), s2c(server[scut:])
            )
            assert codec.fresh == whole.fresh
    bytewise = RespCodec()
    for i in range(len(client)):
        bytewise.feed_c2s(client[i : i + 1])
    for i in range(len(server)):
        bytewise.feed_s2c(memoryview(bytearray(server[i : i + 1])))
    assert (bytewise.fresh, bytewise.boundaries) == (whole.fresh, whole.boundaries)


def test_later_session_commands_replace_earlier_ones_and_failed_ones_do_not_count():
    codec = run(
        c2s(cmd("SELECT", "1") + cmd("AUTH", "a", "b") + cmd("SELECT", "2")),
        s2c(OK + OK + OK),
        c2s(cmd("AUTH", "wrong") + cmd("CLIENT", "SETNAME", "x") + cmd("READONLY")),
        s2c(b"-WRONGPASS invalid username-password pair\r\n" + OK + OK),
        c2s(cmd("CLIENT", "SETNAME", "y") + cmd("READWRITE")),
        s2c(OK + OK),
    )
    assert codec.fresh.state == (
        cmd("AUTH", "a", "b")
        + cmd("SELECT", "2")
        + cmd("CLIENT", "SETNAME", "y")
        + cmd("READWRITE")
    )


def test_hello_is_kept_with_its_map_reply_and_reset_clears_everything():
    hello_reply = b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n"
    codec = run(
        c2s(cmd("HELLO", "3", "AUTH", "u", "p") + cmd("CLIENT", "TRACKING", "on", "BCAST")),
        s2c(hello_reply + OK),
    )
    assert codec.fresh.state == cmd("HELLO", "3", "AUTH", "u", "p") + cmd(
        "CLIENT", "TRACKING", "on", "BCAST"
    )
    run(c2s(cmd("CLIENT", "TRACKING", "off")), s2c(OK), codec=codec)
    assert codec.fresh.state == cmd("HELLO", "3", "AUTH", "u", "p")
    run(c2s(cmd("RESET")), s2c(b"+RESET\r\n"), codec=codec)
    assert codec.fresh.state == b""


def test_a_transaction_is_replayed_whole_and_its_session_commands_count_at_exec():
    begin = [
        c2s(cmd("MULTI") + cmd("SELECT", "3") + cmd("INCR", "x")),
        s2c(OK + b"+QUEUED\r\n+QUEUED\r\n"),
    ]
    codec = run(*begin)
    assert codec.fresh == FreshPoint(0, 0)  # nothing fresh inside MULTI
    run(c2s(cmd("EXEC")), s2c(b"*2\r\n+OK\r\n:1\r\n"), codec=codec)
    assert codec.fresh.state == cmd("SELECT", "3")
    assert codec.fresh.c2s == len(begin[0][1] + cmd("EXEC"))
    # A transaction that did not run (WATCH fired: a null reply) changes no session state.
    aborted = run(
        c2s(cmd("WATCH", "k") + cmd("GET", "k") + cmd("MULTI") + cmd("SELECT", "4") + cmd("EXEC")),
        s2c(OK + b"$-1\r\n" + OK + b"+QUEUED\r\n" + b"*-1\r\n"),
    )
    assert aborted.fresh.state == b""
    assert aborted.boundaries == 1  # only after EXEC: WATCH holds the fresh point until then
    discarded = run(
        c2s(cmd("MULTI") + cmd("SELECT", "4") + cmd("DISCARD")), s2c(OK + b"+QUEUED\r\n" + OK)
    )
    assert discarded.fresh.state == b""
    assert discarded.boundaries == 1


def test_client_caching_binds_the_next_command():
    codec = run(
        c2s(cmd("CLIENT", "CACHING", "yes") + cmd("GET", "k")),
        s2c(OK),
    )
    assert codec.fresh == FreshPoint(0, 0)
    run(s2c(b"$1\r\nv\r\n"), codec=codec)
    assert codec.fresh.c2s == len(cmd("CLIENT", "CACHING", "yes") + cmd("GET", "k"))


def test_a_blocking_command_holds_the_fresh_point_until_it_is_answered():
    codec = run(c2s(cmd("GET", "a") + cmd("BLPOP", "q", "0")), s2c(b"$-1\r\n"))
    assert codec.fresh.c2s == len(cmd("GET", "a"))
    run(s2c(b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n"), codec=codec)
    assert codec.fresh.c2s == len(cmd("GET", "a") + cmd("BLPOP", "q", "0"))
    assert codec.degraded is None


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (cmd("SUBSCRIBE", "news"), "SUBSCRIBE"),
        (cmd("psubscribe", "n*"), "PSUBSCRIBE"),
        (b"MONITOR\r\n", "MONITOR"),
        (cmd("CLIENT", "REPLY", "OFF"), "CLIENT REPLY"),
        (cmd("CLIENT", "TRACKING", "on"), "BCAST"),
        (cmd("PSYNC", "?", "-1"), "replication"),
    ],
)
def test_what_a_new_server_cannot_recreate_is_declared_at_once(command, reason):
    codec = run(c2s(cmd("SELECT", "1")), s2c(OK), c2s(command))
    assert codec.unreplayable is not None
    assert reason in codec.unreplayable
    assert codec.degraded is not None
    assert "not replayable" in codec.degraded
    run(s2c(OK), codec=codec)
    assert codec.fresh == FreshPoint(len(cmd("SELECT", "1")), len(OK), cmd("SELECT", "1"))


def test_inline_commands_and_blank_lines():
    client = b"\r\n  \r\nSELECT 5\r\nping\n"
    codec = run(c2s(client), s2c(OK + b"+PONG\r\n"))
    assert codec.fresh == FreshPoint(len(client), len(OK) + 7, b"SELECT 5\r\n")
    # An empty array is no command either.
    codec = run(c2s(b"*0\r\n" + cmd("PING")), s2c(b"+PONG\r\n"))
    assert codec.fresh.c2s == 4 + len(cmd("PING"))


def test_every_resp3_reply_type():
    replies = [
        b"+OK\r\n",
        b"-ERR x\r\n",
        b":-12\r\n",
        b"$0\r\n\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"_\r\n",
        b",3.14\r\n",
        b",inf\r\n",
        b"#t\r\n",
        b"(3492890328409238509324850943850943825024385\r\n",
        b"!21\r\nSYNTAX invalid syntax\r\n",
        b"=15\r\ntxt:Some string\r\n",
        b"%2\r\n+first\r\n:1\r\n+second\r\n*2\r\n:2\r\n%0\r\n",
        b"~3\r\n+a\r\n+b\r\n*0\r\n",
        # An attribute precedes the reply it describes; it is not a reply.
        b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2039123\r\n:9543892\r\n",
        # Attributes may sit inside an aggregate too.
        b"*2\r\n|1\r\n+ttl\r\n:3\r\n:1\r\n:2\r\n",
        b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n",
        b"*?\r\n:1\r\n$?\r\n;1\r\nx\r\n;0\r\n%?\r\n+a\r\n:1\r\n.\r\n.\r\n",
    ]
    push = b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n_\r\n"  # out of band: answers nothing
    client = b"".join(cmd("GET", str(k)) for k in range(len(replies)))
    server = push + b"".join(r + push for r in replies)
    codec = run(c2s(client), s2c(server))
    assert codec.degraded is None
    assert codec.boundaries == len(replies)
    # Fresh just after the last reply: the push after it is out of band, before or after.
    assert codec.fresh == FreshPoint(len(client), len(server) - len(push))
    for size in (1, 2, 5, 7):
        chunked = RespCodec()
        chunked.feed_c2s(client)
        for i in range(0, len(server), size):
            chunked.feed_s2c(server[i : i + size])
        assert (chunked.fresh, chunked.boundaries) == (codec.fresh, codec.boundaries)


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([c2s(b"*x\r\n")], "invalid multibulk length"),
        ([c2s(b"*1\r\n:1\r\n")], "expected '$'"),
        ([c2s(b"*1\r\n$3\r\nGETxx")], "CRLF"),
        ([c2s(b"*1\r\n$-1\r\n")], "invalid bulk length"),
        ([c2s(b"*1" + b"1" * 40)], "multibulk header"),
        ([c2s(b"GET " + b"a" * 70000)], "inline command over"),
        ([c2s(b'SET "a b" c\r\n')], "quotes"),
        ([s2c(OK)], "reply without a command"),
        ([c2s(cmd("GET", "k")), s2c(b"?what\r\n")], "unknown reply type"),
        ([c2s(cmd("GET", "k")), s2c(b"$3\r\nabcd")], "CRLF"),
        ([c2s(cmd("GET", "k")), s2c(b"%-1\r\n")], "null length"),
        ([c2s(cmd("GET", "k")), s2c(b".\r\n")], "streamed aggregate"),
        ([c2s(cmd("GET", "k")), s2c(b"+OK\n")], "CRLF"),
        ([c2s(cmd("GET", "k")), s2c(b"*1\r\n" * (MAX_DEPTH + 1))], "nested deeper"),
        ([c2s(cmd("AUTH", "p" * MAX_STATE_BYTES))], "too long"),
    ],
)
def test_what_cannot_be_followed_degrades(steps, fragment):
    codec = run(*steps)
    assert codec.degraded is not None
    assert fragment in codec.degraded, codec.degraded
    assert "\n" not in codec.degraded
    assert codec.fresh == FreshPoint(0, 0)


def test_session_state_beyond_its_bound_degrades():
    name = "n" * 200
    steps = []
    for k in range(4):
        steps += [c2s(cmd("CLIENT", "SETINFO", f"LIB-{k}", name)), s2c(OK)]
    codec = run(*steps)
    assert codec.degraded is not None
    assert "session state over" in codec.degraded


def test_session_commands_waiting_for_replies_are_bounded_in_bytes():
    select = cmd("CLIENT", "SETNAME", "n" * 600)
    codec = run(c2s(select * (MAX_HELD_BYTES // len(select) + 1)))
    assert codec.degraded is not None
    assert "session commands wait" in codec.degraded
    # Inside a transaction too, where they wait for EXEC after their QUEUED.
    steps = [c2s(cmd("MULTI")), s2c(OK)]
    for _ in range(MAX_HELD_BYTES // len(select) + 1):
        steps += [c2s(select), s2c(b"+QUEUED\r\n")]
    codec = run(*steps)
    assert codec.degraded is not None
    # Answered ones no longer count.
    steps = []
    for _ in range(3 * MAX_HELD_BYTES // len(select)):
        steps += [c2s(select), s2c(OK)]
    codec = run(*steps)
    assert codec.degraded is None


@pytest.mark.parametrize("header", [b"*01\r\n", b"*+1\r\n", b"*-0\r\n", b"* 1\r\n"])
def test_numbers_are_read_as_redis_reads_them(header):
    codec = run(c2s(header + cmd("PING")[4:]))
    assert codec.degraded is not None
    assert "multibulk length" in codec.degraded


def test_too_many_unanswered_commands_degrade():
    codec = run(c2s(b"PING\r\n" * (MAX_PENDING + 1)))
    assert codec.degraded is not None
    assert "wait for their replies" in codec.degraded


def test_huge_lengths_and_counts_are_counted_not_allocated():
    huge = [
        c2s(b"*2147483647\r\n$5\r\nRPUSH\r\n$1099511627776\r\n" + b"x" * 1000),
        s2c(b""),
    ]
    with bounded_step("huge multibulk"):
        codec = run(*huge)
    assert codec.degraded is None
    with bounded_step("huge reply"):
        codec = run(
            c2s(cmd("LRANGE", "l", "0", "-1")),
            s2c(b"*2147483647\r\n" + b"$1099511627776\r\n" + b"y" * 100000),
        )
    assert codec.degraded is None


# --- a new server resumes from a fresh point ----------------------------------------------


def test_state_replies_are_read_exactly_and_an_error_refuses():
    state = cmd("AUTH", "pw") + cmd("HELLO", "3") + b"SELECT 2\r\n"
    replies = StateReplies(state)
    hello = b"%1\r\n+proto\r\n:3\r\n"
    service = OK + hello + OK + b"$3\r\nabc\r\n"
    consumed = 0
    for i in range(len(service)):  # one byte at a time
        if replies.done:
            break
        consumed += replies.feed(service[i : i + 1])
    assert replies.done
    assert replies.refused is None
    assert consumed == len(OK + hello + OK)
    refused = state_replies("resp", state)
    assert refused.feed(b"-WRONGPASS invalid\r\n" + hello) == len(b"-WRONGPASS invalid\r\n")
    assert refused.done
    assert refused.refused is not None
    assert StateReplies(b"").done


def test_a_resumed_codec_keeps_the_session_and_reaches_the_same_fresh_point():
    client = cmd("SELECT", "2") + cmd("GET", "a") + cmd("AUTH", "x") + cmd("GET", "b")
    server = OK + b"$1\r\n1\r\n" + OK + b"$1\r\n2\r\n"
    original = run(c2s(client), s2c(server[:12]))
    resume = original.fresh
    assert resume.state == cmd("SELECT", "2")
    resumed = RespCodec(c2s_start=resume.c2s, s2c_start=resume.s2c, state=resume.state)
    run(c2s(client[resume.c2s :]), s2c(server[resume.s2c :]), codec=resumed)
    run(s2c(server[12:]), codec=original)
    assert resumed.fresh == original.fresh
    assert resumed.fresh.state == cmd("SELECT", "2") + cmd("AUTH", "x")


# --- fuzzing ------------------------------------------------------------------------------

_scalars = st.one_of(
    st.binary(max_size=20)
    .filter(lambda b: b"\r" not in b and b"\n" not in b)
    .map(lambda b: b"+" + b + b"\r\n"),
    st.integers(-(2**63), 2**63).map(lambda n: b":%d\r\n" % n),
    st.binary(max_size=30).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.binary(max_size=30).map(lambda b: b"=%d\r\ntxt:%s\r\n" % (len(b) + 4, b)),
    st.sampled_from([b"$-1\r\n", b"*-1\r\n", b"_\r\n", b"#f\r\n", b",-1.5e10\r\n", b"(-123\r\n"]),
    st.lists(st.binary(min_size=1, max_size=8), max_size=3).map(
        lambda parts: (
            b"$?\r\n" + b"".join(b";%d\r\n%s\r\n" % (len(p), p) for p in parts) + b";0\r\n"
        )
    ),
)


def _aggregate(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    def build(kind: bytes, items: list[bytes], streamed: bool) -> bytes:
        if kind in (b"%", b"|"):
            items = items[: len(items) // 2 * 2]
            count = len(items) // 2
        else:
            count = len(items)
        if streamed and kind != b"|":
            return kind + b"?\r\n" + b"".join(items) + b".\r\n"
        # An attribute is no value: the value it describes follows it.
        after = b":1\r\n" if kind == b"|" else b""
        return kind + b"%d\r\n" % count + b"".join(items) + after

    return st.builds(
        build,
        st.sampled_from([b"*", b"~", b"%", b"|"]),
        st.lists(children, max_size=4),
        st.booleans(),
    )


_values = st.recursive(_scalars, _aggregate, max_leaves=12)
_errors = st.sampled_from([b"-ERR no\r\n", b"!5\r\nERR x\r\n"])
_pushes = st.sampled_from([b"", b">2\r\n+invalidate\r\n*1\r\n+k\r\n"])

_commands = st.sampled_from(
    [
        cmd("GET", "k"),
        cmd("SET", "k", "v" * 40),
        b"PING\r\n",
        b"\r\n",
        cmd("SELECT", "1"),
        cmd("SELECT", "2"),
        cmd("AUTH", "user", "pw"),
        cmd("HELLO", "3"),
        cmd("CLIENT", "SETNAME", "me"),
        cmd("READONLY"),
        cmd("MULTI"),
        cmd("EXEC"),
        cmd("DISCARD"),
        cmd("WATCH", "k"),
        cmd("UNWATCH"),
        cmd("RESET"),
        cmd("BLPOP", "q", "0"),
        cmd("CLIENT", "CACHING", "yes"),
        b"*0\r\n",
    ]
)


@st.composite
def conversations(draw) -> tuple[list[tuple[str, bytes]], int]:
    """A client pipelining commands and a server answering them, in causal order."""
    steps: list[tuple[str, bytes]] = []
    waiting = 0
    for _ in range(draw(st.integers(1, 12))):
        command = draw(_commands)
        steps.append(c2s(command))
        if command.strip(b"\r\n ") and command != b"*0\r\n":
            waiting += 1
        answer = draw(st.integers(0, waiting))
        for _ in range(answer):
            value = draw(st.one_of(_values, _errors))
            steps.append(s2c(value + draw(_pushes)))
        waiting -= answer
    return steps, waiting


def _feed(codec: RespCodec, steps: list[tuple[str, bytes]], sizes: list[int], seed: int) -> None:
    rng = random.Random(seed)
    for direction, data in steps:
        i = 0
        while i < len(data):
            size = sizes[rng.randrange(len(sizes))]
            chunk = data[i : i + size]
            if rng.random() < 0.3:
                chunk = memoryview(bytearray(chunk))
            (codec.feed_c2s if direction == "c2s" else codec.feed_s2c)(chunk)
            i += size


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conversation=conversations(),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    seed=st.integers(0, 2**32),
)
def test_any_chunking_gives_the_result_of_the_whole_streams(conversation, sizes, seed):
    steps, _ = conversation
    whole = RespCodec()
    for direction, data in steps:
        (whole.feed_c2s if direction == "c2s" else whole.feed_s2c)(data)
    codec = RespCodec()
    _feed(codec, steps, sizes, seed)
    assert (codec.fresh, codec.boundaries, codec.degraded) == (
        whole.fresh,
        whole.boundaries,
        whole.degraded,
    )
    if whole.degraded is None:
        # A new server resumes at the fresh point with its state and reaches the same point.
        fresh = whole.fresh
        client = b"".join(d for k, d in steps if k == "c2s")
        server = b"".join(d for k, d in steps if k == "s2c")
        resumed = RespCodec(c2s_start=fresh.c2s, s2c_start=fresh.s2c, state=fresh.state)
        resumed.feed_c2s(client[fresh.c2s :])
        resumed.feed_s2c(server[fresh.s2c :])
        assert resumed.fresh == fresh
        assert resumed.degraded is None
        # And the state's replies are recognised as such.
        assert StateReplies(fresh.state).feed(OK * 40) == len(OK) * len(
            RespCodec(state=fresh.state)._session
        )


@settings(max_examples=500, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["c2s", "s2c"]),
            st.one_of(
                st.binary(max_size=64),
                st.lists(
                    st.sampled_from(
                        [
                            b"*",
                            b"$",
                            b"%",
                            b"|",
                            b">",
                            b"?",
                            b";",
                            b".",
                            b"\r\n",
                            b"-1",
                            b"3",
                            b"0",
                            b"99999999999999999999999",
                            b"x",
                            OK,
                            cmd("GET", "k"),
                            cmd("MULTI"),
                        ]
                    )
                ).map(b"".join),
            ),
        ),
        max_size=12,
    )
)
def test_garbage_never_raises(steps):
    codec = RespCodec()
    replies = StateReplies(cmd("SELECT", "1"))
    for direction, data in steps:
        before = codec.fresh
        (codec.feed_c2s if direction == "c2s" else codec.feed_s2c)(data)
        assert codec.fresh.c2s >= before.c2s
        replies.feed(data)


_pieces = st.sampled_from(
    [b"*", b"$", b"+", b"-", b":", b"1", b"2", b"0", b"-1", b"01", b"\r\n", b"\n", b"\r", b"ab",
     b"GET", b"SELECT", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"+OK\r\n", b"$3\r\nabc\r\n"]
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    client=st.lists(_pieces, max_size=12).map(b"".join),
    server=st.lists(_pieces, max_size=12).map(b"".join),
)
def test_whole_chunks_and_single_bytes_agree_on_anything(client, server):
    """The fast path (whole commands and replies in one chunk) and the byte-wise reader agree,
    on valid and invalid input alike."""
    whole = RespCodec()
    whole.feed_c2s(client)
    whole.feed_s2c(server)
    bytewise = RespCodec()
    for i in range(len(client)):
        bytewise.feed_c2s(client[i : i + 1])
    for i in range(len(server)):
        bytewise.feed_s2c(server[i : i + 1])
    assert (whole.fresh, whole.boundaries, whole.degraded) == (
        bytewise.fresh,
        bytewise.boundaries,
        bytewise.degraded,
    )
