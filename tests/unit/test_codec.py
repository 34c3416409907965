"""Stream codecs: the fresh point of a connection, from HTTP/1.1 request/response boundaries."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate.codec import (
    CODEC_NAMES,
    MAX_HEAD_BYTES,
    MAX_INTERIM_KEPT,
    MAX_PIPELINED,
    FreshPoint,
    GenericCodec,
    Http11Codec,
    StreamCodec,
    codec_for,
)
from migrate.errors import ConfigError

from .codec_steps import c2s, s2c

# --- helpers ------------------------------------------------------------------------------


class Watched:
    """Feeds a codec and checks, after every call, what must hold whatever the input."""

    def __init__(self, codec: StreamCodec, c2s_start: int = 0, s2c_start: int = 0) -> None:
        self.codec = codec
        self.c2s_start = c2s_start
        self.s2c_start = s2c_start
        self.c2s = c2s_start
        self.s2c = s2c_start
        self.frozen: tuple[FreshPoint, int, str] | None = None

    def feed(self, direction: str, data: bytes | memoryview) -> None:
        codec = self.codec
        fresh, boundaries = codec.fresh, codec.boundaries
        if direction == "c2s":
            codec.feed_c2s(data)
            self.c2s += len(data)
        else:
            codec.feed_s2c(data)
            self.s2c += len(data)
        now = codec.fresh
        assert now.c2s >= fresh.c2s
        assert now.s2c >= fresh.s2c
        assert codec.boundaries >= boundaries
        assert self.c2s_start <= now.c2s <= self.c2s
        assert self.s2c_start <= now.s2c <= self.s2c
        if self.frozen is not None:
            assert (now, codec.boundaries, codec.degraded) == self.frozen
        elif codec.degraded is not None:
            reason = codec.degraded
            assert reason
            assert "\n" not in reason
            assert "\r" not in reason
            self.frozen = (now, codec.boundaries, reason)

    def run(self, *steps: tuple[str, bytes]) -> Watched:
        for direction, data in steps:
            self.feed(direction, data)
        return self


def http(*steps: tuple[str, bytes], c2s_start: int = 0, s2c_start: int = 0) -> Http11Codec:
    codec = Http11Codec(c2s_start=c2s_start, s2c_start=s2c_start)
    Watched(codec, c2s_start, s2c_start).run(*steps)
    return codec


def bytewise(*steps: tuple[str, bytes]) -> Http11Codec:
    """The same steps, one byte per call."""
    return http(*((d, data[i : i + 1]) for d, data in steps for i in range(len(data))))


GET = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


def post(body: bytes, *headers: bytes) -> bytes:
    lines = [b"POST /form HTTP/1.1", b"Host: example.org", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def assert_degraded(codec: Http11Codec, fragment: str, fresh: FreshPoint, boundaries: int = 0):
    assert codec.degraded is not None
    assert fragment in codec.degraded, codec.degraded
    assert codec.fresh == fresh
    assert codec.boundaries == boundaries


# --- API ----------------------------------------------------------------------------------


def test_codec_for_knows_generic_and_http():
    assert CODEC_NAMES[:2] == ("generic", "http")
    assert isinstance(codec_for("generic"), GenericCodec)
    assert isinstance(codec_for("http"), Http11Codec)
    for name in CODEC_NAMES:
        codec = codec_for(name, c2s_start=7, s2c_start=9)
        assert isinstance(codec, StreamCodec)
        assert codec.name == name
        assert codec.fresh == FreshPoint(7, 9)
    with pytest.raises(ConfigError, match="unknown codec 'smtp'"):
        codec_for("smtp")


def test_negative_positions_are_the_callers_mistake():
    with pytest.raises(ValueError, match="negative"):
        FreshPoint(-1, 0)
    with pytest.raises(ValueError, match="negative"):
        Http11Codec(s2c_start=-5)
    with pytest.raises(ValueError, match="negative"):
        GenericCodec(c2s_start=-1)


def test_generic_codec_never_moves():
    codec = GenericCodec()
    Watched(codec).run(c2s(GET), s2c(OK), c2s(GET), s2c(OK))
    assert codec.fresh == FreshPoint(0, 0)
    assert codec.boundaries == 0
    assert codec.degraded is None


def test_before_any_response_the_fresh_point_is_the_start():
    assert http().fresh == FreshPoint(0, 0)
    codec = http(c2s(GET + GET), s2c(OK[:-1]), c2s_start=100, s2c_start=200)
    assert codec.fresh == FreshPoint(100, 200)
    assert codec.boundaries == 0


# --- exchanges ----------------------------------------------------------------------------


def test_keep_alive_exchanges_advance_the_fresh_point():
    codec = Http11Codec()
    watched = Watched(codec)
    for k in range(1, 4):
        watched.run(c2s(GET))
        assert codec.boundaries == k - 1
        watched.run(s2c(OK))
        assert codec.boundaries == k
        assert codec.fresh == FreshPoint(k * len(GET), k * len(OK))
    assert codec.degraded is None


def test_fresh_point_is_the_end_of_the_request_even_before_the_next_begins():
    codec = http(c2s(post(b"abc", b"Content-Length: 3")), s2c(OK))
    assert codec.fresh == FreshPoint(len(post(b"abc", b"Content-Length: 3")), len(OK))


def test_starting_positions_are_absolute():
    codec = http(c2s(GET), s2c(OK), c2s_start=1_000_000, s2c_start=5_000_000)
    assert codec.fresh == FreshPoint(1_000_000 + len(GET), 5_000_000 + len(OK))


def test_pipelined_requests_are_answered_in_order():
    head = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
    head_ok = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"  # HEAD: no body follows
    requests = [GET, head, post(b"xyz", b"Content-Length: 3")]
    responses = [OK, head_ok, NO_CONTENT]
    codec = Http11Codec()
    watched = Watched(codec).run(c2s(b"".join(requests)))
    for k in range(3):
        watched.run(s2c(responses[k]))
        assert codec.boundaries == k + 1
        assert codec.fresh == FreshPoint(
            sum(map(len, requests[: k + 1])), sum(map(len, responses[: k + 1]))
        )


def test_response_completes_only_once_its_request_has_fully_arrived():
    # A server may answer before reading the whole body (413, 401, 417 to Expect).
    request = post(b"0123456789", b"Content-Length: 10")
    early = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"
    codec = Http11Codec()
    watched = Watched(codec).run(c2s(request[:-4]), s2c(early))
    assert codec.boundaries == 0
    assert codec.fresh == FreshPoint(0, 0)
    watched.run(c2s(request[-4:]))
    assert codec.boundaries == 1
    assert codec.fresh == FreshPoint(len(request), len(early))


def test_content_length_bodies_may_hold_anything():
    body = b"HTTP/1.1 200 OK\r\n\r\n\r\n\r\n\n\n\x00"
    request = post(body, b"content-length:" + str(len(body)).encode() + b"  ")
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\nGET / H"
    codec = http(c2s(request), s2c(response))
    assert codec.degraded is None
    assert codec.fresh == FreshPoint(len(request), len(response))


def test_chunked_bodies_with_extensions_and_trailers():
    request = post(
        b'4;name=value\r\nWiki\r\n5 ; quoted="a;b"\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n'
        b"0;last\r\nExpires: never\r\nX-Checksum: 42\r\n\r\n",
        b"Transfer-Encoding: gzip, chunked",
    )
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"000a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n"
    )
    for feed in (http, bytewise):
        codec = feed(c2s(request), s2c(response))
        assert codec.degraded is None, codec.degraded
        assert codec.boundaries == 1
        assert codec.fresh == FreshPoint(len(request), len(response))


def test_100_continue_is_interim_and_the_body_follows():
    head = post(b"", b"Content-Length: 4", b"Expect: 100-continue")
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    codec = Http11Codec()
    watched = Watched(codec).run(c2s(head), s2c(cont))
    assert codec.boundaries == 0
    watched.run(c2s(b"data"), s2c(hints))
    assert codec.boundaries == 0
    watched.run(s2c(OK))
    assert codec.boundaries == 1
    assert codec.fresh == FreshPoint(len(head) + 4, len(cont) + len(hints) + len(OK))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 200), max_size=12), st.integers(0, 12))
def test_interim_response_ends_are_remembered_however_the_bytes_are_cut(cuts, count):
    # An upload's head with Expect: 100-continue; interim responses, the body, the answer.
    head = post(b"", b"Content-Length: 4", b"Expect: 100-continue")
    interim = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]
    service = b"".join(interim[i % 2] for i in range(count)) + OK
    ends, position = [], 0
    for i in range(count):
        position += len(interim[i % 2])
        ends.append(position)
    codec = Http11Codec(s2c_start=0)
    codec.feed_c2s(head + b"data")
    start = 0
    for cut in [*sorted(set(cuts)), len(service)]:
        codec.feed_s2c(service[start:cut])
        start = max(start, cut)
    assert codec.degraded is None
    assert codec.boundaries == 1
    # The latest MAX_INTERIM_KEPT only; a final response's end is an exchange, not interim.
    assert list(codec.interim_ends) == ends[-MAX_INTERIM_KEPT:]


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status):
    # A Content-Length on a 304 describes the representation, not this message.
    response = f'HTTP/1.1 {status} X\r\nContent-Length: 99\r\nETag: "e"\r\n\r\n'.encode()
    codec = http(c2s(GET + GET), s2c(response + OK))
    assert codec.degraded is None
    assert codec.boundaries == 2
    assert codec.fresh == FreshPoint(2 * len(GET), len(response) + len(OK))


def test_head_response_has_no_body_even_when_chunked():
    head = b"HEAD /big HTTP/1.1\r\nHost: a\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    codec = http(c2s(head + GET), s2c(response + OK))
    assert codec.boundaries == 2
    assert codec.fresh == FreshPoint(len(head) + len(GET), len(response) + len(OK))


def test_empty_lines_before_a_request_belong_to_that_request():
    # RFC 9112 section 2.2: some clients send a CRLF after a POST body.
    first = post(b"ab", b"Content-Length: 2")
    second = b"\r\n\r\n" + GET
    for feed in (http, bytewise):
        codec = feed(c2s(first + second), s2c(OK))
        assert codec.fresh == FreshPoint(len(first), len(OK))
        codec = feed(c2s(first + second), s2c(OK + OK))
        assert codec.fresh == FreshPoint(len(first) + len(second), 2 * len(OK))


def test_connection_close_is_just_the_last_exchange():
    request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    codec = http(c2s(request), s2c(response))
    assert codec.degraded is None
    assert codec.fresh == FreshPoint(len(request), len(response))


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
def test_a_body_until_close_ends_the_boundaries_without_degrading(response):
    codec = Http11Codec()
    watched = Watched(codec).run(c2s(GET), s2c(OK), c2s(GET))
    watched.run(s2c(response + b"HTTP/1.1 200 OK\r\n\r\n" * 3))
    assert codec.degraded is None
    assert codec.boundaries == 1
    assert codec.fresh == FreshPoint(len(GET), len(OK))
    watched.run(c2s(b"\x00garbage\r\n\r\n"), c2s(GET), s2c(OK))
    assert (codec.boundaries, codec.degraded) == (1, None)


def test_large_content_length_is_counted_not_buffered():
    size = 10**12
    request = post(b"", f"Content-Length: {size}".encode())
    codec = Http11Codec()
    watched = Watched(codec).run(c2s(request))
    chunk = bytes(1 << 20)
    for _ in range(4):
        watched.run(c2s(chunk))
    assert codec.degraded is None
    assert codec.boundaries == 0


def test_memoryview_input_is_released():
    pool = bytearray(GET + GET)
    codec = Http11Codec()
    codec.feed_c2s(memoryview(pool)[: len(GET) + 5])
    pool.extend(b"resizing needs every export released")
    codec.feed_c2s(memoryview(pool)[len(GET) + 5 : 2 * len(GET)])
    codec.feed_s2c(memoryview(bytearray(OK + OK)))
    assert codec.fresh == FreshPoint(2 * len(GET), 2 * len(OK))


def test_header_section_of_exactly_64_kib_is_followed():
    request_line = b"GET / HTTP/1.1\r\n"
    padding = MAX_HEAD_BYTES - len(request_line) - len(b"X: \r\n\r\n")
    request = request_line + b"X: " + b"a" * padding + b"\r\n\r\n"
    assert len(request) == MAX_HEAD_BYTES
    for chunks in ([request], [request[:-1], request[-1:]], [request[:-3], request[-3:]]):
        codec = http(*map(c2s, chunks), s2c(OK))
        assert codec.degraded is None
        assert codec.fresh == FreshPoint(len(request), len(OK))


# --- real servers -------------------------------------------------------------------------

# Captured from nginx/1.22.1 serving static files to one keep-alive connection.
_CURL = b"\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
NGINX_REQUESTS = [
    b"GET /index.html HTTP/1.1" + _CURL,
    b"GET /style.css HTTP/1.1" + _CURL,
    b"HEAD /index.html HTTP/1.1" + _CURL,
    b'GET /index.html HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: "6b073267-d"\r\n\r\n',
    b"GET /missing HTTP/1.1" + _CURL,
]
_NGINX_HEAD = (
    b"Server: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:09:37 GMT\r\nContent-Type: %s\r\n"
    b"Content-Length: %d\r\nLast-Modified: Wed, 25 Nov 2026 19:09:27 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "%s"\r\nAccept-Ranges: bytes\r\n\r\n'
)
_CSS = b"body { color: #333; }\n" * 3
_NOT_FOUND = (
    b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
NGINX_RESPONSES = [
    b"HTTP/1.1 200 OK\r\n" + _NGINX_HEAD % (b"text/html", 13, b"6b073267-d") + b"hello, world\n",
    b"HTTP/1.1 200 OK\r\n" + _NGINX_HEAD % (b"text/plain", 66, b"6b073267-42") + _CSS,
    b"HTTP/1.1 200 OK\r\n" + _NGINX_HEAD % (b"text/html", 13, b"6b073267-d"),
    b"HTTP/1.1 304 Not Modified\r\nServer: nginx/1.22.1\r\n"
    b"Date: Wed, 25 Nov 2026 19:09:38 GMT\r\nLast-Modified: Wed, 25 Nov 2026 19:09:27 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6b073267-d"\r\n\r\n',
    b"HTTP/1.1 404 Not Found\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:09:39 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 153\r\nConnection: keep-alive\r\n\r\n"
    + _NOT_FOUND,
]


@pytest.mark.parametrize("feed", [http, bytewise])
def test_nginx_keep_alive_static_files(feed):
    steps = []
    for request, response in zip(NGINX_REQUESTS, NGINX_RESPONSES, strict=True):
        steps += [c2s(request), s2c(response)]
    codec = feed(*steps)
    assert codec.degraded is None
    assert codec.boundaries == 5
    assert codec.fresh == FreshPoint(sum(map(len, NGINX_REQUESTS)), sum(map(len, NGINX_RESPONSES)))
    # The same exchanges, all requests pipelined in one segment.
    codec = feed(c2s(b"".join(NGINX_REQUESTS)), s2c(b"".join(NGINX_RESPONSES)))
    assert codec.boundaries == 5


PYTHON_REQUEST = b"GET /index.html HTTP/1.1" + _CURL


def test_python_http_server_file_is_http_1_0_with_content_length():
    # SimpleHTTPRequestHandler answers in HTTP/1.0 and closes after the response.
    response = (
        b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.7\r\n"
        b"Date: Wed, 25 Nov 2026 19:09:49 GMT\r\nContent-type: text/html\r\n"
        b"Content-Length: 13\r\nLast-Modified: Wed, 25 Nov 2026 19:09:27 GMT\r\n\r\n"
        b"hello, world\n"
    )
    codec = http(c2s(PYTHON_REQUEST), s2c(response))
    assert codec.degraded is None
    assert codec.fresh == FreshPoint(len(PYTHON_REQUEST), len(response))


def test_python_http_server_close_delimited_response():
    # BaseHTTPRequestHandler with no Content-Length: the body ends when the connection closes.
    response = (
        b"HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11.7\r\n"
        b"Date: Wed, 25 Nov 2026 19:09:50 GMT\r\nContent-Type: text/plain\r\n\r\n"
        b"streamed until close\n"
    )
    for feed in (http, bytewise):
        codec = feed(c2s(PYTHON_REQUEST), s2c(response))
        assert codec.degraded is None
        assert codec.boundaries == 0
        assert codec.fresh == FreshPoint(0, 0)


# --- degrading ----------------------------------------------------------------------------

ONE = FreshPoint(len(GET), len(OK))


def short(value: object) -> str | None:
    """Test ids: the start of the bytes, not 64 KiB of them."""
    return repr(value[:32]) if isinstance(value, bytes) else None


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n", "CONNECT"),
        (b"GET /\r\n\r\n", "malformed request line"),
        (b"GET  / HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/1.1 \r\n\r\n", "malformed request line"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "unsupported version HTTP/2.0"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "malformed header field"),
        (b"GET / HTTP/1.1\r\n: a\r\n\r\n", "malformed header field"),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", "header"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "malformed request line"),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", "obsolete line folding"),
        (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", "bare"),
        (b"GET / HTTP/1.1\nHost: a\n\n", "bare LF"),
        (b"GET / HTTP/1.1\r\nX: a\rY: b\r\n\r\n", "bare CR"),
        (post(b"", b"Content-Length: 3", b"Content-Length: 4"), "conflicting Content-Length"),
        (post(b"", b"Content-Length: 3, 4"), "conflicting Content-Length"),
        (post(b"", b"Content-Length: -3"), "invalid Content-Length"),
        (post(b"", b"Content-Length: 0x10"), "invalid Content-Length"),
        (post(b"", b"Content-Length:"), "invalid Content-Length"),
        (post(b"", b"Content-Length: " + b"9" * 5000), "invalid Content-Length"),
        (
            post(b"", b"Content-Length: 3", b"Transfer-Encoding: chunked"),
            "Content-Length together with Transfer-Encoding",
        ),
        (post(b"", b"Transfer-Encoding: gzip"), "does not end in chunked"),
        (post(b"", b"Transfer-Encoding: chunked, chunked"), "malformed Transfer-Encoding"),
        (post(b"", b"Transfer-Encoding: ,"), "malformed Transfer-Encoding"),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding in an HTTP/1.0 message",
        ),
        (post(b"zz\r\n", b"Transfer-Encoding: chunked"), "malformed chunk-size line"),
        (post(b" 1\r\nx\r\n", b"Transfer-Encoding: chunked"), "malformed chunk-size line"),
        (post(b"1\nx\r\n", b"Transfer-Encoding: chunked"), "bare LF in a chunk-size line"),
        (post(b"1\r\nxy\r\n", b"Transfer-Encoding: chunked"), "not followed by CRLF"),
        (
            post(b"1" * 17 + b"\r\n", b"Transfer-Encoding: chunked"),
            "malformed chunk-size line",
        ),
        (post(b"0\r\nbad trailer\r\n\r\n", b"Transfer-Encoding: chunked"), "malformed header"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES, "header section over 64 KiB"),
        (post(b"1;" + b"e" * MAX_HEAD_BYTES, b"Transfer-Encoding: chunked"), "over 64 KiB"),
    ],
    ids=short,
)
def test_requests_that_degrade(request_, fragment):
    for feed in (http, bytewise):
        codec = feed(c2s(GET), s2c(OK), c2s(request_), s2c(OK), c2s(GET), s2c(OK))
        assert_degraded(codec, fragment, ONE, boundaries=1)
        assert codec.degraded is not None
        assert codec.degraded.startswith(f"c2s message at byte {len(GET)}: ")


@pytest.mark.parametrize(
    ("response", "fragment"),
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "101 Switching"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Content-Length together with Transfer-Encoding",
        ),
        (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding in an HTTP/1.0",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nx\r\n", "malformed chunk-size"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 099 Early\r\n\r\n", "invalid status code 99"),
        (b"HTTP/2 200\r\n\r\n", "malformed status line"),
        (b"HTTP/3.0 200 OK\r\n\r\n", "unsupported version"),
        (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "malformed status line"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES, "header section over 64 KiB"),
    ],
    ids=short,
)
def test_responses_that_degrade(response, fragment):
    for feed in (http, bytewise):
        codec = feed(c2s(GET), s2c(OK), c2s(GET), s2c(response), c2s(GET), s2c(OK))
        assert_degraded(codec, fragment, ONE, boundaries=1)
        assert codec.degraded is not None
        assert codec.degraded.startswith("s2c message at byte ")


def test_response_without_a_request_degrades():
    # e.g. a 408 Request Timeout on an idle keep-alive connection
    timeout = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert_degraded(http(s2c(timeout)), "response without a request", FreshPoint(0, 0))
    # before its request's header section has completed
    codec = http(c2s(GET[:-2]), s2c(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    assert_degraded(codec, "response without a request", FreshPoint(0, 0))


def test_websocket_upgrade_degrades_at_the_101():
    upgrade = (
        b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    frames = b"\x81\x05hello" * 10
    codec = http(c2s(GET), s2c(OK), c2s(upgrade), s2c(switching), c2s(frames), s2c(frames))
    assert_degraded(codec, "101 Switching Protocols", ONE, boundaries=1)


def test_upgrade_request_answered_normally_goes_on():
    upgrade = (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    )
    codec = http(c2s(upgrade), s2c(OK), c2s(GET), s2c(OK))
    assert codec.degraded is None
    assert codec.fresh == FreshPoint(len(upgrade) + len(GET), 2 * len(OK))


def test_too_many_pipelined_requests_degrade():
    codec = Http11Codec()
    watched = Watched(codec).run(c2s(GET * MAX_PIPELINED), s2c(OK))
    assert codec.degraded is None
    assert codec.boundaries == 1
    watched.run(c2s(GET), c2s(GET))
    assert_degraded(codec, f"more than {MAX_PIPELINED}", FreshPoint(len(GET), len(OK)), 1)


def test_after_degrading_the_fresh_point_never_moves():
    codec = Http11Codec()
    watched = Watched(codec).run(c2s(GET), s2c(OK), c2s(b"BREW /pot HTCPCP/1.0\r\n\r\n"))
    assert codec.degraded is not None
    reason = codec.degraded
    for _ in range(5):
        watched.run(s2c(OK), c2s(GET), s2c(OK))
    assert (codec.fresh, codec.boundaries, codec.degraded) == (ONE, 1, reason)


# --- properties ---------------------------------------------------------------------------

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FIELD_VALUE = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])


def over(alphabet: bytes, min_size: int = 0, max_size: int = 16) -> st.SearchStrategy[bytes]:
    """Bytes from ``alphabet``, drawn in one go (a draw per byte makes generation slow)."""
    return st.binary(min_size=min_size, max_size=max_size).map(
        lambda raw: bytes(alphabet[b % len(alphabet)] for b in raw)
    )


field_names = over(TCHAR, 1, 10)  # too short to be Content-Length or Transfer-Encoding
fields = st.lists(
    st.builds(
        lambda name, ows, value: name + b":" + ows + value,
        field_names,
        st.sampled_from([b"", b" ", b"\t ", b"  "]),
        over(FIELD_VALUE),
    ),
    max_size=2,
)
bodies = st.binary(max_size=40)
content_length_names = st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"])
chunk_extensions = st.sampled_from([b"", b";a", b";a=b", b' ; name="v;x"', b";x=1;y=2"])
size_formats = st.sampled_from(["{:x}", "{:X}", "{:04x}"])
trailer_sections = st.sampled_from([b"", b"", b"Expires: 0\r\n", b"Expires: 0\r\nX-Sum:  1 \r\n"])


@dataclass
class Message:
    head: bytes
    body: bytes = b""

    @property
    def data(self) -> bytes:
        return self.head + self.body


@st.composite
def framed(draw, version: bytes) -> tuple[list[bytes], bytes]:
    """Framing fields and the body bytes they frame (Content-Length or chunked)."""
    if version == b"1.1" and draw(st.booleans()):
        chunks = draw(st.lists(st.binary(min_size=1, max_size=16), max_size=4))
        size_format, extension = draw(size_formats), draw(chunk_extensions)
        body = b""
        for chunk in chunks:
            body += size_format.format(len(chunk)).encode() + extension + b"\r\n" + chunk + b"\r\n"
        body += b"0" + extension + b"\r\n" + draw(trailer_sections) + b"\r\n"
        coding = draw(st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked", b"x;q=1,chunked"]))
        return [b"Transfer-Encoding: " + coding], body
    body = draw(bodies)
    length = str(len(body)).encode()
    value = draw(st.sampled_from([length, b" " + length + b" ", length + b", " + length]))
    return [draw(content_length_names) + b":" + value], body


@st.composite
def requests(draw) -> tuple[bytes, Message, bool]:
    """(method, request, whether it expects 100-continue)"""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    target = b"/" + draw(over(b"abc/%?=&.-_~", max_size=12))
    blank = b"\r\n" * draw(st.sampled_from([0, 0, 0, 1, 2]))
    lines = [method + b" " + target + b" HTTP/" + version, b"Host: example.org"]
    lines += draw(fields)
    body = b""
    expect = False
    if method in (b"POST", b"PUT") or draw(st.integers(0, 9)) == 0:
        framing, body = draw(framed(version))
        lines += framing
        expect = version == b"1.1" and draw(st.booleans())
        if expect:
            lines.append(b"Expect: 100-continue")
    fields_ = lines[1:]
    random.Random(draw(st.integers(0, 2**16))).shuffle(fields_)
    lines = [lines[0], *fields_]
    return method, Message(blank + b"\r\n".join(lines) + b"\r\n\r\n", body), expect


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
interims = st.sampled_from([b"", b"", b"", CONTINUE, EARLY_HINTS, PROCESSING + EARLY_HINTS])


@st.composite
def responses(draw, method: bytes, may_close: bool) -> tuple[Message, bool]:
    """(response, whether its end is the connection's close); interim responses included."""
    status = draw(st.sampled_from([200, 200, 201, 204, 302, 304, 404, 500]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Some Reason"]))
    lines = [b"HTTP/" + version + b" " + str(status).encode() + reason]
    lines += draw(fields)
    body = b""
    until_close = False
    if method == b"HEAD" or status in (204, 304):
        if status != 204 and draw(st.booleans()):
            lines.append(b"Content-Length: " + str(draw(st.integers(0, 10**6))).encode())
    elif may_close and draw(st.integers(0, 3)) == 0:
        until_close = True
        body = draw(bodies)
    else:
        framing, body = draw(framed(version))
        lines += framing
    interim = draw(interims)
    return Message(interim + b"\r\n".join(lines) + b"\r\n\r\n", body), until_close


@dataclass
class Exchange:
    request: Message
    response: Message
    interleaved: bool  # the response (after 100 Continue, or early) precedes the request body
    until_close: bool  # the response's body ends with the connection


@dataclass
class Conversation:
    segments: list[tuple[str, bytes]]  # in causal order
    fresh: FreshPoint  # expected at the end, relative to the start
    boundaries: int
    until_close: bool


@st.composite
def conversations(draw, may_close: bool = True) -> Conversation:
    count = draw(st.integers(1, 4))
    exchanges = []
    for k in range(count):
        method, request, expect = draw(requests())
        response, until_close = draw(responses(method, may_close=may_close and k == count - 1))
        early = request.body != b"" and not expect and draw(st.integers(0, 5)) == 0
        exchanges.append(Exchange(request, response, expect or early, until_close))
    segments: list[tuple[str, bytes]] = []
    k = 0
    while k < count:
        exchange = exchanges[k]
        if exchange.interleaved:
            if draw(st.booleans()):
                exchange.response.head = b"HTTP/1.1 100 Continue\r\n\r\n" + exchange.response.head
            segments += [("c2s", exchange.request.head), ("s2c", exchange.response.data)]
            segments += [("c2s", exchange.request.body)]
            k += 1
            continue
        # a pipeline of plain exchanges
        depth = draw(st.integers(1, 3))
        group: list[Exchange] = []
        while k < count and len(group) < depth and not exchanges[k].interleaved:
            group.append(exchanges[k])
            k += 1
        segments += [("c2s", e.request.data) for e in group]
        segments += [("s2c", e.response.data) for e in group]
    completed = [e for e in exchanges if not e.until_close]
    until_close = len(completed) < count
    if until_close and draw(st.booleans()):
        segments.append(("c2s", GET))  # after the close-delimited response: never answered
    return Conversation(
        segments,
        FreshPoint(
            sum(len(e.request.data) for e in completed),
            sum(len(e.response.data) for e in completed),
        ),
        len(completed),
        until_close,
    )


# Sizes to cycle through: one byte at a time, small, or up to a few hundred bytes.
chunk_sizes = st.one_of(
    st.just([1]),
    st.binary(min_size=1, max_size=8).map(lambda raw: [b % 8 + 1 for b in raw]),
    st.binary(min_size=1, max_size=8).map(lambda raw: [b + 1 for b in raw]),
)


@dataclass
class Chunking:
    c2s_sizes: list[int]
    s2c_sizes: list[int]
    seed: int
    views: bool


chunkings = st.builds(Chunking, chunk_sizes, chunk_sizes, st.integers(0, 2**32), st.booleans())


def chunked(segments: list[tuple[str, bytes]], chunking: Chunking) -> list[tuple[str, bytes]]:
    """Both streams cut into chunks, interleaved at random but never ahead of causality: an
    s2c byte is fed only after every c2s byte that precedes it in ``segments``."""
    streams = {"c2s": b"", "s2c": b""}
    limits: list[tuple[int, int]] = []  # (end of an s2c segment, c2s bytes it needs first)
    for direction, data in segments:
        streams[direction] += data
        if direction == "s2c":
            limits.append((len(streams["s2c"]), len(streams["c2s"])))
    rng = random.Random(chunking.seed)
    sizes = {"c2s": chunking.c2s_sizes, "s2c": chunking.s2c_sizes}
    fed = {"c2s": 0, "s2c": 0}
    turns = {"c2s": 0, "s2c": 0}
    out = []
    while fed["c2s"] < len(streams["c2s"]) or fed["s2c"] < len(streams["s2c"]):
        allowed = max((end for end, need in limits if need <= fed["c2s"]), default=0)
        c2s_left = fed["c2s"] < len(streams["c2s"])
        s2c_ok = fed["s2c"] < allowed
        direction = "c2s" if c2s_left and (not s2c_ok or rng.random() < 0.5) else "s2c"
        end = allowed if direction == "s2c" else len(streams["c2s"])
        size = sizes[direction][turns[direction] % len(sizes[direction])]
        turns[direction] += 1
        stop = min(end, fed[direction] + size)
        chunk = streams[direction][fed[direction] : stop]
        fed[direction] = stop
        out.append((direction, chunk))
    return out


def feed_all(watched: Watched, steps: list[tuple[str, bytes]], views: bool) -> None:
    for direction, data in steps:
        watched.feed(direction, memoryview(bytearray(data)) if views else data)


starts = st.tuples(st.sampled_from([0, 0, 1, 10**12]), st.sampled_from([0, 0, 7, 2**40]))


@settings(max_examples=900, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations(), chunking=chunkings, start=starts)
def test_any_chunking_gives_the_fresh_point_of_the_whole_streams(conversation, chunking, start):
    expected = FreshPoint(conversation.fresh.c2s + start[0], conversation.fresh.s2c + start[1])
    whole = Http11Codec(c2s_start=start[0], s2c_start=start[1])
    feed_all(Watched(whole, *start), conversation.segments, views=False)
    assert whole.degraded is None
    assert (whole.fresh, whole.boundaries) == (expected, conversation.boundaries)

    codec = Http11Codec(c2s_start=start[0], s2c_start=start[1])
    watched = Watched(codec, *start)
    steps = chunked(conversation.segments, chunking)
    cut = chunking.seed % (len(steps) + 1)
    feed_all(watched, steps[:cut], chunking.views)
    resume_at, boundaries_then = codec.fresh, codec.boundaries
    feed_all(watched, steps[cut:], chunking.views)
    assert codec.degraded is None
    assert (codec.fresh, codec.boundaries) == (expected, conversation.boundaries)

    # A new server resumes from a fresh point seen on the way: it is fed the client's bytes
    # from there (all of them first: a server's bytes never need to precede a client's) and
    # the service's regenerated bytes, and reaches the same fresh point.
    client = b"".join(data for direction, data in conversation.segments if direction == "c2s")
    server = b"".join(data for direction, data in conversation.segments if direction == "s2c")
    resumed = Http11Codec(c2s_start=resume_at.c2s, s2c_start=resume_at.s2c)
    Watched(resumed, resume_at.c2s, resume_at.s2c).run(
        c2s(client[resume_at.c2s - start[0] :]), s2c(server[resume_at.s2c - start[1] :])
    )
    assert resumed.degraded is None
    assert resumed.fresh == expected
    assert resumed.boundaries == conversation.boundaries - boundaries_then


@st.composite
def mutated(draw) -> list[tuple[str, bytes]]:
    """A valid conversation with a few bytes flipped, inserted, deleted or repeated."""
    segments = list(draw(conversations()).segments)
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(0, len(segments) - 1))
        direction, data = segments[k]
        at = draw(st.integers(0, len(data)))
        byte = bytes([draw(st.sampled_from([0, 9, 10, 13, 32, 48, 58, 59, 65, 127, 255]))])
        edit = draw(st.sampled_from(["flip", "insert", "delete", "repeat"]))
        if edit == "flip":
            data = data[:at] + byte + data[at + 1 :]
        elif edit == "insert":
            data = data[:at] + byte + data[at:]
        elif edit == "delete":
            data = data[:at] + data[at + 1 :]
        else:
            data = data[:at] + data[at : at + 20] * 2 + data[at + 20 :]
        segments[k] = (direction, data)
    return segments


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=mutated(), chunking=chunkings)
def test_damaged_streams_never_raise(segments, chunking):
    watched = Watched(Http11Codec())
    feed_all(watched, chunked(segments, chunking), chunking.views)


@settings(max_examples=800, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["c2s", "s2c"]),
            st.one_of(
                st.binary(max_size=64),
                st.lists(st.sampled_from([GET, OK, b"\r\n", b"\r", b"\n", b"0\r\n", b"x"])).map(
                    b"".join
                ),
            ),
        ),
        max_size=12,
    )
)
def test_garbage_never_raises(steps):
    Watched(Http11Codec()).run(*steps)
    Watched(GenericCodec()).run(*steps)


