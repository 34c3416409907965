"""``inspect``, ``schedule`` and ``subscribe`` follow the schedule as it runs after threat
changes and triggers (recorded in DIR/state and BUNDLE.state), not as it was created."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from client_shim.state import ClientState
from migrate.control import Threat
from migrate.kernel.deployment import DeploymentDir
from migrate.kernel.files import write_private
from migrate.pool import ServerPool
from migrate.registration import Bundle
from migrate.schedule import EpochSchedule
from roam_cli.commands.control import _operator_pool, _save_operator_state
from roam_cli.main import main

SERVERS = "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "dep"
    start = str(round(time.time() - 60))
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1"]
    assert main([*init, "--chain-length", "5000", "--m", "4", "--tick", "1", "--start", start]) == 0
    capsys.readouterr()
    return directory


def change_schedule(directory: Path) -> ServerPool:
    """What ``roam threat`` then ``roam trigger`` record once the servers applied them."""
    dep = DeploymentDir(directory)
    pool = _operator_pool(dep)
    now = time.time()
    current = pool.schedule.epoch_at(now).index
    pool.apply(Threat(1, current + 1), now)
    _save_operator_state(dep, pool)
    pool.apply(pool.make_trigger(now), now)
    _save_operator_state(dep, pool)
    return pool


def rows(out: str) -> list[tuple[int, float, float, str]]:
    records = [json.loads(line) for line in out.splitlines()]
    return [(r["epoch"], r["start"], r["length"], r["server"]) for r in records]


def expected(
    schedule: EpochSchedule, first: int, count: int
) -> list[tuple[int, float, float, str]]:
    return [(e.index, e.start, e.length, str(e.server)) for e in schedule.epochs(first, count)]


def test_schedule_and_inspect_of_a_deployment_follow_recorded_changes(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = run(capsys, "schedule", "--deployment", str(deployment), "--at", "now", "--json")
    server = change_schedule(deployment)
    now = time.time()
    running = server.schedule.epoch_at(now).index
    status, out, _err = run(
        capsys, "schedule", "--deployment", str(deployment), "--from", str(running), "--json"
    )
    assert status == 0
    assert rows(out) == expected(server.schedule, running, 10)
    assert rows(out) != rows(before[1])
    assert {length for _, _, length, _ in rows(out)[1:]} <= {1.0, 2.0}  # m = 1: 1-2 ticks
    status, out, _err = run(capsys, "inspect", str(deployment), "--json")
    info = json.loads(out)
    assert info["now"]["epoch"] == server.schedule.epoch_at(time.time()).index
    assert info["recorded"]["anchor"]["epoch"] == server.state.anchor.epoch


def test_a_bundle_made_after_a_threat_change_carries_the_new_m(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = change_schedule(deployment)
    out = tmp_path / "alice.bundle"
    subscribe = ["subscribe", str(deployment), "alice", "--address", "10.0.0.60"]
    assert run(capsys, *subscribe, "--until-epoch", "4000", "--out", str(out))[0] == 0
    bundle = Bundle.decode(out.read_bytes())
    assert bundle.m == server.schedule.params.m
    assert bundle.m.changes


def test_schedule_of_a_bundle_uses_its_saved_key_extensions_and_says_why_rows_stop(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "alice.bundle"
    subscribe = ["subscribe", str(deployment), "alice", "--address", "10.0.0.60"]
    assert run(capsys, *subscribe, "--until-epoch", "20", "--out", str(out))[0] == 0
    schedule = ["schedule", "--bundle", str(out), "--from", "15", "--count", "10", "--json"]
    status, printed, err = run(capsys, *schedule)
    assert status == 0
    assert [row[0] for row in rows(printed)] == [15, 16, 17, 18, 19, 20]
    assert err.startswith("roam: note: 6 of 10 epochs printed: epoch 20 is the last one held")
    assert err.count("\n") == 1
    # The client shim extended its keys online to epoch 40 and saved them beside the bundle.
    bundle = Bundle.decode(out.read_bytes())
    secret = DeploymentDir(deployment).secret()
    state = ClientState.from_bundle(bundle)
    state.key_index, state.chain_key = 40, secret.chain(5000).key(40)
    write_private(out.with_name(out.name + ".state"), state.encode())
    status, printed, err = run(capsys, *schedule)
    assert status == 0
    assert [row[0] for row in rows(printed)] == list(range(15, 25))
    assert err == ""
    status, printed, _err = run(capsys, "inspect", str(out), "--json")
    assert json.loads(printed)["state"]["key_index"] == 40


def test_schedule_state_goes_with_a_bundle_only(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _out, err = run(
        capsys, "schedule", "--deployment", str(deployment), "--state", str(tmp_path / "x")
    )
    assert status == 1
    assert err.startswith("roam: error: --state goes with --bundle")
