"""``roam server --live-relay``: each choice forwards an HTTP exchange intact and leaves the
stream state (what checkpoints commit to) exactly as copying through Python does."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvloop

from migrate.endpoints import parse_address_and_port
from migrate.errors import ConfigError
from migrate.kernel.eventlog import EventLog
from migrate.rangeplan import WINDOW_BYTES
from migrate.streamstate import NO_HASH, StreamState
from proxy.checkpoints import CheckpointPusher, observed_modes
from proxy.daemon import ServerOptions, ServerShim
from proxy.live_relays import LIVE_RELAYS
from proxy.relay import Copy, EndReason, Relay, Splice
from tests.unit.test_range_replay import checkpoint_of

REQUEST = b"GET /big HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"
BODY_BYTES = 6 << 20  # bulk: the splice relays tee it (reads of 64 KiB and more)


def response(body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Length: %d\r\nETag: "6a0b-600000"\r\nAccept-Ranges: bytes\r\n\r\n'
    ) % len(body)
    return head + body


def pusher_for(relay: str) -> CheckpointPusher:
    context = SimpleNamespace(max_replay=1 << 20, group_key=bytes(32), live_relay=relay)
    return CheckpointPusher(context)  # type: ignore[arg-type]


def relay_one_exchange(stream: StreamState, pusher: CheckpointPusher, sent: bytes) -> bytes:
    """REQUEST from an application through a real relay observed by ``stream`` (the modes
    ``pusher`` picks), ``sent`` back from a service; what the application received."""
    up, down = observed_modes(
        stream, zero_copy=pusher.zero_copy, observer_thread=pusher.observer_thread
    )

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        app, client = socket.socketpair()
        service, backend = socket.socketpair()
        for sock in (app, backend):
            sock.setblocking(False)
        forwarder = Relay(client, service, client_to_service=up, service_to_client=down)
        forwarder.start()
        try:
            await loop.sock_sendall(app, REQUEST)
            assert await loop.sock_recv(backend, 4096) == REQUEST
            app.shutdown(socket.SHUT_WR)

            async def answer() -> None:
                await loop.sock_sendall(backend, sent)
                backend.shutdown(socket.SHUT_WR)

            async def read_all() -> bytes:
                parts = []
                while chunk := await loop.sock_recv(app, 1 << 16):
                    parts.append(chunk)
                return b"".join(parts)

            _, received = await asyncio.gather(answer(), read_all())
            outcome = await forwarder.wait()
            assert outcome.reason is EndReason.COMPLETED
            return received
        finally:
            for sock in (app, client, service, backend):
                sock.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("relay", LIVE_RELAYS)
def test_each_live_relay_gives_the_stream_state_every_byte_in_order(relay: str) -> None:
    pusher = pusher_for(relay)
    stream = StreamState("http")
    up, down = observed_modes(
        stream, zero_copy=pusher.zero_copy, observer_thread=pusher.observer_thread
    )
    expected_mode = Copy if relay == "copy" else Splice
    assert isinstance(up, expected_mode)
    assert isinstance(down, expected_mode)
    if isinstance(down, Splice):
        assert down.observer_thread is (relay == "splice-thread")
    sent = response(random.Random(7).randbytes(BODY_BYTES))
    received = relay_one_exchange(stream, pusher, sent)
    assert received == sent
    # The relay ended once its observers had seen every byte (threads included).
    assert (stream.c2s_pos, stream.s2c_pos) == (len(REQUEST), len(sent))
    fresh = stream.settle(0)  # the exchange's start: the hash covers the whole response
    assert fresh.s2c_hash is not None
    assert fresh.s2c_hash.digest() == hashlib.sha256(sent).digest()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("live_relay", "zero-copy"),
        ("range_bodies", "none"),
        ("stream_hash", "md5"),
        ("codec", "smtp"),
        ("migration", "x"),
    ],
)
def test_a_server_shim_built_with_an_unknown_choice_names_it_before_setting_anything_up(
    tmp_path: Path, field: str, value: str
) -> None:
    """The command line offers only its choices; a program building ``ServerOptions`` itself
    gets the bad value by name (the pusher would take any unknown relay for zero-copy)."""
    options = ServerOptions(
        tmp_path / "absent",
        parse_address_and_port("10.0.0.2:80", 80),
        parse_address_and_port("127.0.0.1:8000", 8000),
        **{field: value},
    )
    with pytest.raises(ConfigError, match=f"^{field} '{value}' is not one of: "):
        ServerShim(options, EventLog("server", stream=io.StringIO()))
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("relay", LIVE_RELAYS)
def test_with_window_range_bodies_a_splice_relay_never_reads_most_of_the_body(relay: str) -> None:
    """``--range-bodies window``: the splice relays drop the body's bytes that no checkpoint
    needs in the kernel; the client still gets every byte, and the stream state ends with the
    positions and the window of the bytes sent (copy reads all, as before)."""
    pusher = pusher_for(relay)
    stream = StreamState("http", range_bodies="window")
    body = random.Random(8).randbytes(BODY_BYTES)
    sent = response(body)
    received = relay_one_exchange(stream, pusher, sent)
    assert received == sent
    assert (stream.c2s_pos, stream.s2c_pos) == (len(REQUEST), len(sent))
    if relay == "copy":
        assert stream.skipped_s2c == 0
    else:
        # Each tee'd chunk's last 64 KiB is read, the rest dropped: most of 6 MiB.
        assert stream.skipped_s2c >= BODY_BYTES // 2, stream.skipped_s2c
    checkpoint = checkpoint_of(stream, epoch=1, counter=1)
    assert checkpoint.s2c_hash == NO_HASH
    assert checkpoint.range is not None
    assert not checkpoint.range.full_hash
    assert checkpoint.range.window_start == len(sent) - WINDOW_BYTES
    assert checkpoint.range.window_hash == hashlib.sha256(body[-WINDOW_BYTES:]).digest()


def test_a_reincarnated_connection_is_relayed_without_nagle_on_either_side() -> None:
    """As the relay's accepted connections are: with Nagle on, the restored socket held each
    response's last short segment until the client's delayed ACK (1 MiB responses one after
    the other on a moved connection ran at 0.14x the goodput of no roam)."""
    log = io.StringIO()
    context = SimpleNamespace(
        max_replay=1 << 20,
        group_key=bytes(32),
        live_relay="copy",
        range_bodies="hash",
        clock=lambda: 5.0,
        log=EventLog("server", stream=log),
    )
    pusher = CheckpointPusher(context)  # type: ignore[arg-type]
    pusher.carrier_sealer = lambda record: None  # type: ignore[method-assign,assignment,return-value]

    async def scenario() -> tuple[int, int]:
        pairs = []
        for _ in range(2):  # the client's restored socket and the replay's service connection
            listener = socket.create_server(("127.0.0.1", 0))
            near = socket.create_connection(listener.getsockname())
            far, _ = listener.accept()
            listener.close()
            pairs.append((near, far))
        (client, client_peer), (service, service_peer) = pairs
        try:
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            checkpoint = SimpleNamespace(
                tcp=None, counter=3, conn_id=bytes(16), range=None, s2c_fresh=0
            )
            stream = StreamState("http")
            connection = pusher.reincarnated(
                ("10.0.0.2", 40000), checkpoint, SimpleNamespace(client_id=1),  # type: ignore[arg-type]
                (client, service, b""), stream, 0, None, None,  # type: ignore[arg-type]
            )  # fmt: skip
            options = tuple(
                end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for end in (client, service)
            )
            connection.relay.abort()
            return options  # type: ignore[return-value]
        finally:
            for sock in (client, client_peer, service, service_peer):
                sock.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        nodelay = runner.run(asyncio.wait_for(scenario(), 10))
    assert all(nodelay), nodelay
    assert "reincarnated client=10.0.0.2:40000" in log.getvalue()


class FakeConnection:
    """What ``CheckpointPusher.round`` asks of a live connection; counts its pushes."""

    def __init__(self, moved: int) -> None:
        self.moved, self.pushes = moved, 0

    def due(self, now: float) -> bool:
        return False

    def moved_far(self) -> bool:
        return self.moved >= 1 << 20

    def push(self, now: float) -> None:
        self.pushes += 1


def test_a_last_round_at_the_boundary_pushes_only_the_connections_that_moved_far() -> None:
    """A fast download's checkpoint is pushed again at the boundary itself (the round loop
    wakes for it), once per boundary; a thousand small exchanges push nothing more."""
    leaving = 100.0
    context = SimpleNamespace(
        max_replay=1 << 20,
        group_key=bytes(32),
        live_relay="copy",
        client_leaving_at=None,
        leaving_at=lambda: leaving,
    )
    pusher = CheckpointPusher(context)  # type: ignore[arg-type]
    pusher._leave_pushed = leaving  # the leave round went out already (not under test)
    fast, slow = FakeConnection(5 << 20), FakeConnection(2000)
    pusher.connections = {("10.0.0.2", 1): fast, ("10.0.0.2", 2): slow}  # type: ignore[dict-item]
    now = leaving - 0.015
    pusher._logs_checked = now
    assert pusher.next_round_in(now) == pytest.approx(0.015)  # wakes at the boundary
    pusher.round(now)
    assert (fast.pushes, slow.pushes) == (0, 0)
    pusher.round(leaving - 0.0005)  # the loop's sleep ends a hair early: counts
    assert (fast.pushes, slow.pushes) == (1, 0)
    pusher.round(leaving + 0.02)
    assert (fast.pushes, slow.pushes) == (1, 0)  # once per boundary
    assert pusher.next_round_in(leaving + 0.02) == pytest.approx(0.02)  # a period again

    def broken() -> float:
        raise RuntimeError("a schedule that cannot say")

    context.leaving_at = broken
    assert pusher.next_round_in(leaving) == pytest.approx(0.02)  # the loop goes on
