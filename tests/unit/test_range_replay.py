"""The new server's side of a Range hand-over (proxy.replay.Replayer) against a small HTTP
service on loopback that honours Range and If-Range as nginx does: the bytes kept for the
client are exactly the original's after its position, the service is read from the window on
(not from the response's start), and a replica that differs is refused, never spliced."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from migrate.checkpoint import TcpSnapshot, seal_checkpoint
from migrate.rangeplan import WINDOW_BYTES
from migrate.reincarnation import Phase, Request
from migrate.streamstate import StreamState
from proxy.replay import Diverged, Replayer

KEY = bytes(range(32))
ETAG = b'"6751a3c0-400000"'
REQUEST = b"GET /big.bin HTTP/1.1\r\nHost: vip\r\nAccept: */*\r\n\r\n"
SIZE = 4 * 1024 * 1024


def response_head(length: int, etag: bytes, *, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nServer: t\r\nDate: Thu, 03 Dec 2026 23:00:00 GMT\r\n"
        b"Content-Length: %d\r\nETag: %s\r\nAccept-Ranges: bytes\r\n%s\r\n" % (length, etag, extra)
    )


class Service:
    """An HTTP/1.1 file server on loopback: 206 for ``Range: bytes=N-`` when If-Range matches
    its ETag, else 200; ``ranges=False`` ignores Range. Counts the body bytes it sends."""

    def __init__(self, body: bytes, etag: bytes, *, ranges: bool = True) -> None:
        self.body, self.etag, self.ranges = body, etag, ranges
        self.sent = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                wanted = re.search(rb"\r\nRange: bytes=(\d+)-(\d*)\r\n", head)
                if_range = re.search(rb"\r\nIf-Range: (.*?)\r\n", head)
                total = len(self.body)
                first, last = 0, total - 1
                if self.ranges and wanted and (if_range is None or if_range[1] == self.etag):
                    first = int(wanted[1])
                    last = int(wanted[2]) if wanted[2] else last
                if (first, last) != (0, total - 1):
                    writer.write(
                        b"HTTP/1.1 206 Partial Content\r\nServer: t\r\nDate: Thu, 03 Dec 2026 "
                        b"23:00:01 GMT\r\nContent-Length: %d\r\nETag: %s\r\nContent-Range: "
                        b"bytes %d-%d/%d\r\n\r\n"
                        % (last + 1 - first, self.etag, first, last, total)
                    )
                else:
                    writer.write(response_head(total, self.etag))
                writer.write(self.body[first : last + 1])
                self.sent += last + 1 - first
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(service: Service) -> AsyncIterator[Callable[[], asyncio.Future[socket.socket]]]:
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def connect() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return sock

    try:
        yield connect  # type: ignore[misc]
    finally:
        server.close()


def original_checkpoint(body: bytes, at: int):  # type: ignore[no-untyped-def]
    """The old server's checkpoint after the client's request and ``at`` bytes of the answer."""
    state = StreamState("http", range_min_body=1)
    state.feed_c2s(REQUEST)
    stream = response_head(len(body), ETAG) + body
    for low in range(0, at, 100_000):
        state.feed_s2c(stream[low : min(at, low + 100_000)])
    return checkpoint_of(state, epoch=5, counter=1)


def checkpoint_of(state: StreamState, epoch: int, counter: int, acked: int = 0):  # type: ignore[no-untyped-def]
    return state.checkpoint(
        conn_id=bytes(16),
        client=("10.0.0.2", 40000),
        vport=80,
        epoch=epoch,
        counter=counter,
        now=100.0 + counter,
        tcp=TcpSnapshot(1, 2, 1460, 7, 7, True, True, 0),
        s2c_acked=acked,
    )


def prepare(checkpoint, received: int) -> Request:  # type: ignore[no-untyped-def]
    sealed = seal_checkpoint(checkpoint, KEY, bytes(16), os.urandom)
    return Request(Phase.PREPARE, 5, 40000, 80, len(REQUEST), received, 0, sealed, REQUEST)


async def regenerate(  # type: ignore[no-untyped-def]
    service: Service, checkpoint, received: int, committed: int | None = None
) -> Replayer:
    """Prepared to ``received``; with ``committed``, then the COMMIT's step for a client
    there, as ``Replayer.commit`` does it (without the socket restore, which needs root)."""
    replayer = Replayer(checkpoint, prepare(checkpoint, received))
    async with serving(service) as connect:
        try:
            await replayer.start(connect, received)
            if committed is not None:
                await replayer._range_again(committed)
                await replayer.regenerate(committed)
        finally:
            replayer.close()
    return replayer


def test_a_client_deep_in_a_download_is_regenerated_from_the_window() -> None:
    body = os.urandom(SIZE)
    head_length = len(response_head(SIZE, ETAG))
    checkpoint = original_checkpoint(body, head_length + 3_000_000)
    assert checkpoint.range is not None
    received = head_length + 3_200_000  # the client got more since the checkpoint
    service = Service(body, ETAG)
    replayer = asyncio.run(regenerate(service, checkpoint, received))
    assert replayer.by_range
    assert b"\r\nRange: bytes=%d-\r\n" % (3_000_000 - WINDOW_BYTES) in service.requests[0]
    assert b"\r\nIf-Range: " + ETAG + b"\r\n" in service.requests[0]
    # Read from the window on: 64 KiB and the 200 KB since the checkpoint, not 3 MB.
    assert replayer.regenerated <= WINDOW_BYTES + 200_000 + 256 * 1024
    # What the client gets next is exactly the original's next bytes.
    unsent = bytes(replayer.unsent)
    assert unsent == body[3_200_000 : 3_200_000 + len(unsent)]
    assert replayer.stream.s2c_pos == received + len(unsent)


def test_a_client_behind_the_checkpoint_gets_the_bytes_it_lacks_verified() -> None:
    body = os.urandom(SIZE)
    head_length = len(response_head(SIZE, ETAG))
    checkpoint = original_checkpoint(body, head_length + 3_000_000)
    received = head_length + 2_000_000  # 1 MB in flight at the checkpoint
    replayer = asyncio.run(regenerate(Service(body, ETAG), checkpoint, received))
    assert replayer.by_range
    assert replayer.verified
    unsent = bytes(replayer.unsent)
    assert len(unsent) >= 1_000_000
    assert unsent == body[2_000_000 : 2_000_000 + len(unsent)]


def test_a_replica_whose_file_differs_in_the_window_is_refused() -> None:
    body = os.urandom(SIZE)
    head_length = len(response_head(SIZE, ETAG))
    checkpoint = original_checkpoint(body, head_length + 3_000_000)
    changed = bytearray(body)
    changed[3_000_000 - 10] ^= 1  # same length, same ETag (nginx: size and mtime)
    with pytest.raises(Diverged, match="body differs from the client's"):
        asyncio.run(regenerate(Service(bytes(changed), ETAG), checkpoint, head_length + 3_100_000))


def test_a_replica_with_another_validator_falls_back_to_200_and_is_refused_at_its_head() -> None:
    """If-Range falls back to the whole file; its head names another ETag than the bytes the
    client has, so the result could never be right: refused at once, not after reading it."""
    body = os.urandom(SIZE)
    head_length = len(response_head(SIZE, ETAG))
    checkpoint = original_checkpoint(body, head_length + 3_000_000)
    service = Service(body, b'"6751a3c1-400000"')
    with pytest.raises(Diverged, match=r"representation differs.*If-Range fell back to 200"):
        asyncio.run(regenerate(service, checkpoint, head_length + 3_100_000))


def test_a_replica_ignoring_ranges_is_regenerated_whole_and_verified() -> None:
    body = os.urandom(SIZE)
    head_length = len(response_head(SIZE, ETAG))
    checkpoint = original_checkpoint(body, head_length + 3_000_000)
    received = head_length + 3_100_000
    replayer = asyncio.run(regenerate(Service(body, ETAG, ranges=False), checkpoint, received))
    assert not replayer.by_range
    assert replayer.verified
    assert replayer.regenerated >= received
    unsent = bytes(replayer.unsent)
    assert unsent == body[3_100_000 : 3_100_000 + len(unsent)]
    # ...and a replica ignoring ranges with a different file is caught by the full hash.
    changed = bytearray(body)
    changed[5] ^= 1
    with pytest.raises(Diverged, match="different bytes"):
        asyncio.run(regenerate(Service(bytes(changed), ETAG, ranges=False), checkpoint, received))


def test_without_a_range_record_the_response_is_regenerated_from_its_start() -> None:
    body = os.urandom(SIZE)
    head_length = len(response_head(SIZE, ETAG))
    checkpoint = replace(original_checkpoint(body, head_length + 3_000_000), range=None)
    service = Service(body, ETAG)
    replayer = asyncio.run(regenerate(service, checkpoint, head_length + 3_100_000))
    assert not replayer.by_range
    assert b"Range" not in service.requests[0]
    assert replayer.regenerated >= head_length + 3_000_000
    assert (
        hashlib.sha256(bytes(replayer.unsent)).digest()
        == hashlib.sha256(body[3_100_000 : 3_100_000 + len(replayer.unsent)]).digest()
    )


def test_a_keep_alive_client_in_its_next_download_gets_the_tail_and_the_next_answer() -> None:
    """The checkpoint is from the end of the first copy, the client already in the second:
    the rewritten first request and the second one verbatim; the 206 ends where the first
    copy ended and the second answer follows at its position."""
    body = os.urandom(SIZE)
    first = response_head(SIZE, ETAG) + body
    checkpoint = original_checkpoint(body, len(first))
    assert checkpoint.range is not None
    received = len(first) + 1_000_000
    replayer = Replayer(checkpoint, prepare_two(checkpoint, received))
    service = Service(body, ETAG)

    async def run() -> None:
        async with serving(service) as connect:
            try:
                await replayer.start(connect, received)
            finally:
                replayer.close()

    asyncio.run(run())
    assert replayer.by_range
    assert replayer.regenerated < WINDOW_BYTES + 1_000_000 + 256 * 1024
    unsent = bytes(replayer.unsent)
    assert unsent == first[1_000_000 : 1_000_000 + len(unsent)]


def prepare_two(checkpoint, received: int) -> Request:  # type: ignore[no-untyped-def]
    sealed = seal_checkpoint(checkpoint, KEY, bytes(16), os.urandom)
    replay = REQUEST + REQUEST
    return Request(Phase.PREPARE, 5, 40000, 80, len(replay), received, 0, sealed, replay)


def test_a_young_connection_whose_client_has_a_whole_answer_moves_unverified() -> None:
    """The checkpoint commits to none of the answer (taken before it began) and the client
    has all of it: nothing the client holds can be spliced, so the new server goes on from
    the end of the regenerated answer; inside the answer it refuses, as unverifiable."""
    body = os.urandom(1000)
    whole = len(response_head(len(body), ETAG)) + len(body)
    checkpoint = original_checkpoint(body, 0)
    assert checkpoint.s2c_pos == checkpoint.s2c_fresh == 0
    replayer = asyncio.run(regenerate(Service(body, ETAG), checkpoint, whole))
    assert replayer.stream.s2c_pos == whole
    assert replayer.unsent == b""
    with pytest.raises(Diverged, match="unverifiable"):
        asyncio.run(regenerate(Service(body, ETAG), checkpoint, whole - 1))
    # A replica whose answer is longer does not end where the client is: refused.
    with pytest.raises(Diverged, match="does not end there"):
        asyncio.run(regenerate(Service(body + b"!", ETAG), checkpoint, whole))


BIG = 32 * 1024 * 1024


def test_a_commit_far_past_the_preparation_asks_a_second_range_instead_of_reading() -> None:
    body = os.urandom(BIG)
    head_length = len(response_head(BIG, ETAG))
    checkpoint = original_checkpoint(body, head_length + 1_000_000)
    prepared = head_length + 1_100_000
    committed = head_length + 25_000_000  # 24 MB more reached the client before the freeze
    service = Service(body, ETAG)
    replayer = asyncio.run(regenerate(service, checkpoint, prepared, committed))
    assert len(service.requests) == 2
    again = committed - head_length - WINDOW_BYTES
    assert b"\r\nRange: bytes=%d-\r\n" % again in service.requests[1]
    assert b"\r\nIf-Range: " + ETAG + b"\r\n" in service.requests[1]
    assert replayer.skipped >= 23_000_000
    assert replayer.regenerated < 4 * 1024 * 1024  # the window and a read's worth, not 24 MB
    unsent = bytes(replayer.unsent)
    assert unsent == body[25_000_000 : 25_000_000 + len(unsent)]
    stream = replayer.stream
    assert stream.s2c_pos == committed + len(unsent)
    # The live connection's next checkpoints: a range record whose window is the body's own
    # bytes, and the codec still counting the body to its end.
    offset = stream.s2c_pos - head_length
    stream.feed_s2c(body[offset : offset + 100_000])
    later = checkpoint_of(stream, epoch=6, counter=2)
    record = later.range
    assert record is not None
    window = body[record.window_start - head_length : stream.s2c_pos - head_length]
    assert record.window_hash == hashlib.sha256(window).digest()
    stream.feed_s2c(body[offset + 100_000 :])
    stream.feed_c2s(REQUEST)  # the next request of the keep-alive connection
    assert stream.codec.degraded is None
    assert len(stream.candidates) == 2  # the response ended exactly where its length said


def test_a_commit_far_past_a_checkpoint_that_was_ahead_of_the_prepare_asks_again() -> None:
    """At full speed the old server's checkpoint is ahead of what its client has (the bytes in
    flight): the PREPARE reads on to the checkpoint, and keeps what the client lacked for it.
    The client has those by the COMMIT; they must not stop the second range (a COMMIT 56 MiB
    on read every byte between: 28 ms of a 29 ms pause, docs/benchmarks.md)."""
    body = os.urandom(BIG)
    head_length = len(response_head(BIG, ETAG))
    checkpoint = original_checkpoint(body, head_length + 1_100_000)
    prepared = head_length + 1_000_000  # the client 100 KB behind the checkpoint
    committed = head_length + 25_000_000
    service = Service(body, ETAG)
    replayer = asyncio.run(regenerate(service, checkpoint, prepared, committed))
    assert len(service.requests) == 2
    again = committed - head_length - WINDOW_BYTES
    assert b"\r\nRange: bytes=%d-\r\n" % again in service.requests[1]
    assert replayer.skipped >= 23_000_000
    assert replayer.regenerated < 4 * 1024 * 1024
    unsent = bytes(replayer.unsent)
    assert unsent == body[25_000_000 : 25_000_000 + len(unsent)]
    assert replayer.stream.s2c_pos == committed + len(unsent)


def test_a_representation_changed_since_the_prepare_makes_the_commit_read_on() -> None:
    """If-Range answers 200 on the second request: the first range's connection, verified at
    the PREPARE, goes on (every byte read), and the bytes are still the original's."""
    body = os.urandom(BIG)
    head_length = len(response_head(BIG, ETAG))
    checkpoint = original_checkpoint(body, head_length + 1_000_000)
    prepared = head_length + 1_100_000
    committed = head_length + 25_000_000

    class Changing(Service):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.requests:  # the file was replaced after the first request
                self.etag = b'"another"'
            await super().handle(reader, writer)

    service = Changing(body, ETAG)
    replayer = asyncio.run(regenerate(service, checkpoint, prepared, committed))
    assert len(service.requests) == 2  # asked, answered 200, dropped
    assert replayer.skipped == 0
    assert replayer.regenerated >= 24_000_000
    unsent = bytes(replayer.unsent)
    assert unsent == body[25_000_000 : 25_000_000 + len(unsent)]


