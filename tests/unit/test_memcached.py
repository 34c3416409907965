"""The memcached text protocol codec: a fresh point after every complete exchange."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate.codec import FreshPoint, codec_for
from migrate.memcached import MAX_LINE_BYTES, MAX_PENDING, MemcachedCodec
from tests.unit.budget import bounded_step

from .codec_steps import c2s, feed, s2c


def run(*steps: tuple[str, bytes], codec: MemcachedCodec | None = None) -> MemcachedCodec:
    return feed(codec or MemcachedCodec(), *steps)


SET = b"set k 0 0 5\r\nhello\r\n"
GET = b"get k\r\n"
HIT = b"VALUE k 0 5\r\nhello\r\nEND\r\n"


def test_codec_for_knows_memcached():
    codec = codec_for("memcached", c2s_start=3, s2c_start=4)
    assert isinstance(codec, MemcachedCodec)
    assert codec.fresh == FreshPoint(3, 4)


def test_each_complete_exchange_is_a_fresh_point():
    codec = run(c2s(SET), s2c(b"STORED\r\n"))
    assert codec.fresh == FreshPoint(len(SET), 8)
    run(c2s(GET), s2c(HIT[:-5]), codec=codec)
    assert codec.fresh == FreshPoint(len(SET), 8)  # the retrieval reply ends at END
    run(s2c(HIT[-5:]), codec=codec)
    assert codec.fresh == FreshPoint(len(SET + GET), 8 + len(HIT))
    assert codec.boundaries == 2
    assert codec.degraded is None


def test_pipelined_commands_with_noreply_and_every_classic_command():
    client = (
        SET
        + b"add a 1 -1 3 noreply\r\nabc\r\n"
        + b"cas k 0 0 2 99\r\nhi\r\n"
        + b"gets k a\r\n"
        + b"gat 100 k\r\n"
        + b"incr n 5\r\ndecr n 1 noreply\r\n"
        + b"touch k 10\r\ndelete a\r\n"
        + b"append k 0 0 0\r\n\r\n"
        + b"stats\r\nstats reset\r\nversion\nverbosity 1\r\nflush_all noreply\r\n"
    )
    server = (
        b"STORED\r\nEXISTS\r\n"
        + b"VALUE k 0 5 7\r\nhello\r\nVALUE a 1 3 8\r\nabc\r\nEND\r\n"
        + b"END\r\n"
        + b"NOT_FOUND\r\n"
        + b"TOUCHED\r\nDELETED\r\nSTORED\r\n"
        + b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\nRESET\r\nVERSION 1.6.21\r\nOK\r\n"
    )
    whole = run(c2s(client), s2c(server))
    assert whole.degraded is None
    assert whole.fresh == FreshPoint(len(client), len(server))
    for size in (1, 2, 3, 7, 13):
        codec = MemcachedCodec()
        for i in range(0, len(client), size):
            codec.feed_c2s(memoryview(bytearray(client[i : i + size])))
        for i in range(0, len(server), size):
            codec.feed_s2c(server[i : i + size])
        assert (codec.fresh, codec.boundaries) == (whole.fresh, whole.boundaries)


def test_noreply_commands_are_answered_when_those_before_them_are():
    codec = run(c2s(b"set a 0 0 1 noreply\r\nx\r\n"))
    assert codec.fresh == FreshPoint(24, 0)
    codec = run(c2s(GET + b"delete k noreply\r\n"), s2c(b"END\r\n"))
    assert codec.fresh == FreshPoint(len(GET + b"delete k noreply\r\n"), 5)


def test_meta_commands_and_quiet_groups():
    client = b"ms k 2 T0\r\nhi\r\nmg k v\r\nmg x v q\r\nmg k v q\r\nmd y q\r\nmn\r\nma n\r\n"
    head = b"HD\r\nVA 2\r\nhi\r\n"
    group = b"VA 2\r\nhi\r\nNF\r\nMN\r\n"
    codec = run(c2s(client), s2c(head + group[:-4]))
    assert codec.fresh == FreshPoint(client.index(b"mg x"), len(head))
    run(s2c(group[-4:]), codec=codec)
    assert codec.fresh == FreshPoint(client.index(b"ma n"), len(head + group))
    run(s2c(b"HD\r\n"), codec=codec)
    assert codec.fresh == FreshPoint(len(client), len(head + group) + 4)


def test_errors_answer_a_command():
    codec = run(c2s(b"get " + b"k" * 250 + b"\r\nversion\r\n"), s2c(b"CLIENT_ERROR bad\r\n"))
    assert codec.fresh.c2s == 256
    run(s2c(b"VERSION 1\r\n"), codec=codec)
    assert codec.degraded is None


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([c2s(b"\x80\x00\x00\x05")], "binary protocol"),
        ([c2s(b"frobnicate\r\n")], "unknown command"),
        ([c2s(b"set k 0 0\r\n")], "malformed set"),
        ([c2s(b"set k 0 0 -1\r\n")], "data length"),
        ([c2s(b"set k x 0 1\r\na\r\n")], "malformed set"),
        ([c2s(b"set k 0 0 1\r\nab\r\n")], "CRLF"),
        ([c2s(b"get " + b"k" * 251 + b"\r\n")], "key over"),
        ([c2s(b"get k" + b"x" * MAX_LINE_BYTES)], "line over"),
        ([c2s(b"\r\n")], "empty command"),
        ([s2c(b"STORED\r\n")], "reply without a command"),
        ([c2s(GET), s2c(b"STORED\r\n")], "unexpected line"),
        ([c2s(b"version\r\n"), s2c(b"VALUE k 0 1\r\nx\r\n")], "VALUE outside"),
        ([c2s(GET), s2c(b"VALUE k 0 z\r\n")], "malformed VALUE"),
        ([c2s(b"watch\r\n")], "not replayable"),
    ],
)
def test_what_cannot_be_followed_degrades(steps, fragment):
    codec = run(*steps)
    assert codec.degraded is not None
    assert fragment in codec.degraded, codec.degraded
    assert codec.fresh == FreshPoint(0, 0)


def test_watch_is_not_replayable():
    codec = run(c2s(b"watch fetchers\r\n"))
    assert codec.unreplayable is not None
    assert "watch" in codec.unreplayable


def test_too_many_unanswered_commands_degrade():
    codec = run(c2s(b"version\r\n" * (MAX_PENDING + 1)))
    assert codec.degraded is not None
    assert "wait for their replies" in codec.degraded


def test_huge_data_blocks_are_counted_not_allocated():
    with bounded_step("huge set"):
        codec = run(c2s(b"set k 0 0 1099511627776\r\n" + b"x" * 100000))
    assert codec.degraded is None
    with bounded_step("huge value"):
        codec = run(c2s(GET), s2c(b"VALUE k 0 1099511627776\r\n" + b"y" * 100000))
    assert codec.degraded is None


# --- fuzzing ------------------------------------------------------------------------------

_exchanges = st.sampled_from(
    [
        (SET, b"STORED\r\n"),
        (b"set k 0 0 3 noreply\r\nabc\r\n", b""),
        (GET, HIT),
        (b"gets k j\r\n", b"VALUE k 0 5 1\r\nhello\r\nEND\r\n"),
        (b"get nothing\n", b"END\r\n"),
        (b"incr n 1\r\n", b"2\r\n"),
        (b"delete k\r\n", b"NOT_FOUND\r\n"),
        (b"stats\r\n", b"STAT a 1\r\nEND\r\n"),
        (b"version\r\n", b"VERSION 1.6\r\n"),
        (b"mg k v\r\n", b"VA 1\r\nz\r\n"),
        (b"mg k q\r\nmg j v q\r\nmn\r\n", b"VA 1\r\nz\r\nMN\r\n"),
        (b"ms k 3\r\nabc\r\n", b"HD\r\n"),
        (b"set k 0 0 0\r\n\r\n", b"NOT_STORED\r\n"),
        (b"bogus\r\n", b"ERROR\r\n"),
    ]
)


@st.composite
def conversations(draw) -> list[tuple[str, bytes]]:
    steps: list[tuple[str, bytes]] = []
    owed: list[bytes] = []
    for _ in range(draw(st.integers(1, 10))):
        request, reply = draw(_exchanges)
        steps.append(c2s(request))
        owed.append(reply)
        answered = draw(st.integers(0, len(owed)))
        steps += [s2c(r) for r in owed[:answered] if r]
        owed = owed[answered:]
    return steps


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=conversations(),
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
)
def test_any_chunking_gives_the_result_of_the_whole_streams(steps, sizes, seed):
    whole = run(*steps)
    rng = random.Random(seed)
    codec = MemcachedCodec()
    for direction, data in steps:
        i = 0
        while i < len(data):
            size = sizes[rng.randrange(len(sizes))]
            (codec.feed_c2s if direction == "c2s" else codec.feed_s2c)(data[i : i + size])
            i += size
    assert (codec.fresh, codec.boundaries, codec.degraded) == (
        whole.fresh,
        whole.boundaries,
        whole.degraded,
    )
    if whole.degraded is None and b"bogus" not in b"".join(d for _, d in steps):
        client = b"".join(d for k, d in steps if k == "c2s")
        server = b"".join(d for k, d in steps if k == "s2c")
        fresh = whole.fresh
        resumed = MemcachedCodec(c2s_start=fresh.c2s, s2c_start=fresh.s2c)
        resumed.feed_c2s(client[fresh.c2s :])
        resumed.feed_s2c(server[fresh.s2c :])
        assert resumed.fresh == fresh


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
                            SET,
                            GET,
                            HIT,
                            b"VA 3\r\n",
                            b"MN\r\n",
                            b"mn\r\n",
                            b"q",
                            b" ",
                            b"\r\n",
                            b"99999999999999",
                            b"END\r\n",
                            b"noreply",
                            b"mg k q\r\n",
                            b"set",
                        ]
                    )
                ).map(b"".join),
            ),
        ),
        max_size=12,
    )
)
def test_garbage_never_raises(steps):
    run(*steps)
