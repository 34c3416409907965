"""The server shim's group-control handler, fed sealed datagrams in memory (no sockets, no
kernel: the gate re-evaluation is replaced by a counter)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migrate.channel import HEADER, Kind
from migrate.control import OPERATOR, Ack, ControlChannel, Facts, Revoke
from migrate.endpoints import parse_address_and_port
from migrate.kernel.deployment import DeploymentDir
from migrate.kernel.eventlog import EventLog
from proxy.daemon import ServerOptions, ServerShim
from roam_cli.main import main

SERVERS = "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"
OPERATOR_HOST = ("10.0.0.50", 40000)


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append((data, address))


def make_deployment(tmp_path: Path) -> Path:
    directory = tmp_path / "dep"
    start = str(round(time.time() - 5))
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1"]
    assert (
        main([*init, "--chain-length", "100000", "--m", "3", "--tick", "1", "--start", start]) == 0
    )
    for name, address in (("alice", "10.0.0.60"), ("bob", "10.0.0.61")):
        bundle = str(tmp_path / name)
        subscribe = ["subscribe", str(directory), name, "--address", address]
        assert main([*subscribe, "--until-epoch", "50000", "--out", bundle]) == 0
    return directory


def make_shim(directory: Path, clock: Callable[[], float] = time.time) -> Any:
    options = ServerOptions(
        directory,
        parse_address_and_port("10.0.0.1:80", 80),
        parse_address_and_port("127.0.0.1:8000", 8000),
    )
    log = io.StringIO()
    server = ServerShim(options, EventLog("server", stream=log), clock=clock)
    server._control_transport = Transport()  # type: ignore[assignment]
    server._tick = lambda: None  # type: ignore[method-assign]
    server.log_text = log  # type: ignore[attr-defined]
    return server


@pytest.fixture
def shim(tmp_path: Path) -> Any:
    return make_shim(make_deployment(tmp_path))


def channel(shim: Any, sender: int) -> ControlChannel:
    secret = DeploymentDir(shim.options.deployment_dir).secret()
    return ControlChannel(secret.group_key, secret.deployment_id, sender)


def test_a_replayed_revoke_is_answered_only_where_the_first_answer_went(shim: Any) -> None:
    operator = channel(shim, OPERATOR)
    data = operator.seal(Revoke(2), time.time())
    shim.on_control(data, OPERATOR_HOST)
    assert [address for _, address in shim._control_transport.sent] == [OPERATOR_HOST]
    _opened, ack = operator.open(shim._control_transport.sent[0][0], time.time())
    assert ack == Ack(operator.sealer.last_counter, True)
    # Replayed from (or spoofing) a victim's address: no answer reflected at it.
    shim.on_control(data, ("10.0.0.99", 53))
    assert len(shim._control_transport.sent) == 1
    # The operator's own retransmission (its answer was lost) is answered again.
    shim.on_control(data, OPERATOR_HOST)
    assert len(shim._control_transport.sent) == 2
    assert shim._control_transport.sent[1][1] == OPERATOR_HOST
    assert shim.pool.revoked_ids() == {2}


def test_control_state_is_merged_only_from_a_server_at_its_registered_address(
    shim: Any,
) -> None:
    peer = channel(shim, 1)
    facts = Facts(frozenset({2}), ())
    shim.on_control(peer.seal(facts, time.time()), ("10.0.0.77", 47475))
    assert shim.pool.revoked_ids() == frozenset()
    shim.on_control(channel(shim, OPERATOR).seal(facts, time.time()), OPERATOR_HOST)
    assert shim.pool.revoked_ids() == frozenset()
    shim.on_control(peer.seal(facts, time.time()), ("10.0.0.2", 47475))
    assert shim.pool.revoked_ids() == {2}
    assert shim._control_transport.sent == []  # control state is never answered
    # Persisted (from the writer's thread): a restart keeps it.
    shim.files.flush(timeout=10)
    state = json.loads(shim.state_path.read_text())
    assert state["revoked"] == [2]
    log = shim.log_text.getvalue()
    assert "not at its registered address" in log
    assert "control state comes from servers only" in log


def counters(messages: list[bytes]) -> list[int]:
    return [HEADER.unpack_from(message)[4] for message in messages]


def test_a_restarted_server_never_repeats_a_nonce_after_its_clock_went_back(
    tmp_path: Path,
) -> None:
    directory = make_deployment(tmp_path)
    now = time.time()
    used: dict[str, list[int]] = {"control": [], "update": []}
    for run, clock_at in enumerate((now, now - 3600.0, now - 7200.0, now + 60.0)):
        # Each run: a new process, its clock stepped back an hour (then forward again).
        server = make_shim(directory, clock=lambda t=clock_at: t)
        control = [server.control.seal(Revoke(2), clock_at) for _ in range(3)]
        update = [server.sealers[1].seal(Kind.ROAMING_UPDATE, b"x", clock_at) for _ in range(3)]
        for name, sealed in (("control", control), ("update", update)):
            fresh = counters(sealed)
            assert not set(fresh) & set(used[name]), f"run {run}: a {name} nonce was reused"
            assert min(fresh) > max(used[name], default=0), f"run {run}: {name} went back"
            used[name] += fresh