def test_a_commit_near_the_preparation_reads_on_without_a_second_request() -> None:
    body = os.urandom(BIG)
    head_length = len(response_head(BIG, ETAG))
    checkpoint = original_checkpoint(body, head_length + 1_000_000)
    prepared = head_length + 1_100_000
    committed = prepared + 1_000_000
    service = Service(body, ETAG)
    replayer = asyncio.run(regenerate(service, checkpoint, prepared, committed))
    assert len(service.requests) == 1
    assert replayer.skipped == 0
    unsent = bytes(replayer.unsent)
    assert unsent == body[2_100_000 : 2_100_000 + len(unsent)]


# A COMMIT in a later response than the one prepared (issue 14): the keep-alive client has
# finished the first copy, asked for the second and is deep into it.
LATER = 12 * 1024 * 1024


def two_copies(body: bytes, into_second: int, behind: int):  # type: ignore[no-untyped-def]
    """The prepared checkpoint (1 MB into the first copy), the COMMIT's checkpoint (``behind``
    bytes before the client's position, ``into_second`` bytes into the second copy's body)
    and the client's final position."""
    first = response_head(len(body), ETAG) + body
    prepared = original_checkpoint(body, len(response_head(len(body), ETAG)) + 1_000_000)
    final = len(first) + len(first) - len(body) + into_second
    state = StreamState("http", range_min_body=1)
    state.feed_c2s(REQUEST)
    for low in range(0, len(first), 1_000_000):
        state.feed_s2c(first[low : low + 1_000_000])
    state.feed_c2s(REQUEST)
    second = (first * 2)[len(first) : final - behind]
    for low in range(0, len(second), 1_000_000):
        state.feed_s2c(second[low : low + 1_000_000])
    newer = checkpoint_of(state, epoch=5, counter=2, acked=final - behind)
    return prepared, newer, final