@settings(max_examples=150, deadline=None)
@given(
    before=conversations(may_close=False),
    trigger=st.sampled_from(
        [
            c2s(b"CONNECT a:443 HTTP/1.1\r\n\r\n"),
            c2s(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            c2s(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)),  # TLS
            s2c(b"HTTP/1.1 200 OK\r\n\r\n"),  # no request outstanding
        ]
    ),
    after=conversations(),
    chunking=chunkings,
)
def test_after_degrading_valid_traffic_does_not_move_the_fresh_point(
    before, trigger, after, chunking
):
    codec = Http11Codec()
    watched = Watched(codec)
    feed_all(watched, chunked(before.segments, chunking), chunking.views)
    assert (codec.fresh, codec.boundaries) == (before.fresh, before.boundaries)
    watched.run(trigger)
    assert codec.degraded is not None
    feed_all(watched, chunked(after.segments, chunking), chunking.views)
    assert (codec.fresh, codec.boundaries) == (before.fresh, before.boundaries)


# --- the header fast path -----------------------------------------------------------------

_HEAD_LINES = st.sampled_from(
    [
        b"Content-Length: 12",
        b"content-length:7",
        b"CONTENT-LENGTH: 3, 3",
        b"Content-Length:",
        b"Transfer-Encoding: gzip, chunked",
        b"transfer-encoding: chunked;q=1",
        b"Transfer-Encoding:",
        b"Host: example.test",
        b"X-Content-Length: 5",
        b"Content-Lengthy: 5",
        b"Date: Thu, 03 Dec 2026 23:10:36 GMT",
        b"X-Odd: \t\x80\xff tab and high bytes",
        b" folded continuation",
        b"\tfolded tab",
        b"No Colon Here",
        b"Bad Name: value",
        b": empty name",
        b"X-Bare: a\rb",
        b"X-Bare: a\nb",
        b"X-Ctl: a\x01b",
        b"",
    ]
)


