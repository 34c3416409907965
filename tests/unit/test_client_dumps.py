"""The client's dumps of its VIP's sockets (``ClientConnections.live_sockets``): TIME_WAIT is
left in the kernel, and a connection the client closed is forgotten without a lookup of its own
(a client that closes first keeps thousands in TIME_WAIT; each was parsed at every dump)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from client_shim import connections as module
from client_shim.connections import DUMPED_STATES, ClientConnections
from migrate.connstore import ConnectionStore
from migrate.kernel import sockdiag
from migrate.kernel.eventlog import EventLog
from migrate.kernel.sockdiag import TcpSocketInfo

VIP = ("10.0.0.100", 80)
CLIENT = "10.0.0.2"


def info(port: int, state: str) -> TcpSocketInfo:
    return TcpSocketInfo((CLIENT, port), VIP, state, 1, 0, 1, 2, 0, 0)


def view_of(store: ConnectionStore) -> ClientConnections:
    capture = SimpleNamespace(store=store, client_address=CLIENT, vip=VIP)
    return ClientConnections(capture, 80, EventLog("client"))  # type: ignore[arg-type]


def test_the_dump_leaves_time_wait_in_the_kernel() -> None:
    assert not DUMPED_STATES & sockdiag.TCPF_TIME_WAIT
    # Every state a connection of the client's can be in while it still matters.
    for state, name in sockdiag.TCP_STATES.items():
        if name != "TIME_WAIT":
            assert DUMPED_STATES & (1 << state), name


def test_closed_and_ended_connections_are_forgotten_and_only_the_unexplained_looked_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = ConnectionStore()
    for port in (40000, 40001, 40002, 40003, 40004):
        store.on_syn(port, 0, now=0.0)
        store.on_segment(port, 1, b"GET / HTTP/1.1\r\n\r\n", False, now=0.0)
    # The client closed 40001 (its FIN copied): in TIME_WAIT now, so not in the dump.
    store.on_segment(40001, 19, b"", True, now=0.0)
    asked: list[dict[str, Any]] = []
    looked_up: list[int] = []

    def tcp_sockets(**filters: Any) -> list[TcpSocketInfo]:
        asked.append(filters)
        return [info(40000, "ESTABLISHED"), info(40004, "CLOSE_WAIT")]

    exact = {40002: info(40002, "TIME_WAIT"), 40003: info(40003, "ESTABLISHED")}

    def lookup(src: tuple[str, int], dst: tuple[str, int]) -> TcpSocketInfo | None:
        looked_up.append(src[1])
        return exact.get(src[1])

    monkeypatch.setattr(module.sockdiag, "tcp_sockets", tcp_sockets)
    monkeypatch.setattr(module.sockdiag, "lookup", lookup)
    view = view_of(store)
    found = view.live_sockets()
    assert asked == [{"dst": VIP, "states": DUMPED_STATES}]
    # 40001 closed by the client: over, no lookup. 40002 (a FIN not copied) and 40003 (missed
    # by the dump, as a dump can) asked for exactly; TIME_WAIT is over too.
    assert sorted(looked_up) == [40002, 40003]
    assert sorted(found) == [40000, 40003]
    assert view.closing == {40004}
    assert sorted(store.connections) == [40000, 40003, 40004]
