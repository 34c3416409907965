"""Reloading the client list in a running server shim (SIGHUP, ``roam reload``): the shim's own
handler on an in-memory shim (no kernel: the gate is not installed), and the command's choice of
what to signal."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from migrate.endpoints import parse_address_and_port
from migrate.kernel.eventlog import EventLog
from proxy.daemon import ServerOptions, ServerShim
from roam_cli.main import main

SERVERS = "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"


def subscribe(directory: Path, tmp_path: Path, name: str, address: str) -> None:
    argv = ["subscribe", str(directory), name, "--address", address, "--until-epoch", "50000"]
    assert main([*argv, "--out", str(tmp_path / f"{name}.bundle")]) == 0


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    directory = tmp_path / "dep"
    start = str(round(time.time() - 5))
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1"]
    assert (
        main([*init, "--chain-length", "100000", "--m", "3", "--tick", "1", "--start", start]) == 0
    )
    subscribe(directory, tmp_path, "alice", "10.0.0.60")
    return directory


def make_shim(directory: Path) -> Any:
    options = ServerOptions(
        directory,
        parse_address_and_port("10.0.0.1:80", 80),
        parse_address_and_port("127.0.0.1:8000", 8000),
    )
    log = directory.parent / "server.jsonl"
    shim = ServerShim(options, EventLog("server", log, quiet=True))
    shim.log_path = log
    return shim


def events(shim: Any, kind: str) -> list[dict[str, Any]]:
    shim.log._file.flush()
    lines = [json.loads(line) for line in shim.log_path.read_text().splitlines()]
    return [e for e in lines if e["event"] == kind]


def test_a_client_subscribed_after_the_start_is_let_in_by_a_reload(
    directory: Path, tmp_path: Path
) -> None:
    shim = make_shim(directory)
    epoch = shim.pool.schedule.epoch_at(time.time()).index
    subscribe(directory, tmp_path, "bob", "10.0.0.61")
    bob = 2
    assert not shim.pool.admissible(bob, epoch)
    shim.reload_clients()
    assert shim.pool.admissible(bob, epoch)
    assert "10.0.0.61" in {str(c.address) for c in shim.pool.legitimate(epoch)}
    assert bob in shim.sealers  # it gets roaming updates
    (reloaded,) = events(shim, "clients_reloaded")
    assert reloaded["added"] == ["bob"]
    assert shim.status()["client_list_generation"] == reloaded["generation"]
    # A revocation in the list keeps it out from the next reload on.
    assert main(["revoke", str(directory), "bob", "--no-notify"]) == 0
    shim.reload_clients()
    assert not shim.pool.admissible(bob, epoch)
    assert events(shim, "clients_reloaded")[-1]["revoked"] == ["bob"]


def test_an_older_or_broken_list_is_refused_and_the_running_one_kept(
    directory: Path, tmp_path: Path
) -> None:
    old = tmp_path / "clients.old"
    shutil.copy(directory / "clients.sealed", old)
    subscribe(directory, tmp_path, "bob", "10.0.0.61")
    shim = make_shim(directory)
    running = shim.pool.clients
    shutil.copy(old, directory / "clients.sealed")
    shim.reload_clients()
    assert shim.pool.clients is running
    assert "older than the running list" in events(shim, "reload_failed")[-1]["reason"]
    (directory / "clients.sealed").write_bytes(b"not a sealed list")
    shim.reload_clients()
    assert shim.pool.clients is running
    assert len(events(shim, "reload_failed")) == 2


def test_reload_signals_nothing_that_is_not_a_server_shim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SERVER_ROAMING_RUN_DIR", str(tmp_path / "run"))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert main(["reload", "--pid", str(bystander.pid)]) == 1
        _out, err = capsys.readouterr()
        assert err.startswith(f"roam: error: pid {bystander.pid} is not a running server shim")
        assert err.count("\n") == 1
        assert main(["reload"]) == 1
        _out, err = capsys.readouterr()
        assert err.startswith("roam: error: no server shim runs in this network namespace")
        assert bystander.poll() is None  # SIGHUP would have ended it
    finally:
        bystander.send_signal(signal.SIGTERM)
        bystander.wait()
