"""The positions a client's hand-over request carries: read again while they can still move
(a PREPARE), final in the freeze (a COMMIT)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from client_shim import connections as connections_module
from client_shim.connections import ClientConnections
from migrate.checkpoint import Carrier, TcpSnapshot, seal_checkpoint
from migrate.connstore import ConnectionStore
from migrate.kernel.eventlog import EventLog
from migrate.kernel.sockdiag import TcpSocketInfo
from migrate.reincarnation import Phase
from migrate.streamstate import StreamState

VIP = ("10.0.0.100", 80)
PORT = 40000
REQUEST = b"GET /big HTTP/1.1\r\nHost: vip\r\n\r\n"


def info(received: int) -> TcpSocketInfo:
    return TcpSocketInfo(
        ("10.0.0.2", PORT),
        VIP,
        "ESTABLISHED",
        1,
        0,
        1,
        2,
        0,
        0,
        has_info=True,
        bytes_acked=1 + len(REQUEST),
        bytes_received=received,
    )


def view_with_checkpoint_at(s2c_pos: int) -> tuple[ClientConnections, list[int]]:
    """A connection whose newest checkpoint counts ``s2c_pos`` server bytes, and the count of
    times the capture was drained."""
    store = ConnectionStore()
    store.on_syn(PORT, 0, now=0.0)
    store.on_segment(PORT, 1, REQUEST, False, now=0.0)
    state = StreamState("http")
    state.feed_c2s(REQUEST)
    checkpoint = state.checkpoint(
        conn_id=bytes(16),
        client=("10.0.0.2", PORT),
        vport=80,
        epoch=5,
        counter=1,
        now=100.0,
        tcp=TcpSnapshot(1, 2, 1460, 7, 7, True, True, 0),
        s2c_acked=0,
    )
    sealed = seal_checkpoint(checkpoint, bytes(32), bytes(16), os.urandom)
    carrier = Carrier(bytes(16), PORT, 1, 0, len(REQUEST), s2c_pos, sealed)
    assert store.on_carrier(carrier, now=0.0)
    drains: list[int] = []
    capture = SimpleNamespace(
        store=store,
        client_address="10.0.0.2",
        vip=VIP,
        drain=lambda: drains.append(1),
    )
    return ClientConnections(capture, 80, EventLog("client")), drains  # type: ignore[arg-type]


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The socket read again: each lookup finds 1000 more bytes received."""
    calls: list[int] = []

    def lookup(ends: object, vip: object) -> TcpSocketInfo:
        calls.append(1)
        return info(1_000_000 + 1000 * len(calls))

    monkeypatch.setattr(connections_module.sockdiag, "lookup", lookup)
    return calls


def test_a_prepare_reads_a_socket_behind_its_checkpoint_again(lookups: list[int]) -> None:
    view, drains = view_with_checkpoint_at(1_002_000)
    request = view.request(Phase.PREPARE, 7, info(1_000_000), None)
    assert request is not None
    assert (request.s2c_received, len(lookups), len(drains)) == (1_002_000, 2, 2)


def test_a_commit_takes_the_positions_read_in_the_freeze(lookups: list[int]) -> None:
    """In the freeze nothing more comes from the old server: the checkpoint (its bytes in
    flight counted) stays ahead whatever is read, and reading again lengthened the pause."""
    view, drains = view_with_checkpoint_at(1_002_000)
    request = view.request(Phase.COMMIT, 7, info(1_000_000), 0)
    assert request is not None
    assert (request.s2c_received, request.replay) == (1_000_000, REQUEST)
    assert (lookups, drains) == ([], [])


def test_bytes_no_checkpoint_covers_make_a_frozen_connection_unverifiable() -> None:
    """The freeze's positions against the newest checkpoint: one covering none of the
    service's bytes is unverifiable once the client has some (``Migrator._commit`` then holds
    the connection for the next roam instead of committing it to a refusal)."""
    empty, _ = view_with_checkpoint_at(0)
    assert empty.unverifiable(PORT, info(183_896))
    assert not empty.unverifiable(PORT, info(0))  # nothing received: nothing to check
    covering, _ = view_with_checkpoint_at(1_000)
    assert not covering.unverifiable(PORT, info(183_896))
    assert not empty.unverifiable(PORT + 1, info(10))  # not tracked: the request decides
