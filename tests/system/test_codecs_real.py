"""The RESP and memcached codecs against the real servers (Debian's redis-server, memcached).

A real server, on a Unix socket in a temporary directory (no port, no namespace needed), is
sent a pipeline that exercises every reply type redis produces (RESP3 maps, sets, doubles,
big numbers, verbatim strings, attributes and pushes from DEBUG PROTOCOL, invalidation pushes
of CLIENT TRACKING BCAST, a transaction, a blocking command that times out, errors, inline
commands). The codec must follow the whole conversation, whatever the chunking, and end with
the session state in force. Then that state is replayed to a fresh connection, its replies are
read off with ``StateReplies``, and the connection must be in the same session (same name, same
database, RESP3) as the original.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate.memcached import MemcachedCodec
from migrate.resp import RespCodec, StateReplies

pytestmark = [pytest.mark.system]


def cmd(*args: str) -> bytes:
    parts = [a.encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Path]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (scripts/install-deps.sh)"
    path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [
            binary,
            "--port", "0",
            "--unixsocket", str(path),
            "--save", "",
            "--appendonly", "no",
            "--enable-debug-command", "yes",
            "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not path.exists():  # the socket appears once redis accepts connections
            assert process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not open its socket"
            time.sleep(0.02)
        yield path
    finally:
        process.terminate()
        process.wait(timeout=20)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(str(path))
    return sock


def exchange(sock: socket.socket, data: bytes, until: bytes) -> bytes:
    """Send ``data``; read until the received bytes end with ``until``."""
    sock.sendall(data)
    received = b""
    while not received.endswith(until):
        chunk = sock.recv(65536)
        assert chunk, f"redis closed the connection; received so far: {received[-200:]!r}"
        received += chunk
    return received


SESSION = [
    cmd("HELLO", "3"),
    cmd("CLIENT", "SETNAME", "roamer"),
    cmd("SELECT", "2"),
    cmd("AUTH", "wrong"),  # refused (no password configured): not session state
]
WORK = [
    cmd("SET", "k", "v"),
    cmd("GET", "k"),
    cmd("GET", "missing"),
    cmd("HSET", "h", "a", "1", "b", "2"),
    cmd("HGETALL", "h"),
    cmd("SADD", "s", "x", "y"),
    cmd("SMEMBERS", "s"),
    cmd("ZADD", "z", "1.5", "m"),
    cmd("ZSCORE", "z", "m"),
    cmd("DEBUG", "PROTOCOL", "bignum"),
    cmd("DEBUG", "PROTOCOL", "attrib"),
    cmd("DEBUG", "PROTOCOL", "verbatim"),
    cmd("DEBUG", "PROTOCOL", "true"),
    cmd("DEBUG", "PROTOCOL", "push"),
    cmd("DEBUG", "PROTOCOL", "map"),
    cmd("DEBUG", "PROTOCOL", "set"),
    cmd("DEBUG", "PROTOCOL", "double"),
    cmd("DEBUG", "PROTOCOL", "null"),
    cmd("MULTI"),
    cmd("SELECT", "3"),
    cmd("INCR", "x"),
    cmd("EXEC"),
    cmd("CLIENT", "TRACKING", "on", "BCAST"),
    cmd("GET", "k"),
    cmd("SET", "k", "v2"),  # an invalidation push for k follows (BCAST, no NOLOOP)
    cmd("XADD", "st", "*", "f", "v"),
    cmd("XREAD", "COUNT", "1", "STREAMS", "st", "0"),
    cmd("BLPOP", "q", "0.01"),  # blocks, then times out: a null
    b"PING\r\n",
    cmd("NOSUCHCOMMAND"),
    cmd("ECHO", "__end__"),
]


def test_a_real_redis_conversation_is_followed_and_its_session_recreated(redis):
    client = b"".join(SESSION + WORK)
    with connect(redis) as sock:
        server = exchange(sock, client, b"__end__\r\n")
    expected_state = (
        cmd("HELLO", "3")
        + cmd("CLIENT", "SETNAME", "roamer")
        + cmd("SELECT", "3")  # the transaction's, replacing SELECT 2
        + cmd("CLIENT", "TRACKING", "on", "BCAST")
    )
    whole = RespCodec()
    whole.feed_c2s(client)
    whole.feed_s2c(server)
    assert whole.degraded is None
    assert whole.fresh.c2s == len(client)
    assert whole.fresh.s2c == len(server)
    assert whole.fresh.state == expected_state
    # MULTI and the two queued commands hold the fresh point until EXEC.
    assert whole.boundaries == len(SESSION + WORK) - 3
    rng = random.Random(7)
    for _ in range(20):
        codec = RespCodec()
        codec.feed_c2s(client)
        i = 0
        while i < len(server):
            size = rng.choice([1, 2, 3, 5, 17, 64, 1500])
            codec.feed_s2c(server[i : i + size])
            i += size
        assert (codec.fresh, codec.boundaries) == (whole.fresh, whole.boundaries)

    # A new server: a fresh connection, the state first, its replies dropped.
    with connect(redis) as sock:
        sock.sendall(whole.fresh.state)
        replies = StateReplies(whole.fresh.state)
        rest = b""
        while not replies.done:
            chunk = sock.recv(65536)
            assert chunk
            used = replies.feed(chunk)
            rest += chunk[used:]
        assert replies.refused is None
        assert rest == b""  # nothing beyond the replies to the state
        answer = exchange(
            sock, cmd("CLIENT", "GETNAME") + cmd("GET", "x") + cmd("ECHO", "end"), b"end\r\n"
        )
    assert answer == b"$6\r\nroamer\r\n$1\r\n1\r\n$3\r\nend\r\n"


def test_a_state_the_service_refuses_is_reported(redis):
    state = cmd("SELECT", "2") + cmd("AUTH", "nobody", "nopass")
    replies = StateReplies(state)
    with connect(redis) as sock:
        sock.sendall(state)
        while not replies.done:
            chunk = sock.recv(65536)
            assert chunk
            replies.feed(chunk)
    assert replies.refused is not None


@pytest.fixture
def memcached(tmp_path: Path) -> Iterator[Path]:
    binary = shutil.which("memcached")
    assert binary is not None, "memcached is not installed (scripts/install-deps.sh)"
    path = tmp_path / "memcached.sock"
    process = subprocess.Popen(
        [binary, "-s", str(path), "-u", "root", "-m", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not path.exists():  # the socket appears once memcached accepts connections
            assert process.poll() is None, "memcached exited at start"
            assert time.monotonic() < deadline, "memcached did not open its socket"
            time.sleep(0.02)
        yield path
    finally:
        process.terminate()
        process.wait(timeout=20)


MEMCACHED_CONVERSATION = [
    b"set k 0 0 5\r\nhello\r\n",
    b"add k 0 0 1\r\nx\r\n",  # NOT_STORED
    b"add a 7 0 3 noreply\r\nabc\r\n",
    b"get k a missing\r\n",
    b"gets k\r\n",
    b"cas k 0 0 2 1\r\nhi\r\n",
    b"append k 0 0 1\r\n!\r\n",
    b"prepend k 0 0 1\r\n<\r\n",
    b"replace nothing 0 0 1\r\nz\r\n",
    b"set n 0 0 1\r\n5\r\n",
    b"incr n 10\r\n",
    b"decr n 3 noreply\r\n",
    b"incr k 1\r\n",  # CLIENT_ERROR: not a number
    b"touch k 100\r\n",
    b"gat 100 k\r\n",
    b"gats 100 n\r\n",
    b"delete a\r\n",
    b"delete a\r\n",
    b"stats\r\n",
    b"stats slabs\r\n",
    b"stats reset\r\n",
    b"version\r\n",
    b"verbosity 1\r\n",
    b"ms m 3 T0\r\nxyz\r\n",
    b"mg m v\r\n",
    b"mg missing v q\r\nmg m v q k\r\nmd missing q\r\nmn\r\n",
    b"ma n\r\n",
    b"mn\r\n",
    b"bogus\r\n",  # ERROR; the codec degrades on an unknown command: kept last
]


def test_a_real_memcached_conversation_is_followed(memcached):
    client = b"".join(MEMCACHED_CONVERSATION[:-1]) + b"set e 0 0 3\r\nend\r\nget e\r\n"
    with connect(memcached) as sock:
        server = exchange(sock, client, b"end\r\nEND\r\n")
    whole = MemcachedCodec()
    whole.feed_c2s(client)
    whole.feed_s2c(server)
    assert whole.degraded is None
    assert (whole.fresh.c2s, whole.fresh.s2c) == (len(client), len(server))
    rng = random.Random(11)
    for _ in range(20):
        codec = MemcachedCodec()
        i = 0
        while i < len(client):
            size = rng.choice([1, 2, 7, 64])
            codec.feed_c2s(client[i : i + size])
            i += size
        i = 0
        while i < len(server):
            size = rng.choice([1, 3, 5, 100, 1500])
            codec.feed_s2c(server[i : i + size])
            i += size
        assert (codec.fresh, codec.boundaries) == (whole.fresh, whole.boundaries)
    # An unknown command is answered ERROR by memcached; the codec does not guess.
    with connect(memcached) as sock:
        answer = exchange(sock, MEMCACHED_CONVERSATION[-1], b"\r\n")
    assert answer == b"ERROR\r\n"