@given(first=st.sampled_from([b"GET / HTTP/1.1", b"HTTP/1.1 200 OK", b"GE\rT / HTTP/1.1", b""]),
       lines=st.lists(_HEAD_LINES, max_size=6))  # fmt: skip
def test_the_header_fast_path_decides_as_the_line_by_line_check(first, lines):
    """``_first_line`` and ``_framing`` (one match for a well-formed head) give the first
    line, the Content-Length elements and the codings that ``_head_lines`` and
    ``_framing_fields`` give, and raise the same error for any other head."""
    from migrate.codec import _Degrade, _first_line, _framing, _framing_fields, _head_lines

    section = b"\r\n".join([first, *lines]) + b"\r\n\r\n"

    def outcome(split):
        try:
            return split()
        except _Degrade as error:
            return ("degrade", str(error))

    def fast():
        line, checked = _first_line(section)
        return line, *_framing(section, checked)

    def slow():
        split = _head_lines(section)
        return split[0], *_framing_fields(split[1:])

    assert outcome(fast) == outcome(slow)


def observed(codec: Http11Codec) -> tuple[object, ...]:
    """All a codec tells its stream state."""
    return (
        codec.fresh,
        codec.boundaries,
        codec.degraded,
        list(codec.interim_ends),
        codec.heads,
        codec.last_head,
        list(codec.bodies),
        codec.body_ahead(),
    )


def forgotten(segments: list[tuple[str, bytes]]) -> Conversation:
    """Damaged segments as a conversation whose fresh point nobody checks."""
    return Conversation(segments, FreshPoint(0, 0), 0, False)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=conversations(may_close=False),
    then=st.one_of(conversations(), mutated().map(forgotten)),
    repeats=st.integers(1, 3),
    chunking=chunkings,
)
def test_a_codec_that_keeps_its_last_heads_says_what_one_that_keeps_none_says(
    first: Conversation, then: Conversation, repeats: int, chunking: Chunking
) -> None:
    """Each direction keeps its last head and what it said (a keep-alive connection repeats
    its requests, and its answers within a second): the same exchanges over and over, then
    others or damaged ones, must give every observable, after every chunk, as a codec that
    parses every head."""
    keeping, parsing = Http11Codec(), Http11Codec()
    for direction, data in chunked(first.segments * (repeats + 1) + then.segments, chunking):
        getattr(keeping, f"feed_{direction}")(data)
        getattr(parsing, f"feed_{direction}")(data)
        parsing._c2s._last = parsing._s2c._last = None  # parses every head
        assert observed(keeping) == observed(parsing)
