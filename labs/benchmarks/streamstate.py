"""Benchmark: the live relay's observer per keep-alive message, in-process (no sockets).

    python -m labs.benchmarks.streamstate [--gets 20000] [--per-checkpoint 40] [--repeat 3]
                                          [--bulk-mib 512]

Feeds ``migrate.streamstate.StreamState`` what a live server shim's relay feeds it for a
keep-alive connection of 100-byte GETs from nginx: each request, then each response (head with
a Date header, 100-byte body), as views into one reused buffer, and takes a checkpoint's
settle and digest every ``--per-checkpoint`` GETs (a checkpoint goes out at most every 20 ms
per connection, and a GET through the shims takes 0.2-0.5 ms). Prints µs per GET: the codec
alone, the stream state hashing every chunk into every candidate at once (``hash_backlog=0``,
as before the backlog) and with the default backlog, all in the same run (best of
``--repeat``). The two stream states' checkpoints are the same
(tests/unit/test_streamstate.py).

Then the running hash's cost per byte: a ``--bulk-mib`` response fed in 64 KiB chunks, with
SHA-256 and with keyed BLAKE3 (``checkpoint.stream_hash_key``), in GB/s, with their ratio."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from migrate.checkpoint import stream_hash_key
from migrate.codec import codec_for
from migrate.streamstate import DEFAULT_HASH_BACKLOG, StreamState

REQUEST = b"GET /small HTTP/1.1\r\nHost: 10.0.0.1\r\nUser-Agent: roaming-benchmark\r\n\r\n"
HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 23:10:36 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
    b"Last-Modified: Thu, 03 Dec 2026 23:10:30 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6a0b0b86-64"\r\nAccept-Ranges: bytes\r\n\r\n'
)


def per_get_us(
    gets: int, per_checkpoint: int, make: Callable[[], object], codec_only: bool
) -> float:
    response = HEAD + os.urandom(100)
    buffer = bytearray(1 << 16)
    view = memoryview(buffer)
    observer = make()
    started = time.perf_counter()
    for index in range(gets):
        buffer[: len(REQUEST)] = REQUEST
        observer.feed_c2s(view[: len(REQUEST)])  # type: ignore[attr-defined]
        buffer[: len(response)] = response
        observer.feed_s2c(view[: len(response)])  # type: ignore[attr-defined]
        if not codec_only and index % per_checkpoint == per_checkpoint - 1:
            assert isinstance(observer, StreamState)
            fresh_hash = observer.settle(observer.s2c_pos).s2c_hash
            assert fresh_hash is not None  # a stream from its start always has one
            fresh_hash.digest()
    return (time.perf_counter() - started) / gets * 1e6


KEY = stream_hash_key(bytes(32), bytes(16))


def acked_stream(hash_key: bytes | None = None) -> StreamState:
    """As a live shim's: the client's acknowledged position at hand (here: everything sent,
    as a client that asks for the next response only once it has the last)."""
    stream = StreamState("auto", hash_key=hash_key)
    stream.acked = lambda: stream.s2c_pos
    return stream


def bulk_gbps(mib: int, hash_key: bytes | None) -> float:
    """GB/s of one response of ``mib`` MiB through a stream state (64 KiB chunks)."""
    stream = StreamState("http", hash_key=hash_key)
    stream.feed_c2s(REQUEST)
    chunk = memoryview(os.urandom(64 * 1024))
    head = HEAD.replace(b"Content-Length: 100", b"Content-Length: %d" % (mib << 20))
    started = time.perf_counter()
    stream.feed_s2c(head)
    for _ in range(mib * 16):
        stream.feed_s2c(chunk)
    fresh_hash = stream.settle(0).s2c_hash
    assert fresh_hash is not None
    fresh_hash.digest()
    return (mib << 20) / (time.perf_counter() - started) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labs.benchmarks.streamstate")
    parser.add_argument("--gets", type=int, default=20000)
    parser.add_argument("--per-checkpoint", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bulk-mib", type=int, default=512)
    args = parser.parse_args(argv)
    if args.gets < 1 or args.per_checkpoint < 1 or not 1 <= args.repeat <= 20:
        parser.error("--gets and --per-checkpoint must be positive, --repeat in [1, 20]")
    if not 1 <= args.bulk_mib <= 65536:
        parser.error("--bulk-mib must be in [1, 65536]")
    kinds: dict[str, tuple[Callable[[], object], bool]] = {
        "codec alone (http)": (lambda: codec_for("http"), True),
        "stream state, every candidate at once": (
            lambda: StreamState("auto", hash_backlog=0),
            False,
        ),
        f"stream state, backlog {DEFAULT_HASH_BACKLOG} bytes": (lambda: StreamState("auto"), False),
        "the same, settled when full": (acked_stream, False),
        "the same, keyed BLAKE3": (lambda: acked_stream(KEY), False),
    }
    best = {name: float("inf") for name in kinds}
    for _ in range(args.repeat):
        for name, (make, codec_only) in kinds.items():
            best[name] = min(
                best[name], per_get_us(args.gets, args.per_checkpoint, make, codec_only)
            )
    print(f"µs per GET ({args.gets} GETs, a checkpoint every {args.per_checkpoint}, best of "
          f"{args.repeat}):")  # fmt: skip
    for name, value in best.items():
        print(f"- {name}: {value:.1f}")
    sha = max(bulk_gbps(args.bulk_mib, None) for _ in range(args.repeat))
    keyed = max(bulk_gbps(args.bulk_mib, KEY) for _ in range(args.repeat))
    print(f"running hash over a {args.bulk_mib} MiB response (GB/s, best of {args.repeat}):")
    print(f"- SHA-256: {sha:.2f}")
    print(f"- keyed BLAKE3: {keyed:.2f} ({keyed / sha:.2f}x SHA-256)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