async def committed_bytes(  # type: ignore[no-untyped-def]
    service: Service, replayer: Replayer, received: int, commit: Request, newer
) -> bytes:
    """Prepare to ``received``, run the COMMIT's step with ``newer``, and return the next
    64 KiB the replayer holds or reads from the service for the client (what the restored
    connection would send first)."""
    async with serving(service) as connect:
        try:
            await replayer.start(connect, received)
            await replayer.commit_stream(commit, newer)
            assert replayer.service is not None
            after = bytearray(replayer.unsent)
            loop = asyncio.get_running_loop()
            while len(after) < 65536:
                chunk = await loop.sock_recv(replayer.service, 65536 - len(after))
                assert chunk
                after += chunk
        finally:
            replayer.close()
    return bytes(after[:65536])


async def commit_later(  # type: ignore[no-untyped-def]
    service: Service,
    prepared,
    newer,
    final: int,
    *,
    next_in_prepare: bool = False,
    pipelined: bytes = b"",
) -> tuple[Replayer, bytes]:
    """PREPARE 1.1 MB into the first copy, then the COMMIT (carrying ``newer``) at ``final``;
    the second request in the COMMIT's replay, or (``next_in_prepare``: the client had sent
    it by its refresh) in the PREPARE's. Returns the replayer and the next 64 KiB it holds or
    reads from the service for the client (what the restored connection would send first).
    ``pipelined``: more requests the client sent after the second, in the PREPARE."""
    received = len(response_head(LATER, ETAG)) + 1_100_000
    sent = 2 * len(REQUEST) + len(pipelined)
    if next_in_prepare:
        sealed = seal_checkpoint(prepared, KEY, bytes(16), os.urandom)
        first = REQUEST * 2 + pipelined
        replayer = Replayer(
            prepared, Request(Phase.PREPARE, 5, 40000, 80, sent, received, 0, sealed, first)
        )
    else:
        replayer = Replayer(prepared, prepare(prepared, received))
    sealed = seal_checkpoint(newer, KEY, bytes(16), os.urandom)
    replay = b"" if next_in_prepare else REQUEST
    commit = Request(Phase.COMMIT, 5, 40000, 80, sent, final, sent - len(replay), sealed, replay)
    after = await committed_bytes(service, replayer, received, commit, newer)
    return replayer, after


