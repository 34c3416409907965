"""The relay engine over socketpairs (no network): contents, order, half-close, backpressure,
errors and cleanup, with the default loop and with uvloop. TCP behaviour (resets, transparent
connections, the accept loop) is tested in tests/system/test_relay.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import random
import socket
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from proxy.relay import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_PIPE_CAPACITY,
    DEFAULT_PIPE_SIZE,
    Copy,
    EndReason,
    Mode,
    Relay,
    Splice,
    _enlarge_pipe,
    _parse_address,
    _SplicePump,
    mode_from_spec,
)

T = TypeVar("T")
LOOP_TIMEOUT_S = 30.0
CHUNK = 1 << 16

LoopRunner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> LoopRunner[Any]:
    """Run a coroutine to completion on a fresh loop of the parametrised kind (bounded)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coroutine: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(LOOP_TIMEOUT_S):
                return await coroutine

        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(bounded())

    return runner


def open_fds() -> int:
    # Sockets an earlier test left to the cyclic GC would otherwise close mid-test and count.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module", autouse=True)
def _uvloop_globals() -> None:
    """libuv opens a process-wide signal pipe with its first loop and keeps it: open it before
    any fd count is taken."""
    uvloop.new_event_loop().close()


class Ends:
    """Two socketpairs: ``app`` <-> ``client`` and ``service`` <-> ``backend``; the relay gets
    ``client`` and ``service``, the test plays the application and the backend."""

    def __init__(self) -> None:
        self.app, self.client = socket.socketpair()
        self.service, self.backend = socket.socketpair()
        for sock in (self.app, self.backend):
            sock.setblocking(False)

    def close(self) -> None:
        for sock in (self.app, self.client, self.service, self.backend):
            sock.close()


