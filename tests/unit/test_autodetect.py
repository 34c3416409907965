"""``--codec auto``: a connection's codec recognised from its first bytes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.autodetect import DETECT_BYTES, AutoCodec, Detection, detect, detect_server_first
from migrate.checkpoint import TcpSnapshot
from migrate.codec import CODEC_CHOICES, Http11Codec
from migrate.resp import RespCodec
from migrate.streamstate import StreamState
from roam_cli.main import build_parser

TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)


@pytest.mark.parametrize(
    ("first", "codec"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http"),
        (b"POST /form HTTP/1.0\r\n", "http"),
        (b"OPTIONS * HTTP/1.1\r\n", "http"),
        (b"GET http://example.org/ HTTP/1.1\r\n", "http"),
        (b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", "resp"),
        (b"PING\r\n", "resp"),
        (b"AUTH secret\r\n", "resp"),
        (b"GET key\r\n", "resp"),
        (b"get key\r\n", "memcached"),
        (b"set k 0 0 5\r\nhello\r\n", "memcached"),
        (b"mg k v\r\n", "memcached"),
        (b"version\n", "memcached"),
        (b"EHLO mail.example.org\r\n", "generic"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "generic"),  # PostgreSQL SSLRequest
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "generic"),
        (b"hello world\r\n", "generic"),
    ],
)
def test_known_protocols_are_recognised_from_their_first_bytes(first, codec):
    detection = detect(first)
    assert detection is not None
    assert detection.codec == codec
    assert detection.unreplayable is None
    # Byte by byte, the same answer as soon as there is one.
    auto = AutoCodec()
    for i in range(len(first)):
        auto.feed_c2s(first[i : i + 1])
    if auto.detection is None:  # waiting for more: the server's first byte decides
        auto.feed_s2c(b"x")
    assert auto.detection == detection
    assert auto.name == codec


@pytest.mark.parametrize(
    ("first", "what"),
    [(TLS_HELLO, "TLS"), (b"SSH-2.0-OpenSSH_9.2\r\n", "SSH")],
)
def test_tls_and_ssh_are_not_replayable(first, what):
    detection = detect(first)
    assert detection is not None
    assert detection.codec == "generic"
    assert detection.unreplayable is not None
    assert what in detection.unreplayable
    state = StreamState("auto")
    state.feed_c2s(first)
    assert state.unmigratable is not None
    assert "not replayable" in state.unmigratable
    assert what in state.unmigratable


def test_a_server_that_speaks_first_makes_it_generic():
    assert detect(b"") is None
    assert detect(b"", final=True) == Detection("generic", "the server spoke first")
    assert detect_server_first(b"220 ").codec == "generic"
    assert detect_server_first(b"SSH-").unreplayable is not None
    auto = AutoCodec()
    auto.feed_s2c(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert auto.unreplayable is not None
    auto.feed_c2s(b"SSH-2.0-client\r\n")
    assert auto.name == "generic"


def test_undecided_bytes_are_decided_by_the_servers_first_byte_or_the_bound():
    auto = AutoCodec()
    auto.feed_c2s(b"GET")
    assert auto.detection is None
    assert auto.name == "auto"
    auto.feed_s2c(b"+OK\r\n")
    assert auto.name == "generic"
    assert detect(b"a" * 15) is None
    assert detect(b"a" * DETECT_BYTES) == Detection("generic", "not a known protocol")


@settings(max_examples=2000, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=DETECT_BYTES),
        st.sampled_from(
            [b"GET / HTTP/1.1\r\n", b"*1\r\n", b"get k\r\n", b"PING\r\n", TLS_HELLO, b"SSH-2.0"]
        ).flatmap(lambda b: st.integers(0, len(b)).map(lambda k: b[:k])),
    ),
    cut=st.integers(0, DETECT_BYTES),
)
def test_a_decision_never_changes_with_more_bytes(data, cut):
    whole = detect(data, final=True)
    assert whole is not None
    early = detect(data[:cut])
    if early is not None:
        assert early == whole


def _feed(codec, steps):
    for direction, data in steps:
        (codec.feed_c2s if direction == "c2s" else codec.feed_s2c)(data)


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_the_chosen_codec_sees_every_byte(size):
    client = b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n*1\r\n$4\r\nPING\r\n"
    server = b"+OK\r\n+PONG\r\n"
    steps = [("c2s", client[i : i + size]) for i in range(0, len(client), size)]
    steps += [("s2c", server[i : i + size]) for i in range(0, len(server), size)]
    auto, direct = AutoCodec(c2s_start=5, s2c_start=7), RespCodec(c2s_start=5, s2c_start=7)
    _feed(auto, steps)
    _feed(direct, steps)
    assert auto.name == "resp"
    assert (auto.fresh, auto.boundaries, auto.degraded) == (
        direct.fresh,
        direct.boundaries,
        direct.degraded,
    )


def _checkpoint(state: StreamState):
    return state.checkpoint(
        conn_id=b"c" * 16,
        client=("10.0.0.5", 4000),
        vport=80,
        epoch=1,
        counter=1,
        now=0.0,
        tcp=TcpSnapshot(1, 2, 1448, 7, 7, True, True, 0),
        s2c_acked=state.s2c_pos,
    )


def test_a_stream_state_with_auto_checkpoints_the_chosen_codec():
    undecided = StreamState("auto")
    # Not recognised yet: the next server recognises it from the same replayed bytes.
    assert _checkpoint(undecided).codec == "auto"
    http = StreamState("auto")
    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    response = (
        b"HTTP/1.1 200 OK\r\nDate: Wed, 25 Nov 2026 19:10:00 GMT\r\nContent-Length: 1\r\n\r\nx"
    )
    http.feed_c2s(request)
    http.feed_s2c(response[:30])
    assert http.codec_name == "http"
    assert http.detection is not None
    assert isinstance(http.codec.chosen, Http11Codec)
    point = _checkpoint(http)
    assert point.codec == "http"
    # Dates are masked as with --codec http: a replica answering later hashes the same.
    direct = StreamState("http")
    direct.feed_c2s(request)
    direct.feed_s2c(response[:30].replace(b"19:10", b"20:11"))
    assert _checkpoint(direct).s2c_hash == point.s2c_hash
    redis = StreamState("auto")
    redis.feed_c2s(b"SELECT 1\r\nGET k\r\n")
    redis.feed_s2c(b"+OK\r\n$1\r\nv\r\n")
    point = _checkpoint(redis)
    assert (point.codec, point.state, point.c2s_fresh) == ("resp", b"SELECT 1\r\n", 17)
    assert point.c2s_hash == hashlib.sha256(b"").digest()


def test_auto_is_the_server_shims_default():
    assert CODEC_CHOICES[0] == "auto"
    parser = build_parser()
    args = parser.parse_args(
        ["server", "--deployment", "d", "--listen", "10.0.0.1:6379", "--service", "127.0.0.1:6379"]
    )
    assert args.codec == "auto"
