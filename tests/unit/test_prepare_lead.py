"""How early the client prepares a hand-over: long enough for an upload's replay bytes too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from client_shim.connections import ClientConnections
from migrate.connstore import ConnectionStore
from migrate.handover import (
    MAX_PREPARE_LEAD_S,
    PREPARE_SECONDS_PER_CONNECTION,
    REPLAY_BYTES_PER_S,
)
from migrate.kernel.eventlog import EventLog
from migrate.kernel.sockdiag import TcpSocketInfo

VIP = ("10.0.0.100", 80)


def connections(uploaded: dict[int, int]) -> ClientConnections:
    """A client whose connections (port: bytes sent, none answered) the kernel lists."""
    store = ConnectionStore()
    for port, size in uploaded.items():
        store.on_syn(port, 0, now=0.0)
        store.on_segment(port, 1, b"u" * size, False, now=0.0)
    capture = SimpleNamespace(store=store, client_address="10.0.0.2", vip=VIP)
    view = ClientConnections(capture, 80, EventLog("client"))  # type: ignore[arg-type]
    sockets = {
        port: TcpSocketInfo(("10.0.0.2", port), VIP, "ESTABLISHED", 1, 0, 1, 2, 0, 0)
        for port in uploaded
    }
    view.live_sockets = lambda: sockets  # type: ignore[method-assign]
    return view


def test_an_uploads_replay_bytes_lengthen_the_lead() -> None:
    base = 0.15
    idle = connections({40000: 0}).suggested_lead(base)
    assert idle == pytest.approx(base + PREPARE_SECONDS_PER_CONNECTION)
    size = 20_000_000
    upload = connections({40000: size}).suggested_lead(base)
    assert upload == pytest.approx(idle + size / REPLAY_BYTES_PER_S)
    # Never beyond the most a server admits ahead.
    assert connections({40000: 60_000_000, 40001: 60_000_000, 40002: 60_000_000}).suggested_lead(
        base
    ) == (MAX_PREPARE_LEAD_S)
