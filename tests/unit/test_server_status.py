"""``roam server status``: the server shim's status file as a person reads it."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from roam_cli.main import main
from tests.unit.test_control_handling import make_deployment, make_shim


def write_status(tmp_path: Path, **fields: object) -> Path:
    now = time.time()
    status = {
        "pid": os.getpid(),
        "listen": "10.0.0.1:80",
        "service": "127.0.0.1:8000",
        "migration": "live",
        "epoch": 17,
        "open": True,
        "active": True,
        "gate_until": now + 4.0,
        "leaves_at": now + 4.0,
        "connections": 3,
        "updates_sent": 40,
        "control_rejected": 1,
        "live": {"live_connections": 3, "pending": 0, "pending_by_client": {}},
        "revoked": [2],
        "clients": 5,
        "client_list_generation": 6,
        "table": "roam_srv_1",
        "updated": now,
    }
    status.update(fields)
    path = tmp_path / "server.status.json"
    path.write_text(json.dumps(status))
    return path


def test_server_status_is_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "status", "--status", str(write_status(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "server 10.0.0.1:80" in out
    leaves = re.search(r"epoch 17: ACTIVE, gate open; the service leaves in (\d+\.\d) s", out)
    assert leaves is not None
    assert 2.0 < float(leaves.group(1)) <= 4.0
    assert "connections: 3; clients: 5 (list generation 6), 1 revoked" in out
    assert "{" not in out
    assert main(["server", "status", "--status", str(write_status(tmp_path, active=False))]) == 0
    assert "epoch 17: inactive" in capsys.readouterr().out


def test_server_status_of_no_running_shim_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["server", "status", "--status", str(tmp_path / "absent.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("roam: error: no server shim is running")
    assert err.count("\n") == 1


def test_the_server_writes_when_the_service_leaves_it(tmp_path: Path) -> None:
    shim = make_shim(make_deployment(tmp_path))
    status = shim.status()
    assert "gate_until" in status
    leaves = status["leaves_at"]
    assert leaves is None or leaves > time.time() - 1


def test_a_server_without_its_required_options_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["server", "--listen", "10.0.0.1:80"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "roam: error: the server needs --deployment, --service (on the command line or in "
        "--config FILE)\n"
    )
