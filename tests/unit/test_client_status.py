"""What ``roam revoke`` promises and what ``roam client status`` shows a person."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from migrate.control import OPERATOR, ControlChannel, Revoke
from migrate.gating import gate_at
from migrate.kernel.deployment import DeploymentDir
from roam_cli.main import main
from tests.unit.test_control_handling import OPERATOR_HOST, make_deployment, make_shim


def test_revoke_help_says_what_revoking_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["revoke", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "stay valid until" not in text
    assert "gate drops the client's packets" in text


def test_a_revoked_client_is_out_of_the_gate_at_once_although_its_keys_run_on(
    tmp_path: Path,
) -> None:
    shim = make_shim(make_deployment(tmp_path))
    now = time.time()
    gate = gate_at(shim.pool.schedule, shim.options.listen, now)
    alice = shim.pool.clients.by_name("alice")
    assert alice.until_epoch > gate.epoch + 1000  # its keys reach far ahead
    assert alice.address in shim._plan(gate).allowed
    secret = DeploymentDir(shim.options.deployment_dir).secret()
    operator = ControlChannel(secret.group_key, secret.deployment_id, OPERATOR)
    shim.on_control(operator.seal(Revoke(alice.client_id), now), OPERATOR_HOST)
    assert alice.address not in shim._plan(gate).allowed


def status_file(tmp_path: Path, **fields: object) -> Path:
    now = time.time()
    status = {
        "pid": os.getpid(),
        "name": "alice",
        "bundle": "/etc/roam/alice.bundle",
        "vip": "10.99.0.1:80",
        "epoch": 42,
        "epoch_ends": now + 3.25,
        "server": "10.0.0.2:80",
        "key_index": 100000,
        "m": {"1": 3, "50": 2},
        "clock_offset": 0.0123,
        "updates_accepted": 7,
        "last_update": now - 1.0,
        "started": now - 100.0,
        "updates_rejected": 0,
        "last_rejection": None,
        "table": "roam_cli_1",
        "migration": "live",
        "live": {
            "tracked_connections": 2,
            "roams": [
                {
                    "epoch": 41,
                    "server": "10.0.0.2:80",
                    "connections": 2,
                    "outcomes": {"migrated": 2},
                    "pause_ms": 12.5,
                    "bytes_replayed": 300,
                }
            ],
        },
        "updated": now,
    }
    status.update(fields)
    path = tmp_path / "status.json"
    path.write_text(json.dumps(status))
    return path


def test_client_status_is_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = status_file(tmp_path)
    assert main(["client", "status", "--status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "{" not in out  # no Python dict reprs
    assert str(int(time.time()))[:6] not in out  # no raw Unix times
    assert "epoch 42 on 10.0.0.2:80, ends in 3." in out
    assert "m = 3, then 2 from epoch 50" in out
    assert "epoch 41 to 10.0.0.2:80: 2 connection(s) (migrated 2), pause 12.5 ms" in out
    assert "WARNING" not in out


def test_client_status_says_when_updates_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = status_file(tmp_path, last_update=time.time() - 120)
    assert main(["client", "status", "--status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: no roaming update since the last one for 120 s: this client was revoked" in out
    path = status_file(tmp_path, last_update=None, started=time.time() - 60)
    assert main(["client", "status", "--status", str(path)]) == 0
    assert "WARNING: no roaming update for 60 s" in capsys.readouterr().out