def commit_on_two_copies(  # type: ignore[no-untyped-def]
    *, with_newer: bool = True, behind: int = 500_000, **options
) -> tuple[bytes, Service, Replayer, bytes]:
    """The keep-alive client 10 MB into the second copy commits (``commit_later``), with the
    newer checkpoint ``behind`` bytes before it or (not ``with_newer``) the prepared one."""
    body = os.urandom(LATER)
    prepared, newer, final = two_copies(body, into_second=10_000_000, behind=behind)
    service = Service(body, ETAG)
    chosen = newer if with_newer else prepared
    replayer, after = asyncio.run(commit_later(service, prepared, chosen, final, **options))
    return body, service, replayer, after


@pytest.mark.parametrize("next_in_prepare", [False, True], ids=["in-commit", "in-prepare"])
def test_a_commit_in_a_later_response_starts_again_from_its_newer_checkpoint(
    next_in_prepare: bool,
) -> None:
    body, service, replayer, after = commit_on_two_copies(next_in_prepare=next_in_prepare)
    assert replayer.rebased == 1
    assert replayer.checkpoint.counter == 2  # the newer checkpoint, not the prepared one (1)
    # The client's next bytes are the second copy's, from exactly where it is.
    assert after == body[10_000_000 : 10_000_000 + 65536]
    # Read: the first range's window and a read's worth, then the second copy's window before
    # the newer checkpoint and on to the client; not the 21 MB between.
    assert replayer.regenerated < 2 * 1024 * 1024
    assert b"\r\nIf-Range: " + ETAG + b"\r\n" in service.requests[-1]


