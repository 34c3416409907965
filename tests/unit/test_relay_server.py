"""``proxy.relay.serve``: a service connect that completes at once starts the relay in the
accept callback; one that waits goes on in a task, bounded by the connect timeout and
cancelled by ``close()``; a client whose service connection fails is reset."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from proxy.relay import Address, RelayServer, serve
from proxy.transparent import connect_plain

T = TypeVar("T")
LoopRunner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> LoopRunner[Any]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coroutine: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(30.0):
                return await coroutine

        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(bounded())

    return runner


async def echo_service() -> tuple[asyncio.Server, Address]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


async def round_trip(server: RelayServer, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(payload)
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer


async def is_reset(address: Address) -> bool:
    """Connect (the kernel completes the handshake before any accept) and read: a reset, or
    an orderly end?"""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)  # the reset may come while it completes
            await loop.sock_recv(sock, 1)
        except ConnectionResetError:
            return True
        return False


ConnectService = Callable[[socket.socket, Address], Awaitable[socket.socket]]


def relayed_through(connect: Callable[[Address], ConnectService], run: LoopRunner[Any]) -> bytes:
    async def scenario() -> bytes:
        service, address = await echo_service()
        server = await serve(("127.0.0.1", 0), connect(address), connect_timeout_s=5.0)
        try:
            answer = await round_trip(server, b"hello")
            assert server.snapshot().accepted == 1
            assert server.snapshot().connect_failures == 0
            return answer
        finally:
            server.close()
            await server.wait_closed()
            service.close()

    return run(scenario())


def test_a_connect_that_completes_at_once_is_relayed(run: LoopRunner[Any]) -> None:
    def connect(address: Address) -> ConnectService:
        async def at_once(client: socket.socket, peer: Address) -> socket.socket:
            return await connect_plain(address, timeout_s=5.0)

        return at_once

    assert relayed_through(connect, run) == b"hello"


def test_a_connect_that_waits_is_relayed(run: LoopRunner[Any]) -> None:
    def connect(address: Address) -> ConnectService:
        async def later(client: socket.socket, peer: Address) -> socket.socket:
            await asyncio.sleep(0.01)  # suspends: the rest runs in a task
            await asyncio.sleep(0)
            return await connect_plain(address, timeout_s=5.0)

        return later

    assert relayed_through(connect, run) == b"hello"


def test_a_waiting_connect_is_bounded_and_cancelled_by_close(run: LoopRunner[Any]) -> None:
    cancelled: list[bool] = []

    async def never(client: socket.socket, peer: Address) -> socket.socket:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        raise AssertionError("unreachable")

    async def scenario() -> None:
        server = await serve(("127.0.0.1", 0), never, connect_timeout_s=0.2)
        # Bounded: the client is reset once the connect timeout passed.
        assert await is_reset(server.address)
        assert server.snapshot().connect_failures == 1
        assert cancelled == [True]
        # Closing the server cancels a connect still waiting; its client is reset too.
        reader, writer = await asyncio.open_connection(*server.address)
        while server.snapshot().live == 0:
            await asyncio.sleep(0.005)
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        assert cancelled == [True, True]

    run(scenario())


def test_a_connect_that_fails_at_once_resets_the_client(run: LoopRunner[Any]) -> None:
    async def refused(client: socket.socket, peer: Address) -> socket.socket:
        raise ConnectionRefusedError("no service")

    async def scenario() -> None:
        server = await serve(("127.0.0.1", 0), refused)
        assert await is_reset(server.address)
        assert server.snapshot().connect_failures == 1
        server.close()
        await server.wait_closed()

    run(scenario())
