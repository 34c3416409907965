"""The relay (``python -m proxy.relay``) in a lab: c1 -> relay on s1 -> service on s1's loopback.

One lab for the module (``PoolTopo(servers=1, clients=1)``). The service and the client are
one small program (``PEER``, below) written into the lab's work directory: the service runs on
s1 at 127.0.0.1:9000 and obeys a one-line command per connection; the client runs on c1 and
prints its findings as JSON. Each test starts its own relay process on its own port. The return
path for transparent connections (replies from 127.0.0.1:9000 routed locally) is set up once
in s1; it changes nothing for plain connections.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from labs import Lab, PoolTopo
from labs.services import Service, wait_until_listening

pytestmark = pytest.mark.system

SERVICE_PORT = 9000
RETURN_TABLE = "100"
BULK_BYTES = 64 << 20
CLIENT_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 10.0

PEER = r'''
"""Test peer: ``service PORT`` or ``client HOST PORT OP ARGS...`` (prints JSON)."""
import hashlib, json, random, socket, socketserver, struct, sys, threading, time

CHUNK = 1 << 16


def payload(size, seed):
    return random.Random(seed).randbytes(size)


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        rfile = conn.makefile("rb")
        command = rfile.readline().split()
        if not command:
            return
        verb, args = command[0].decode(), [int(a) for a in command[1:]]

        def drain(hasher=None):
            total = 0
            while True:
                chunk = rfile.read1(CHUNK)
                if not chunk:
                    return total
                total += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)

        if verb == "ECHO":
            while True:
                chunk = rfile.read1(CHUNK)
                if not chunk:
                    break
                conn.sendall(chunk)
        elif verb == "HALF":
            hasher = hashlib.sha256()
            size = drain(hasher)
            head = json.dumps({"bytes": size, "sha256": hasher.hexdigest()}).encode() + b"\n"
            conn.sendall(head + payload(args[0], args[1]))
        elif verb == "PEER":
            host, port = conn.getpeername()[:2]
            conn.sendall(f"{host} {port}\n".encode())
        elif verb == "RESET":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif verb == "WATCH":
            try:
                drain()
                seen = "eof"
            except ConnectionResetError:
                seen = "reset"
            print(f"watch {args[0]}: {seen}", flush=True)
        conn.close()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def client(host, port, op, args):
    address = (host, int(port))
    if op == "echo":
        size, seed = int(args[0]), int(args[1])
        data = payload(size, seed)
        sock = socket.create_connection(address, timeout=60)

        def send():
            sock.sendall(b"ECHO\n" + data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = receive(sock)
        sender.join(60)
        return {
            "sent_sha256": hashlib.sha256(data).hexdigest(),
            "received_sha256": hashlib.sha256(received).hexdigest(),
            "received_bytes": len(received),
        }
    if op == "half":
        request = payload(int(args[0]), 7)
        size, seed = int(args[1]), int(args[2])
        sock = socket.create_connection(address, timeout=60)
        sock.sendall(f"HALF {size} {seed}\n".encode() + request)
        sock.shutdown(socket.SHUT_WR)
        received = receive(sock)
        head, _, body = received.partition(b"\n")
        return {
            "service_saw": json.loads(head),
            "request_sha256": hashlib.sha256(request).hexdigest(),
            "response_ok": body == payload(size, seed),
            "response_bytes": len(body),
        }
    if op == "peer":
        sock = socket.create_connection(address, timeout=10)
        local = sock.getsockname()
        sock.sendall(b"PEER\n")
        host_seen, port_seen = receive(sock).decode().split()
        return {"local": [local[0], local[1]], "seen": [host_seen, int(port_seen)]}
    if op == "refused":
        started = time.monotonic()
        try:
            # the reset may come before connect() has returned in this process
            sock = socket.create_connection(address, timeout=10)
            ended_by = "eof" if receive(sock) == b"" else "data"
        except ConnectionResetError:
            ended_by = "reset"
        return {"ended_by": ended_by, "after_s": time.monotonic() - started}
    if op == "reset-in":
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(b"RESET\n")
        try:
            receive(sock)
            return {"ended_by": "eof"}
        except ConnectionResetError:
            return {"ended_by": "reset"}
    if op == "reset-out":
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(f"WATCH {args[0]}\n".encode() + b"z" * 1000)
        time.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        return {}
    if op == "many":
        count, size = int(args[0]), int(args[1])
        results = [None] * count
        start = threading.Barrier(count, timeout=30)

        def one(index):
            data = payload(size, index)
            try:
                sock = socket.create_connection(address, timeout=30)
                start.wait()  # all connections open at once
                sock.sendall(b"ECHO\n" + data)
                sock.shutdown(socket.SHUT_WR)
                results[index] = receive(sock) == data
                sock.close()
            except Exception as error:
                results[index] = repr(error)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        failures = [r for r in results if r is not True]
        return {"ok": sum(r is True for r in results), "failures": failures[:5]}
    raise SystemExit(f"unknown op {op}")


def receive(sock):
    parts = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


if __name__ == "__main__":
    if sys.argv[1] == "service":
        with Server(("127.0.0.1", int(sys.argv[2])), Handler) as server:
            server.serve_forever()
    else:
        print(json.dumps(client(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])))
'''


@dataclass
class Setup:
    lab: Lab
    peer: Path
    service: Service

    @property
    def server_ip(self) -> IPv4Address:
        return self.lab["s1"].address

    @property
    def client_ip(self) -> IPv4Address:
        return self.lab["c1"].address


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root (network namespaces); run as root")
    with Lab(PoolTopo(servers=1, clients=1, outsiders=0)) as lab:
        server = lab["s1"]
        peer = lab.workdir / "peer.py"
        peer.write_text(PEER)
        # Replies of the service to a client address are delivered locally (IP_TRANSPARENT).
        server.run(
            ["ip", "rule", "add", "from", "127.0.0.1", "ipproto", "tcp", "sport",
             str(SERVICE_PORT), "lookup", RETURN_TABLE],
            check=True, timeout=10,
        )  # fmt: skip
        server.run(
            ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", RETURN_TABLE],
            check=True, timeout=10,
        )  # fmt: skip
        server.sysctl("net.ipv4.conf.all.route_localnet", 1)
        server.sysctl("net.ipv4.conf.lo.route_localnet", 1)
        log_path = lab.workdir / "service.log"
        with open(log_path, "ab") as log:
            process = server.popen(
                [sys.executable, "-u", str(peer), "service", str(SERVICE_PORT)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        service = Service(
            "peer", server, IPv4Address("127.0.0.1"), SERVICE_PORT, process, lab.workdir, log_path
        )
        wait_until_listening(service)
        yield Setup(lab, peer, service)


class RelayProcess:
    """``python -m proxy.relay`` on s1, with its status file."""

    _next_port = 7000

    def __init__(self, setup: Setup, *extra: str, service_port: int = SERVICE_PORT) -> None:
        RelayProcess._next_port += 1
        self.port = RelayProcess._next_port
        workdir = setup.lab.workdir
        self.status_path = workdir / f"relay-{self.port}.status"
        self.log_path = workdir / f"relay-{self.port}.log"
        argv = [
            sys.executable, "-m", "proxy.relay",
            "--listen", f"{setup.server_ip}:{self.port}",
            "--service", f"127.0.0.1:{service_port}",
            "--status-file", str(self.status_path),
            *extra,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = setup.lab["s1"].popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.service = Service(
            "relay", setup.lab["s1"], setup.server_ip, self.port, self.process, workdir,
            self.log_path,
        )  # fmt: skip
        wait_until_listening(self.service)

    def status(self) -> dict[str, Any]:
        """Ask the relay for its counters (SIGUSR1) and read them back (bounded wait)."""
        self.status_path.unlink(missing_ok=True)
        os.kill(self.process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + STATUS_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.status_path.exists():
                status: dict[str, Any] = json.loads(self.status_path.read_text())
                return status
            time.sleep(0.02)
        raise AssertionError(f"the relay wrote no status; log: {self.service.log_tail()}")

    def wait_idle(self) -> dict[str, Any]:
        """The status once no relay is live (bounded)."""
        deadline = time.monotonic() + STATUS_TIMEOUT_S
        status = self.status()
        while status["live_relays"] and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.status()
        return status

    def stop(self) -> None:
        self.service.stop()
        assert self.process.returncode == 0, self.service.log_tail()


def run_client(setup: Setup, port: int, op: str, *args: object) -> dict[str, Any]:
    argv = [sys.executable, str(setup.peer), "client", str(setup.server_ip), str(port), op]
    completed = setup.lab["c1"].run([*argv, *map(str, args)], check=True, timeout=CLIENT_TIMEOUT_S)
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize(
    "modes",
    [
        ("--mode", "splice"),
        ("--mode", "copy"),
        ("--mode", "copy:sha256"),
        ("--client-to-service", "copy:noop", "--service-to-client", "splice"),
        ("--mode", "splice", "--loop", "asyncio"),
        ("--mode", "copy", "--loop", "asyncio"),
    ],
    ids=["splice", "copy", "copy-sha256", "mixed", "splice-asyncio", "copy-asyncio"],
)
def test_64_mib_each_way_arrives_intact(setup: Setup, modes: tuple[str, ...]) -> None:
    relay = RelayProcess(setup, *modes)
    result = run_client(setup, relay.port, "echo", BULK_BYTES, 11)
    assert result["received_bytes"] == BULK_BYTES
    assert result["received_sha256"] == result["sent_sha256"]
    status = relay.wait_idle()
    assert status["outcomes"] == {"completed": 1}
    assert status["bytes_client_to_service"] == BULK_BYTES + len(b"ECHO\n")
    assert status["bytes_service_to_client"] == BULK_BYTES
    relay.stop()


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_half_close_client_still_gets_the_whole_response(setup: Setup, mode: str) -> None:
    relay = RelayProcess(setup, "--mode", mode)
    result = run_client(setup, relay.port, "half", 100_000, 8 << 20, 5)
    assert result["service_saw"]["sha256"] == result["request_sha256"]
    assert result["response_bytes"] == 8 << 20
    assert result["response_ok"]
    assert relay.wait_idle()["outcomes"] == {"completed": 1}
    relay.stop()


def test_transparent_service_sees_the_client_address(setup: Setup) -> None:
    plain = RelayProcess(setup)
    seen_plain = run_client(setup, plain.port, "peer")["seen"]
    assert seen_plain[0] == "127.0.0.1"
    plain.stop()

    transparent = RelayProcess(setup, "--transparent")
    result = run_client(setup, transparent.port, "peer")
    assert result["seen"][0] == str(setup.client_ip)
    assert transparent.wait_idle()["outcomes"] == {"completed": 1}
    transparent.stop()


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_a_service_reset_reaches_the_client_as_a_reset(setup: Setup, mode: str) -> None:
    relay = RelayProcess(setup, "--mode", mode)
    assert run_client(setup, relay.port, "reset-in") == {"ended_by": "reset"}
    assert relay.wait_idle()["outcomes"] == {"reset": 1}
    relay.stop()


def test_a_client_reset_reaches_the_service_as_a_reset(setup: Setup) -> None:
    relay = RelayProcess(setup)
    run_client(setup, relay.port, "reset-out", relay.port)
    deadline = time.monotonic() + STATUS_TIMEOUT_S
    while f"watch {relay.port}:" not in setup.service.log_tail(50):
        assert time.monotonic() < deadline, "the service never saw the connection end"
        time.sleep(0.05)
    assert f"watch {relay.port}: reset" in setup.service.log_tail(50)
    assert relay.wait_idle()["outcomes"] == {"reset": 1}
    relay.stop()


@pytest.mark.parametrize("transparent", [False, True], ids=["plain", "transparent"])
def test_200_concurrent_connections_complete_and_nothing_leaks(
    setup: Setup, transparent: bool
) -> None:
    relay = RelayProcess(setup, *(["--transparent"] if transparent else []))
    before = relay.status()
    result = run_client(setup, relay.port, "many", 200, 10_000)
    assert result == {"ok": 200, "failures": []}
    after = relay.wait_idle()
    assert after["live_relays"] == 0
    assert after["accepted"] == 200
    assert after["outcomes"] == {"completed": 200}
    assert after["open_fds"] == before["open_fds"]
    relay.stop()


def test_a_client_is_reset_at_once_when_the_service_is_down(setup: Setup) -> None:
    relay = RelayProcess(setup, service_port=SERVICE_PORT + 1)  # nothing listens there
    result = run_client(setup, relay.port, "refused")
    assert result["ended_by"] == "reset"
    assert result["after_s"] < 5  # not the connect timeout
    status = relay.wait_idle()
    assert status["connect_failures"] == 1
    assert status["accepted"] == 1
    relay.stop()
