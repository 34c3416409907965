"""TransparentReturnPath and HostRoute in a namespace pair of our own.

Topology (names ``roamk<pid><n>s`` / ``roamk<pid><n>c``, removed by the fixture whatever
happens)::

    client ns (10.242.0.2/24) --veth-- server ns (10.242.0.1/24, echo service on 127.0.0.1)

The proxy side of the server shim is played by a socket with IP_TRANSPARENT created in the server
namespace, bound to the client's address: the service must see that address.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migrate.kernel.instances import Instance, call_in_netns, read_sysctl
from migrate.kernel.routing import ROUTE_LOCALNET_KEYS, HostRoute, TransparentReturnPath
from migrate.kernel.sockopts import IP_TRANSPARENT

pytestmark = pytest.mark.system

SERVER_IP = "10.242.0.1"
CLIENT_IP = "10.242.0.2"
SERVICE_PORT = 8080
_counter = itertools.count()


def ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


@dataclass
class Pair:
    server: str
    client: str


@pytest.fixture
def pair() -> Iterator[Pair]:
    base = f"roamk{os.getpid()}{next(_counter)}"
    names = Pair(f"{base}s", f"{base}c")
    try:
        for name in (names.server, names.client):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", names.server, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", names.client)  # fmt: skip
        for name, address in ((names.server, SERVER_IP), (names.client, CLIENT_IP)):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
        yield names
    finally:
        for name in (names.server, names.client):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SERVER_ROAMING_RUN_DIR", str(tmp_path))
    return tmp_path / "instances"


class EchoService:
    """Answers each connection with the peer address it sees, then echoes one message."""

    def __init__(self, netns: str) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", SERVICE_PORT))
            sock.listen(8)
            return sock

        self.listener = call_in_netns(netns, make)
        self.listener.settimeout(10)
        self.peers: list[tuple[str, int]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            with conn:
                self.peers.append(peer)
                conn.sendall(f"{peer[0]}:{peer[1]}\n".encode())
                conn.sendall(conn.recv(100))

    def close(self) -> None:
        self.listener.close()


def transparent_connect(netns: str, timeout_s: float) -> socket.socket:
    """Connect to the service from the client's address, as the server shim's inner leg does."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((CLIENT_IP, 0))
        return sock

    sock = call_in_netns(netns, make)
    sock.settimeout(timeout_s)
    try:
        sock.connect(("127.0.0.1", SERVICE_PORT))
    except OSError:
        sock.close()
        raise
    return sock


def rules(netns: str) -> str:
    return ip("-n", netns, "rule", "show")


def test_service_sees_the_client_address_only_with_the_return_path(
    pair: Pair, run_dir: Path
) -> None:
    service = EchoService(pair.server)
    try:
        # without the return path the SYN-ACK leaves toward the client namespace: no connection
        with pytest.raises(OSError):  # noqa: PT011 (refused or timed out, depending on timing)
            transparent_connect(pair.server, timeout_s=1.0).close()
        before_rules = rules(pair.server)
        assert [read_sysctl(k, netns=pair.server) for k in ROUTE_LOCALNET_KEYS] == ["0", "0"]

        instance = Instance.start("test", netns=pair.server)
        path = TransparentReturnPath("127.0.0.1", SERVICE_PORT)
        path.setup(instance)
        assert path.rule is not None
        assert path.route is not None
        assert f"ipproto tcp sport {SERVICE_PORT} lookup {path.table}" in rules(pair.server)
        assert "local default dev lo" in ip(
            "-n", pair.server, "route", "show", "table", str(path.table)
        )
        assert [read_sysctl(k, netns=pair.server) for k in ROUTE_LOCALNET_KEYS] == ["1", "1"]

        with transparent_connect(pair.server, timeout_s=5.0) as sock:
            local = sock.getsockname()
            reader = sock.makefile("rb")
            seen = reader.readline().decode().strip()
            sock.sendall(b"hello")
            assert reader.read(5) == b"hello"
            reader.close()
        assert seen == f"{CLIENT_IP}:{local[1]}"

        path.teardown()
        path.teardown()  # idempotent
        assert rules(pair.server) == before_rules
        assert ip("-n", pair.server, "route", "show", "table", str(path.table)) == ""
        assert [read_sysctl(k, netns=pair.server) for k in ROUTE_LOCALNET_KEYS] == ["0", "0"]
        instance.close()
        assert list(run_dir.glob("*.json")) == []
    finally:
        service.close()


def test_instance_close_removes_the_return_path(pair: Pair, run_dir: Path) -> None:
    before = rules(pair.server)
    with Instance.start("test", netns=pair.server) as instance:
        first = TransparentReturnPath("127.0.0.1", SERVICE_PORT)
        second = TransparentReturnPath("127.0.0.1", SERVICE_PORT + 1)
        first.setup(instance)
        second.setup(instance)
        # chosen ids never collide
        assert first.table != second.table
        assert first.priority != second.priority
    assert rules(pair.server) == before
    assert [read_sysctl(k, netns=pair.server) for k in ROUTE_LOCALNET_KEYS] == ["0", "0"]
    assert list(run_dir.glob("*.json")) == []


def test_vip_route_copies_the_route_toward_a_server(pair: Pair, run_dir: Path) -> None:
    ip("-n", pair.client, "route", "add", "default", "via", SERVER_IP)
    with Instance.start("test", netns=pair.client) as instance:
        routes = HostRoute(instance)
        direct = routes.add_vip_route("10.99.0.1", toward=SERVER_IP)
        assert (direct.dev, direct.gateway, direct.prefsrc) == ("eth0", None, CLIENT_IP)
        routed = routes.add_vip_route("10.99.0.2", toward="10.50.0.1")
        assert (routed.dev, routed.gateway) == ("eth0", SERVER_IP)
        table = ip("-n", pair.client, "route", "show")
        assert f"10.99.0.1 dev eth0 proto static scope link src {CLIENT_IP}" in table
        assert "10.99.0.2 via 10.242.0.1 dev eth0" in table
        routes.remove_vip_route("10.99.0.1")
        assert "10.99.0.1" not in ip("-n", pair.client, "route", "show")
    assert "10.99.0.2" not in ip("-n", pair.client, "route", "show")
    assert list(run_dir.glob("*.json")) == []