def test_a_commit_whose_newer_checkpoint_the_replica_contradicts_is_refused() -> None:
    body = os.urandom(LATER)
    prepared, newer, final = two_copies(body, into_second=10_000_000, behind=500_000)
    changed = bytearray(body)
    changed[9_490_000] ^= 1  # in the second copy's window before the newer checkpoint
    with pytest.raises(Diverged, match="differs"):
        asyncio.run(commit_later(Service(bytes(changed), ETAG), prepared, newer, final))


@pytest.mark.parametrize("next_in_prepare", [False, True], ids=["in-commit", "in-prepare"])
def test_a_commit_without_a_newer_checkpoint_stays_intact(next_in_prepare: bool) -> None:
    """The COMMIT's checkpoint is the prepared one: the first copy's last byte is asked for by
    range on a fresh connection and the second request follows it (a GET, safe to send again
    when the first connection had sent it already), so only the second copy up to the client
    is read."""
    body, service, replayer, after = commit_on_two_copies(
        with_newer=False, next_in_prepare=next_in_prepare
    )
    assert replayer.rebased == 0
    assert after == body[10_000_000 : 10_000_000 + 65536]
    assert replayer.skipped > 10_000_000
    assert replayer.regenerated < 11_000_000  # the second copy up to the client
    assert service.requests[-1] == REQUEST
    assert b"Range: bytes=%d-" % (LATER - 1) in service.requests[-2]


