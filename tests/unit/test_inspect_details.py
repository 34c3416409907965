"""Small things an operator reads: ``roam inspect`` before the start, of a client's saved state,
of a subscription without a ceiling; the deployment files' modes as the guide states them."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from client_shim.state import ClientState
from migrate.kernel.files import write_private
from migrate.registration import Bundle
from roam_cli.main import main

SERVERS = "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operators-guide.md"


def inspect(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, object]:
    assert main(["inspect", str(path), "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


@pytest.fixture
def directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "dep"
    start = str(round(time.time() + 3600))  # starts in an hour
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1", "--no-index"]
    assert main([*init, "--chain-length", "5000", "--m", "3", "--tick", "1", "--start", start]) == 0
    subscribe = ["subscribe", str(directory), "alice", "--address", "10.0.0.60"]
    bundle = str(tmp_path / "alice.bundle")
    assert main([*subscribe, "--until-epoch", "100", "--lease-epochs", "10", "--out", bundle]) == 0
    capsys.readouterr()
    return directory


def test_inspect_before_the_start_says_when_it_starts(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = inspect(capsys, directory)["now"]
    assert isinstance(now, str)
    assert now.startswith("not started: epoch 1 starts in 3")  # about 3600 s
    bundle = inspect(capsys, directory.parent / "alice.bundle")["now"]
    assert isinstance(bundle, str)
    assert bundle.startswith("not started: epoch 1 starts in")


def test_inspect_shows_the_chain_end_as_the_ceiling_of_a_lease_without_one(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clients = inspect(capsys, directory)["clients"]
    assert isinstance(clients, list)
    assert clients[0]["expires_epoch"] == 5000


def test_inspect_reads_a_clients_saved_state(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle_path = directory.parent / "alice.bundle"
    state = ClientState.from_bundle(Bundle.decode(bundle_path.read_bytes()))
    state.counters = {0: 5, 1: 7}
    state_path = bundle_path.with_name("alice.bundle.state")
    write_private(state_path, state.encode())
    info = inspect(capsys, state_path)
    assert info["kind"] == "client state"
    assert info["key_index"] == 100
    assert info["update_senders_seen"] == 2
    assert state.chain_key.hex() not in json.dumps(info)  # a fingerprint only


def test_deployment_file_modes_are_those_the_guide_states(directory: Path) -> None:
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert modes["deployment.json"] == 0o644
    assert modes["secret.json"] == modes["clients.sealed"] == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    guide = " ".join(GUIDE.read_text().split())
    assert "`deployment.json`, public and 0644" in guide
    assert "0600, `secret.json`" in guide