async def send_all_then_shut(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def receive_to_eof(
    sock: socket.socket, on_chunk: Callable[[int], None] | None = None
) -> bytes:
    loop = asyncio.get_running_loop()
    parts = []
    while True:
        chunk = await loop.sock_recv(sock, CHUNK)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        if on_chunk is not None:
            on_chunk(sum(len(part) for part in parts))


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


MODES: dict[str, Callable[[], tuple[Mode, Mode]]] = {
    "splice": lambda: (Splice(), Splice()),
    "copy": lambda: (Copy(), Copy()),
    "copy-small-buffer": lambda: (Copy(buffer_size_bytes=4096), Copy(buffer_size_bytes=1000)),
    "small-pipe": lambda: (Splice(4096), Splice(4096)),
    "mixed": lambda: (Copy(lambda chunk: None), Splice()),
    # Spliced, observed through a tee into a side pipe.
    "tee": lambda: (Splice(observer=lambda chunk: None), Splice(observer=lambda chunk: None)),
    "tee-small": lambda: (
        Splice(4096, lambda chunk: None, 1000),
        Splice(4096, lambda chunk: None, 3000),
    ),
    # The same, the side pipe read by a thread (experimental, off by default).
    "tee-thread": lambda: (
        Splice(observer=lambda chunk: None, observer_thread=True),
        Splice(observer=lambda chunk: None, observer_thread=True),
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_bulk_both_directions_intact(run: LoopRunner[None], mode: str) -> None:
    up, down = payload(8 << 20, 1), payload(8 << 20, 2)

    async def scenario() -> None:
        ends = Ends()
        c2s, s2c = MODES[mode]()
        relay = Relay(ends.client, ends.service, client_to_service=c2s, service_to_client=s2c)
        relay.start()
        received_up, received_down, _, _ = await asyncio.gather(
            receive_to_eof(ends.backend),
            receive_to_eof(ends.app),
            send_all_then_shut(ends.app, up),
            send_all_then_shut(ends.backend, down),
        )
        outcome = await relay.wait()
        assert received_up == up
        assert received_down == down
        assert outcome.reason is EndReason.COMPLETED
        assert (outcome.bytes_client_to_service, outcome.bytes_service_to_client) == (
            len(up),
            len(down),
        )
        assert ends.client.fileno() == -1
        assert ends.service.fileno() == -1
        ends.close()

    before = open_fds()
    run(scenario())
    assert open_fds() == before


OBSERVED: dict[str, Callable[[Callable[[memoryview], None]], Mode]] = {
    "copy": lambda observe: Copy(observe, buffer_size_bytes=8192),
    "tee": lambda observe: Splice(observer=observe),
    "tee-small": lambda observe: Splice(4096, observe, 1000),
}
THREADED: dict[str, Callable[[Callable[[memoryview], None]], Mode]] = {
    **OBSERVED,
    "tee-thread": lambda observe: Splice(observer=observe, observer_thread=True),
}


@pytest.mark.parametrize("mode", OBSERVED)
def test_observer_sees_every_byte_in_order_by_the_time_it_is_forwarded(
    run: LoopRunner[None], mode: str
) -> None:
    data = payload(4 << 20, 3)
    observed: list[bytes] = []

    def observe(chunk: memoryview) -> None:
        observed.append(bytes(chunk))

    def check_ahead(received: int) -> None:
        assert sum(map(len, observed)) >= received

    async def scenario() -> None:
        ends = Ends()
        relay = Relay(
            ends.client,
            ends.service,
            client_to_service=OBSERVED[mode](observe),
        )
        relay.start()
        received, _ = await asyncio.gather(
            receive_to_eof(ends.backend, check_ahead), send_all_then_shut(ends.app, data)
        )
        ends.backend.shutdown(socket.SHUT_WR)
        assert (await relay.wait()).reason is EndReason.COMPLETED
        assert received == data
        ends.close()

    run(scenario())
    assert b"".join(observed) == data
    assert len(observed) > 1


@pytest.mark.parametrize("mode", ["splice", "copy", "tee", "tee-thread"])
def test_half_close_keeps_the_other_direction(run: LoopRunner[None], mode: str) -> None:
    request, response = b"GET / please\r\n", payload(2 << 20, 4)

    async def scenario() -> None:
        ends = Ends()
        c2s, s2c = MODES[mode]()
        relay = Relay(ends.client, ends.service, client_to_service=c2s, service_to_client=s2c)
        relay.start()
        await send_all_then_shut(ends.app, request)
        # the backend sees the whole request, then EOF: the FIN was passed on
        assert await receive_to_eof(ends.backend) == request
        assert not relay.ended
        received, _ = await asyncio.gather(
            receive_to_eof(ends.app), send_all_then_shut(ends.backend, response)
        )
        assert received == response
        outcome = await relay.wait()
        assert outcome.reason is EndReason.COMPLETED
        ends.close()

    run(scenario())


@pytest.mark.parametrize("mode", ["splice", "copy", "tee", "tee-thread"])
def test_a_stalled_receiver_stalls_the_sender(run: LoopRunner[None], mode: str) -> None:
    async def scenario() -> None:
        ends = Ends()
        c2s, s2c = MODES[mode]()
        relay = Relay(ends.client, ends.service, client_to_service=c2s, service_to_client=s2c)
        relay.start()
        block = b"x" * CHUNK
        written = 0
        # the backend never reads: the app must be blocked after a bounded amount
        for _ in range(2000):
            try:
                written += ends.app.send(block)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                try:
                    written += ends.app.send(block)
                except BlockingIOError:
                    break
        else:
            pytest.fail(f"the sender was never stalled ({written} bytes taken)")
        forwarded = relay.bytes_client_to_service
        await asyncio.sleep(0.2)
        assert relay.bytes_client_to_service == forwarded  # nothing moves while stalled
        assert written < 32 << 20  # socket buffers plus one pipe or buffer, not unbounded
        ends.app.shutdown(socket.SHUT_WR)
        received = await receive_to_eof(ends.backend)
        assert len(received) == written
        ends.backend.shutdown(socket.SHUT_WR)
        assert (await relay.wait()).reason is EndReason.COMPLETED
        ends.close()

    run(scenario())


def test_abort_ends_both_sides(run: LoopRunner[None]) -> None:
    async def scenario() -> None:
        ends = Ends()
        relay = Relay(ends.client, ends.service)
        relay.start()
        relay.abort()
        relay.abort()  # idempotent
        outcome = await relay.wait()
        assert outcome.reason is EndReason.ABORTED
        assert await receive_to_eof(ends.app) == b""
        assert await receive_to_eof(ends.backend) == b""
        ends.close()

    before = open_fds()
    run(scenario())
    assert open_fds() == before


@pytest.mark.parametrize("mode", ["splice", "copy", "tee", "tee-thread"])
def test_a_broken_side_ends_the_relay(run: LoopRunner[None], mode: str) -> None:
    async def scenario() -> None:
        ends = Ends()
        c2s, s2c = MODES[mode]()
        relay = Relay(ends.client, ends.service, client_to_service=c2s, service_to_client=s2c)
        relay.start()
        ends.backend.close()  # the service goes away: writing to it is a broken pipe
        loop = asyncio.get_running_loop()
        for _ in range(100):
            if relay.ended:
                break
            try:
                await loop.sock_sendall(ends.app, b"y" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                break
            await asyncio.sleep(0.01)
        outcome = await relay.wait()
        assert outcome.reason is EndReason.RESET
        assert outcome.failed_side == "service"
        assert isinstance(outcome.error, OSError)
        ends.close()

    run(scenario())


@pytest.mark.parametrize("mode", THREADED)
def test_an_observer_exception_ends_the_relay(run: LoopRunner[None], mode: str) -> None:
    class Diverged(Exception):
        pass

    def refuse(chunk: memoryview) -> None:
        raise Diverged("hash mismatch")

    async def scenario() -> None:
        ends = Ends()
        relay = Relay(ends.client, ends.service, service_to_client=THREADED[mode](refuse))
        relay.start()
        await asyncio.get_running_loop().sock_sendall(ends.backend, b"response")
        outcome = await relay.wait()
        assert outcome.reason is EndReason.OBSERVER_FAILED
        assert isinstance(outcome.error, Diverged)
        with contextlib.suppress(OSError):  # the relay closed its end abortively
            ends.backend.send(b"more")
        # Observers record, they do not filter: a copying pump sends a chunk before showing
        # it (the observer's work off the round trip), so the refused chunk may have gone
        # out; nothing after it does.
        received = await receive_to_eof(ends.app)
        assert b"response".startswith(received)
        ends.close()

    run(scenario())


def test_wait_survives_cancellation(run: LoopRunner[None]) -> None:
    async def scenario() -> None:
        ends = Ends()
        relay = Relay(ends.client, ends.service)
        relay.start()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await relay.wait()
        assert not relay.ended
        relay.abort()
        assert (await relay.wait()).reason is EndReason.ABORTED
        ends.close()

    run(scenario())


def test_a_bad_mode_leaves_the_sockets_to_the_caller(run: LoopRunner[None]) -> None:
    async def scenario() -> None:
        ends = Ends()
        with pytest.raises(TypeError):
            Relay(ends.client, ends.service, service_to_client="splice")  # type: ignore[arg-type]
        assert ends.client.fileno() >= 0
        ends.close()

    before = open_fds()
    run(scenario())
    assert open_fds() == before


def test_pipe_is_enlarged_or_left_alone() -> None:
    read_end, write_end = os.pipe()
    try:
        assert _enlarge_pipe(write_end, 4096) == DEFAULT_PIPE_CAPACITY
        assert _enlarge_pipe(write_end, 1 << 20) >= 1 << 16
    finally:
        os.close(read_end)
        os.close(write_end)


def test_mode_specs() -> None:
    assert isinstance(mode_from_spec("splice", pipe_size=1 << 20, buffer_size=1), Splice)
    copy = mode_from_spec("copy:sha256", pipe_size=1, buffer_size=1 << 16)
    assert isinstance(copy, Copy)
    assert copy.buffer_size_bytes == 1 << 16
    assert copy.observer is not None
    assert mode_from_spec("copy", pipe_size=1, buffer_size=1) == Copy(None, 1)
    with pytest.raises(ValueError, match="unknown mode"):
        mode_from_spec("zerocopy", pipe_size=1, buffer_size=1)


def test_address_parsing() -> None:
    assert _parse_address("10.0.0.1:80") == ("10.0.0.1", 80)
    assert _parse_address("[::1]:8080") == ("::1", 8080)
    for bad in ("10.0.0.1", ":80", "host:0", "host:99999", "host:x"):
        with pytest.raises(Exception, match="HOST:PORT"):
            _parse_address(bad)


def test_pipes_grow_only_for_bulk_transfers(run: LoopRunner[None]) -> None:
    async def scenario() -> None:
        ends = Ends()
        relay = Relay(ends.client, ends.service)
        upstream, downstream = relay._upstream, relay._downstream
        assert isinstance(upstream, _SplicePump)
        assert isinstance(downstream, _SplicePump)
        relay.start()
        bulk, small = payload(4 << 20, 9), b"ok\n"
        received_up, received_down, _, _ = await asyncio.gather(
            receive_to_eof(ends.backend),
            receive_to_eof(ends.app),
            send_all_then_shut(ends.app, bulk),
            send_all_then_shut(ends.backend, small),
        )
        assert (received_up, received_down) == (bulk, small)
        assert upstream._capacity == DEFAULT_PIPE_SIZE
        assert downstream._capacity == DEFAULT_PIPE_CAPACITY
        assert (upstream.spliced, downstream.spliced) == (True, False)  # a pipe for bulk only
        assert (await relay.wait()).reason is EndReason.COMPLETED
        ends.close()

    run(scenario())


def test_an_ended_relay_is_freed_without_the_cycle_collector(run: LoopRunner[None]) -> None:
    async def scenario() -> weakref.ref[Relay]:
        ends = Ends()
        relay = Relay(ends.client, ends.service, client_to_service=Copy(lambda chunk: None))
        relay.start()
        await asyncio.gather(
            receive_to_eof(ends.backend),
            receive_to_eof(ends.app),
            send_all_then_shut(ends.app, b"request"),
            send_all_then_shut(ends.backend, b"response"),
        )
        await relay.wait()
        await asyncio.sleep(0)  # the closed future's callbacks
        ends.close()
        return weakref.ref(relay)

    gc.disable()
    try:
        assert run(scenario())() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("mode", ["tee", "tee-small", "tee-thread"])
def test_a_spliced_observer_hashes_exactly_the_bytes_forwarded(
    run: LoopRunner[None], mode: str
) -> None:
    """Zero-copy forwarding with a running hash fed from the tee: both directions arrive
    intact and each observer's hash is the hash of what its destination received."""
    up, down = payload(8 << 20, 11), payload(16 << 20, 12)
    hashes = {"up": hashlib.sha256(), "down": hashlib.sha256()}
    small = mode == "tee-small"

    def observed(name: str) -> Splice:
        update = hashes[name].update
        if small:
            return Splice(4096, update, 1000)
        return Splice(observer=update, observer_thread=mode == "tee-thread")

    async def scenario() -> None:
        ends = Ends()
        relay = Relay(
            ends.client,
            ends.service,
            client_to_service=observed("up"),
            service_to_client=observed("down"),
        )
        relay.start()
        received_up, received_down, _, _ = await asyncio.gather(
            receive_to_eof(ends.backend),
            receive_to_eof(ends.app),
            send_all_then_shut(ends.app, up),
            send_all_then_shut(ends.backend, down),
        )
        outcome = await relay.wait()
        assert outcome.reason is EndReason.COMPLETED
        for pump in (relay._upstream, relay._downstream):
            assert isinstance(pump, _SplicePump)
            assert pump.spliced  # the bulk went through the tee, not the buffer
        assert hashlib.sha256(received_up).digest() == hashes["up"].digest()
        assert hashlib.sha256(received_down).digest() == hashes["down"].digest()
        assert (received_up, received_down) == (up, down)
        ends.close()

    before = open_fds()
    run(scenario())
    assert open_fds() == before  # the side pipes are closed too


def test_a_blocked_observer_stalls_the_sender_and_loses_nothing(run: LoopRunner[None]) -> None:
    """An observer that blocks holds the forwarding back (the sender's socket fills up and it
    is stalled): nothing is forwarded past the chunk the observer is shown, nothing is
    dropped, and nothing piles up in memory."""
    block = b"z" * CHUNK
    sender_stalled = threading.Event()
    state = {"observed": 0, "max_ahead": 0, "written": 0, "stalled_at": -1}
    relay_box: list[Relay] = []

    def sender(sock: socket.socket) -> None:
        # Non-blocking writes until the kernel refuses: that is the stall, an event.
        for _ in range(4096):
            try:
                state["written"] += sock.send(block)
            except BlockingIOError:
                sender_stalled.set()
                return

    def observe(chunk: memoryview) -> None:
        relay = relay_box[0]
        state["max_ahead"] = max(
            state["max_ahead"], relay.bytes_client_to_service - state["observed"]
        )
        if state["observed"] == 0:
            # The first chunk: block (as a slow hash would) until the sender has been stalled.
            assert sender_stalled.wait(20.0), "the sender was never stalled"
            state["stalled_at"] = relay.bytes_client_to_service
        state["observed"] += len(chunk)

    async def scenario() -> None:
        ends = Ends()
        relay = Relay(ends.client, ends.service, client_to_service=Splice(observer=observe))
        relay_box.append(relay)
        relay.start()
        thread = threading.Thread(target=sender, args=(ends.app,))
        thread.start()
        received = await receive_to_eof_after(ends, thread)
        assert (await relay.wait()).reason is EndReason.COMPLETED
        assert len(received) == state["written"] == state["observed"]
        assert (
            received
            == block * (state["written"] // len(block)) + block[: state["written"] % len(block)]
        )
        ends.close()

    async def receive_to_eof_after(ends: Ends, thread: threading.Thread) -> bytes:
        loop = asyncio.get_running_loop()
        receiving = asyncio.ensure_future(receive_to_eof(ends.backend))
        await loop.run_in_executor(None, thread.join)
        ends.app.shutdown(socket.SHUT_WR)
        received = await receiving
        ends.backend.shutdown(socket.SHUT_WR)
        return received

    run(scenario())
    # The first read goes through the buffer, sent before it is shown (``Copy``): the chunk in
    # the observer's hands is the only one out; nothing went on while the observer held it.
    assert 0 < state["stalled_at"] <= DEFAULT_BUFFER_SIZE
    assert state["max_ahead"] <= DEFAULT_BUFFER_SIZE  # never more than the chunk being shown
    assert state["written"] < 32 << 20  # the sender was held back, not buffered for


def test_a_spliced_relay_sends_the_regenerated_bytes_first(run: LoopRunner[None]) -> None:
    first, rest = payload(300_000, 13), payload(1 << 20, 14)
    seen = hashlib.sha256()

    async def scenario() -> None:
        ends = Ends()
        relay = Relay(ends.client, ends.service, service_to_client=Splice(observer=seen.update))
        relay.start(to_client_first=first)
        ends.app.shutdown(socket.SHUT_WR)
        received, _ = await asyncio.gather(
            receive_to_eof(ends.app), send_all_then_shut(ends.backend, rest)
        )
        assert received == first + rest
        assert (await relay.wait()).bytes_service_to_client == len(first) + len(rest)
        ends.close()

    run(scenario())
    assert seen.digest() == hashlib.sha256(rest).digest()  # the prefix was observed before


def test_spliced_mode_specs() -> None:
    observed = mode_from_spec("splice:sha256", pipe_size=1 << 20, buffer_size=1 << 18)
    assert isinstance(observed, Splice)
    assert observed.observer is not None
    assert observed.read_size_bytes == 1 << 18
    assert mode_from_spec("splice", pipe_size=1 << 20, buffer_size=1).observer is None


@pytest.mark.parametrize("observed", [True, False])
def test_short_messages_through_a_splice_relay_take_no_pipes(
    run: LoopRunner[None], observed: bool
) -> None:
    """Keep-alive traffic goes through the buffer (two system calls per message, as splice
    in and out) and holds no pipe: an idle connection costs its two sockets, not six (ten
    observed) descriptors, and a short-lived one makes no pipe at all."""
    seen: list[bytes] = []

    def mode() -> Splice:
        return Splice(observer=lambda chunk: seen.append(bytes(chunk))) if observed else Splice()

    async def scenario() -> None:
        ends = Ends()
        without_relay = open_fds()
        relay = Relay(ends.client, ends.service, client_to_service=mode(), service_to_client=mode())
        relay.start()
        loop = asyncio.get_running_loop()
        for number in range(20):
            await loop.sock_sendall(ends.app, b"GET /%d\r\n" % number)
            assert await loop.sock_recv(ends.backend, CHUNK) == b"GET /%d\r\n" % number
            await loop.sock_sendall(ends.backend, b"200 %d\r\n" % number)
            assert await loop.sock_recv(ends.app, CHUNK) == b"200 %d\r\n" % number
        assert open_fds() == without_relay
        for pump in (relay._upstream, relay._downstream):
            assert isinstance(pump, _SplicePump)
            assert not pump.spliced
        relay.abort()
        await relay.wait()
        ends.close()

    before = open_fds()
    run(scenario())
    assert open_fds() == before
    assert len(seen) == (40 if observed else 0)


def test_an_observer_thread_lags_by_a_bounded_amount_and_drops_nothing(
    run: LoopRunner[None],
) -> None:
    """A slow observer on its own thread: the forwarding runs ahead of it by at most the side
    pipe and one read (backpressure), and the observer still sees every byte, in order."""
    data = payload(16 << 20, 15)
    pipe_size, read_size = 1 << 20, 1 << 16
    seen = hashlib.sha256()
    state = {"observed": 0, "max_ahead": 0}
    relay_box: list[Relay] = []

    def observe(chunk: memoryview) -> None:
        if relay_box:
            ahead = relay_box[0].bytes_client_to_service - state["observed"]
            state["max_ahead"] = max(state["max_ahead"], ahead)
        seen.update(chunk)
        state["observed"] += len(chunk)
        threading.Event().wait(0.001)  # slow: a millisecond per chunk

    async def scenario() -> None:
        ends = Ends()
        relay = Relay(
            ends.client,
            ends.service,
            client_to_service=Splice(pipe_size, observe, read_size, observer_thread=True),
        )
        relay_box.append(relay)
        relay.start()
        received, _ = await asyncio.gather(
            receive_to_eof(ends.backend), send_all_then_shut(ends.app, data)
        )
        ends.backend.shutdown(socket.SHUT_WR)
        outcome = await relay.wait()
        assert outcome.reason is EndReason.COMPLETED
        assert received == data
        ends.close()

    before = open_fds()
    run(scenario())
    assert state["observed"] == len(data)  # COMPLETED only once the observer saw it all
    assert seen.digest() == hashlib.sha256(data).digest()
    assert 0 < state["max_ahead"] <= 2 * pipe_size + read_size
    assert open_fds() == before


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_what_the_client_sent_before_the_start_goes_on_at_start(
    run: LoopRunner[None], mode: str
) -> None:
    """A new connection's first request, which arrives while the service connection is being
    made, is forwarded by ``start()`` itself, not one turn of the loop later."""

    async def scenario() -> None:
        ends = Ends()
        ends.app.send(b"GET / HTTP/1.1\r\n\r\n")
        chosen = Splice() if mode == "splice" else Copy()
        relay = Relay(ends.client, ends.service, client_to_service=chosen)
        relay.start()
        assert ends.backend.recv(CHUNK) == b"GET / HTTP/1.1\r\n\r\n"  # no await before
        assert relay.bytes_client_to_service == 18
        relay.abort()
        await relay.wait()
        ends.close()

    run(scenario())