def test_a_commit_never_asks_again_for_requests_the_first_connection_sent() -> None:
    """The client pipelined a DELETE before its refresh: the first connection sent it to the
    service. Starting again from the newer checkpoint would send it a second time (its work
    done twice): the first connection reads on."""
    delete = b"DELETE /big.bin HTTP/1.1\r\nHost: vip\r\n\r\n"
    body, service, replayer, after = commit_on_two_copies(next_in_prepare=True, pipelined=delete)
    assert replayer.rebased == 0
    # Every request at most once. (The service reads the DELETE only once it has written the
    # second copy, which the client stops reading 10 MB in: it may not have read it yet.)
    assert len(service.requests) == len(set(service.requests)), service.requests
    assert service.requests.count(delete) <= 1
    assert after == body[10_000_000 : 10_000_000 + 65536]


def test_a_pipelined_get_the_first_connection_sent_may_be_asked_again() -> None:
    """A GET is a safe method (RFC 9110 9.2.1): asking for it again does no work twice, so the
    COMMIT starts again from its newer checkpoint, the pipelined GET after the range."""
    body, service, replayer, after = commit_on_two_copies(next_in_prepare=True, pipelined=REQUEST)
    assert replayer.rebased == 1
    assert service.requests[-1] == REQUEST  # after the ranged second request, on the fresh one
    assert after == body[10_000_000 : 10_000_000 + 65536]


def test_a_commit_behind_its_newer_checkpoint_gets_every_byte_it_lacks() -> None:
    """At full speed the old server's checkpoint can be ahead of the client: it covers bytes
    still in flight when the freeze stopped them. Starting again from it, the bytes between
    the client's position and the checkpoint's are kept for the client, not skipped."""
    body = os.urandom(LATER)
    prepared, newer, final = two_copies(body, into_second=10_000_000, behind=-300_000)
    assert newer.s2c_pos > final
    service = Service(body, ETAG)
    replayer, after = asyncio.run(commit_later(service, prepared, newer, final))
    assert replayer.rebased == 1
    assert after == body[10_000_000 : 10_000_000 + 65536]


def test_a_commit_far_behind_its_newer_checkpoint_has_the_window_checked_aside() -> None:
    """3 MB behind the checkpoint (bytes in flight at full speed): the window is asked for
    alone on a second connection and compared there, and the client's own range is not read
    up to the checkpoint (those bytes were read here and sent from Python: 5-13 ms of a
    COMMIT); the client's next bytes are still exactly the original's."""
    body = os.urandom(LATER)
    prepared, newer, final = two_copies(body, into_second=8_000_000, behind=-3_000_000)
    assert newer.range is not None
    assert newer.range.window_start - final > 2_900_000
    service = Service(body, ETAG)
    replayer, after = asyncio.run(commit_later(service, prepared, newer, final))
    assert replayer.rebased == 1
    assert replayer.aside == 1
    assert after == body[8_000_000 : 8_000_000 + 65536]
    window = b"\r\nRange: bytes=%d-%d\r\n" % (11_000_000 - WINDOW_BYTES, 11_000_000 - 1)
    assert sum(window in request for request in service.requests) == 1
    assert len(replayer.unsent) < 256 * 1024  # not the 3 MB between
    assert replayer.stream.s2c_pos - len(replayer.unsent) == final


def test_a_replica_that_differs_in_the_window_asked_alone_is_refused() -> None:
    body = os.urandom(LATER)
    prepared, newer, final = two_copies(body, into_second=8_000_000, behind=-3_000_000)
    changed = bytearray(body)
    changed[11_000_000 - 100] ^= 1  # inside the newer checkpoint's window, same size and ETag
    service = Service(bytes(changed), ETAG)
    with pytest.raises(Diverged, match="asked alone"):
        asyncio.run(commit_later(service, prepared, newer, final))


