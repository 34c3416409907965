"""The operator's record of the pool's schedule (``DIR/state/operator.json``) against real
server control handlers on loopback: a command cut short keeps it, and ``roam resync`` restores
it from the servers.

Each "server" is the server shim's own control handler (``ServerShim.on_control``, the pool
logic it applies and persists) behind a real UDP socket on 127.0.0.x; only its kernel side
(gate, relay) is absent, which these commands never touch.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from migrate.endpoints import parse_address_and_port
from migrate.kernel.deployment import DeploymentDir
from migrate.kernel.eventlog import EventLog
from migrate.pool import PoolState, ServerPool
from proxy.daemon import ServerOptions, ServerShim
from roam_cli.main import main

SERVERS = ("127.0.0.1:80", "127.0.0.2:80", "127.0.0.3:80")


def free_udp_port() -> int:
    """A port free on the three loopback addresses (bound on all, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


class SocketTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        self.sock.sendto(data, address)


@dataclass
class Server:
    shim: Any
    sock: socket.socket
    log: io.StringIO
    answering: threading.Event = field(default_factory=threading.Event)

    def serve(self, stop: threading.Event) -> None:
        self.sock.settimeout(0.05)
        while not stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            # Held while the server is told not to answer (checked after the datagram came,
            # so none slips through while the flag changes).
            while not self.answering.is_set():
                if stop.is_set():
                    return
                self.answering.wait(0.05)
            self.shim.on_control(data, source)


@dataclass
class Pool:
    directory: Path
    port: int
    servers: list[Server]

    def answer(self, on: bool = True) -> None:
        for server in self.servers:
            (server.answering.set if on else server.answering.clear)()

    def roam(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "roam_cli.main", *argv]


def make_server(directory: Path, listen: str, port: int, state: Path) -> Server:
    options = ServerOptions(
        directory,
        parse_address_and_port(listen, 80),
        parse_address_and_port("127.0.0.1:8000", 8000),
        control_port=port,
        state_path=state,  # not in DIR/state: the operator must not read the servers' files
    )
    log = io.StringIO()
    shim = ServerShim(options, EventLog("server", stream=log))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((listen.split(":", maxsplit=1)[0], port))
    shim._control_transport = SocketTransport(sock)
    shim._tick = lambda: None  # no gate here: only the schedule state matters
    shim._send_updates = lambda: None
    return Server(shim, sock, log)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    directory = tmp_path / "dep"
    start = str(round(time.time() - 30))
    init = ["init", str(directory), "--servers", ",".join(SERVERS), "--vip", "10.99.0.1"]
    assert (
        main([*init, "--chain-length", "100000", "--m", "3", "--tick", "1", "--start", start]) == 0
    )
    port = free_udp_port()
    servers = [
        make_server(directory, listen, port, tmp_path / f"server-{i}.json")
        for i, listen in enumerate(SERVERS)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=s.serve, args=(stop,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    pool = Pool(directory, port, servers)
    pool.answer()
    try:
        yield pool
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for server in servers:
            server.sock.close()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def operator_state(directory: Path) -> PoolState:
    return PoolState.decode((directory / "state" / "operator.json").read_bytes())


def trigger(pool: Pool) -> subprocess.CompletedProcess[str]:
    argv = ["trigger", "--deployment", str(pool.directory), "--control-port", str(pool.port)]
    return subprocess.run(
        pool.roam(*argv), check=False, capture_output=True, text=True, env=env(), timeout=60
    )


def test_a_trigger_whose_reader_left_is_recorded_and_the_next_trigger_applies(
    pool: Pool,
) -> None:
    # As `roam trigger ... | head -1`: the reader takes the first line and leaves before the
    # servers have answered (they wait for it here), so every later line meets a closed pipe.
    pool.answer(False)
    argv = ["trigger", "--deployment", str(pool.directory), "--control-port", str(pool.port)]
    process = subprocess.Popen(
        pool.roam(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env()
    )
    assert process.stdout is not None
    assert process.stderr is not None
    first = process.stdout.readline()
    assert first.startswith(b"leaving epoch")
    process.stdout.close()
    pool.answer()
    status = process.wait(timeout=60)
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert (status, stderr) == (0, "")
    assert all("control_applied" in server.log.getvalue() for server in pool.servers)
    # The operator's record has the servers' new anchor, so the next trigger agrees with them.
    recorded = operator_state(pool.directory).anchor
    assert recorded is not None
    for server in pool.servers:
        anchor = server.shim.pool.state.anchor
        assert anchor.epoch == recorded.epoch
        assert anchor.time == pytest.approx(recorded.time, abs=1e-6)  # sent in microseconds
    again = trigger(pool)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(": applied") == 3


def stale_pool(pool: Pool) -> ServerPool:
    """The view of an operator host with no record: the deployment's own schedule."""
    directory = DeploymentDir(pool.directory)
    deployment = directory.deployment()
    secret = directory.secret()
    return ServerPool(deployment, secret, directory.clients(secret), deployment.servers[0])


def test_resync_brings_back_a_lost_record_and_the_next_trigger_applies(pool: Pool) -> None:
    threat = ["threat", "--deployment", str(pool.directory), "--m", "2", "--lead", "1"]
    assert main([*threat, "--control-port", str(pool.port)]) == 0
    # Triggers until a host without the record is several epochs off the servers' schedule
    # (each one cuts an epoch short, so the drift only grows).
    server = pool.servers[0].shim.pool
    for _ in range(30):
        assert trigger(pool).returncode == 0
        now = time.time()
        drift = server.schedule.epoch_at(now).index - stale_pool(pool).schedule.epoch_at(now).index
        if abs(drift) >= 3:
            break
    else:
        pytest.fail("30 triggers left the schedule within 3 epochs of the unanchored one")
    # The record is lost (another host, a restored backup): the operator's view is behind.
    (pool.directory / "state" / "operator.json").unlink()
    refused = trigger(pool)
    assert refused.returncode == 1
    assert refused.stdout.count(": refused") == 3
    resync = subprocess.run(
        pool.roam("resync", str(pool.directory), "--control-port", str(pool.port)),
        check=False,
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert resync.returncode == 0, resync.stderr
    assert "recorded in" in resync.stdout
    server_state = pool.servers[0].shim.pool
    recorded = operator_state(pool.directory)
    assert recorded.anchor == server_state.state.anchor is not None
    assert recorded.m == server_state.schedule.params.m
    assert recorded.m is not None
    assert recorded.m.changes
    again = trigger(pool)
    assert again.returncode == 0, again.stderr + again.stdout


def test_resync_refuses_disagreeing_servers_and_records_nothing(
    pool: Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    # One server applies a threat change the others never saw.
    from migrate.control import Threat

    lagging = pool.servers[0].shim
    current = lagging.pool.schedule.epoch_at(time.time()).index
    assert lagging._apply_control(Threat(2, current + 50), "test")
    status = main(["resync", str(pool.directory), "--control-port", str(pool.port)])
    _out, err = capsys.readouterr()
    assert status == 1
    assert err.startswith("roam: error: the servers disagree")
    assert err.count("\n") == 1
    assert not (pool.directory / "state" / "operator.json").exists()


def test_resync_with_no_server_answering_is_one_line_and_records_nothing(
    pool: Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    pool.answer(False)
    status = main(["resync", str(pool.directory), "--control-port", str(pool.port)])
    out, err = capsys.readouterr()
    assert status == 1
    assert err.startswith("roam: error: no server answered")
    assert err.count("\n") == 1
    assert out.count(": no answer") == 3
    assert not (pool.directory / "state" / "operator.json").exists()


def test_resync_help_names_the_state_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["resync", "--help"])
    assert "operator.json" in capsys.readouterr().out


def test_a_server_answers_a_state_query_with_its_state_only_to_the_asker(pool: Pool) -> None:
    from migrate.control import OPERATOR, ControlChannel, StateQuery, StateReport

    secret = DeploymentDir(pool.directory).secret()
    operator = ControlChannel(secret.group_key, secret.deployment_id, OPERATOR)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as asker:
        asker.bind(("127.0.0.9", 0))
        asker.settimeout(10)
        asker.sendto(operator.seal(StateQuery(), time.time()), ("127.0.0.2", pool.port))
        reply, source = asker.recvfrom(65536)
    assert source == ("127.0.0.2", pool.port)
    _opened, report = operator.open(reply, time.time())
    assert isinstance(report, StateReport)
    assert report.counter == operator.sealer.last_counter
    assert report.m == pool.servers[1].shim.pool.schedule.params.m
    # Nothing changed at the server by answering.
    assert "control_applied" not in pool.servers[1].log.getvalue()
