"""The relay engine over socketpairs (no network): contents, order, half-close, backpressure,
errors and cleanup, with the default loop and with uvloop. TCP behaviour (resets, transparent
connections, the accept loop) is tested in tests/system/test_relay.py."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from proxy.relay import (
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


def test_observer_sees_every_byte_in_order_before_it_is_forwarded(run: LoopRunner[None]) -> None:
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
            client_to_service=Copy(observe, buffer_size_bytes=8192),
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


@pytest.mark.parametrize("mode", ["splice", "copy"])
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


@pytest.mark.parametrize("mode", ["splice", "copy"])
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


@pytest.mark.parametrize("mode", ["splice", "copy"])
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


def test_an_observer_exception_ends_the_relay(run: LoopRunner[None]) -> None:
    class Diverged(Exception):
        pass

    def refuse(chunk: memoryview) -> None:
        raise Diverged("hash mismatch")

    async def scenario() -> None:
        ends = Ends()
        relay = Relay(ends.client, ends.service, service_to_client=Copy(refuse))
        relay.start()
        await asyncio.get_running_loop().sock_sendall(ends.backend, b"response")
        outcome = await relay.wait()
        assert outcome.reason is EndReason.OBSERVER_FAILED
        assert isinstance(outcome.error, Diverged)
        assert await receive_to_eof(ends.app) == b""  # not a byte got through
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