# Short responses one after the other at full speed (issue 14): the client is many responses
# past the prepared one at the COMMIT, whose checkpoint was taken between two of them.
SHORT = 1024 * 1024


async def commit_many_short(
    service: Service, body: bytes, copies: int, *, newer_at: int, tail: int
) -> tuple[Replayer, bytes, bytes]:
    """PREPARE 0.5 MB into the first copy; the COMMIT carries a checkpoint taken at the end of
    copy ``newer_at`` (its next request seen, none of its answer: no range record), and the
    client is ``tail`` bytes into copy ``copies - 1``. Returns the replayer, the next 64 KiB it
    holds or reads for the client, and what the client should get there."""
    whole = response_head(len(body), ETAG) + body
    prepared = original_checkpoint(body, len(response_head(len(body), ETAG)) + 400_000)
    received = len(response_head(len(body), ETAG)) + 500_000
    state = StreamState("http", range_min_body=1)
    for _ in range(newer_at):
        state.feed_c2s(REQUEST)
        state.feed_s2c(whole)
    state.feed_c2s(REQUEST)
    newer = checkpoint_of(state, epoch=5, counter=2, acked=newer_at * len(whole))
    assert newer.range is None
    assert newer.s2c_fresh == newer.s2c_pos == newer_at * len(whole)
    final = (copies - 1) * len(whole) + tail
    sent = copies * len(REQUEST)
    sealed = seal_checkpoint(newer, KEY, bytes(16), os.urandom)
    replay = REQUEST * (copies - 1)
    commit = Request(Phase.COMMIT, 5, 40000, 80, sent, final, len(REQUEST), sealed, replay)
    replayer = Replayer(prepared, prepare(prepared, received))
    after = await committed_bytes(service, replayer, received, commit, newer)
    expected = (whole * copies)[final : final + 65536]
    return replayer, after, expected


def test_a_commit_many_short_responses_on_starts_again_from_its_newer_fresh_point() -> None:
    """Measured: 1 MiB responses flat out, a client 185 MB past the prepared position at its
    COMMIT; the newer checkpoint, between two responses, has no range record, and the new
    server read on through Python from the prepared position until the client gave up (no
    answer to the commit in 5 s). Started from that checkpoint's fresh point, only the
    responses after it are read."""
    body = os.urandom(SHORT)
    service = Service(body, ETAG)
    replayer, after, expected = asyncio.run(
        commit_many_short(service, body, 12, newer_at=10, tail=300_000)
    )
    assert replayer.rebased == 1
    assert replayer.checkpoint.counter == 2
    assert after == expected
    # The first range's window and read, then copy 10 and 0.3 MB of copy 11: not copies 1-9.
    assert replayer.regenerated < 2 * len(body) + 600_000
    assert service.requests[-2:] == [REQUEST, REQUEST]  # copies 10 and 11, on the fresh one


def test_a_commit_whose_newer_fresh_point_is_behind_the_regenerated_reads_on() -> None:
    """A newer checkpoint between two responses but before what the prepared connection has
    read already: starting there would read no less, so the prepared connection goes on."""
    body = os.urandom(SHORT)
    service = Service(body, ETAG)
    replayer, after, expected = asyncio.run(
        commit_many_short(service, body, 4, newer_at=0, tail=300_000)
    )
    assert replayer.rebased == 0
    assert after == expected


def test_a_commit_is_metered_for_what_it_reads_not_for_how_far_the_client_went() -> None:
    """The client's regeneration budget (migrate.admission) is charged, at the COMMIT, with
    the bytes the new server will read: from the newer checkpoint's fresh point when it
    starts again from there, not the 10 responses the client went through meanwhile (flat
    out, those charges emptied the budget in a few roams and the next hand-overs were
    refused)."""
    body = os.urandom(SHORT)
    whole = response_head(len(body), ETAG) + body
    prepared = original_checkpoint(body, len(response_head(len(body), ETAG)) + 400_000)
    received = len(response_head(len(body), ETAG)) + 500_000
    state = StreamState("http", range_min_body=1)
    for _ in range(10):
        state.feed_c2s(REQUEST)
        state.feed_s2c(whole)
    state.feed_c2s(REQUEST)
    newer = checkpoint_of(state, epoch=5, counter=2, acked=10 * len(whole))
    final = 11 * len(whole) + 300_000
    sealed = seal_checkpoint(newer, KEY, bytes(16), os.urandom)
    commit = Request(
        Phase.COMMIT, 5, 40000, 80, 12 * len(REQUEST), final, len(REQUEST), sealed, REQUEST * 11
    )
    replayer = Replayer(prepared, prepare(prepared, received))
    # Starting again from the newer checkpoint: its response and 0.3 MB of the next.
    assert replayer.commit_reads(commit, newer, received) == final - newer.s2c_fresh
    # Without a newer checkpoint (or with the prepared one) it reads on to the client.
    assert replayer.commit_reads(commit, None, received) == final - received
    assert replayer.commit_reads(commit, prepared, received) == final - received


def regenerate_many(copies: int, received: int, range_bodies: str) -> tuple[Replayer, bytes, bytes]:
    """A keep-alive client that asked for the file ``copies`` times; the checkpoint from the
    end of the first copy, the client at ``received``. The replayer (closed), the whole
    original stream and the next 100 KB the service sent after the regeneration."""
    body = os.urandom(SIZE)
    first = response_head(SIZE, ETAG) + body
    checkpoint = original_checkpoint(body, len(first))
    sealed = seal_checkpoint(checkpoint, KEY, bytes(16), os.urandom)
    replay = REQUEST * copies
    request = Request(Phase.PREPARE, 5, 40000, 80, len(replay), received, 0, sealed, replay)
    replayer = Replayer(checkpoint, request, range_bodies=range_bodies)
    service = Service(body, ETAG)
    following = bytearray()

    async def run() -> None:
        async with serving(service) as connect:
            try:
                await replayer.start(connect, received)
                assert replayer.service is not None
                loop = asyncio.get_running_loop()
                while len(following) < 100_000:
                    following.extend(await loop.sock_recv(replayer.service, 100_000))
            finally:
                replayer.close()

    asyncio.run(run())
    return replayer, first * copies, bytes(following[:100_000])


@pytest.mark.parametrize("range_bodies", ["window", "hash"])
def test_whole_answers_after_the_checkpoint_are_dropped_in_the_kernel_with_window_bodies(
    range_bodies: str,
) -> None:
    """The client three answers past its checkpoint (a flat-out keep-alive client at a roam):
    with ``--range-bodies window`` the bodies it has are dropped in the kernel, never read
    (only heads and a few bytes around them are: no checkpoint of the new server can lie at
    the end of a body its client has whole, so no body's last window is read either), and
    what it gets next is still exactly the original's; with ``hash`` every byte is read, as
    before."""
    received = 3 * (len(response_head(SIZE, ETAG)) + SIZE) + 1_000_000
    replayer, original, following = regenerate_many(4, received, range_bodies)
    assert replayer.stream.s2c_pos == received
    assert following == original[received : received + len(following)]
    if range_bodies == "window":
        assert replayer.dropped >= 2 * (SIZE - 2 * WINDOW_BYTES)
        # (Reading each whole body's last window, as before, came to 0.68 MB here.)
        assert replayer.regenerated < 3 * WINDOW_BYTES
    else:
        assert replayer.dropped == 0
        assert replayer.regenerated >= received - len(original) // 4


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_preparation_released_while_it_waits_for_the_service_ends_and_unregisters(
    loop: str,
) -> None:
    """A preparation dropping bodies in the kernel waits for the service's next bytes; released
    meanwhile (a newer PREPARE, an abort: ``close``), the wait ends at once as a divergence, and
    the service socket leaves the loop before it is closed (the wait's own clean-up met a
    closed replayer and logged an internal error; a descriptor closed while registered could
    be reused by a relay's socket)."""
    import uvloop

    body = os.urandom(SIZE)
    checkpoint = original_checkpoint(body, len(response_head(SIZE, ETAG)) + 1_000_000)
    replayer = Replayer(checkpoint, prepare(checkpoint, checkpoint.s2c_pos))
    service, peer = socket.socketpair()
    service.setblocking(False)
    fd = service.fileno()

    async def scenario() -> str:
        replayer.service = service
        waiting = asyncio.create_task(replayer._readable("the service stopped"))
        await asyncio.sleep(0.01)
        replayer.close()
        with pytest.raises(Diverged) as ended:
            async with asyncio.timeout(2):
                await waiting
        # Nothing of the replayer's is registered under the descriptor any more.
        assert not asyncio.get_running_loop().remove_reader(fd)
        return str(ended.value)

    try:
        reason = uvloop.run(scenario()) if loop == "uvloop" else asyncio.run(scenario())
    finally:
        peer.close()
    assert reason == "the preparation was released"
    assert service.fileno() == -1
