"""``roam server install/uninstall``: the hardened unit's text, nothing written on a host without
systemd, everything taken back when systemctl fails (a fake systemctl on PATH: this machine has
no systemd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from roam_cli.main import main
from tests.unit.test_client_units import outcome, without_systemctl
from tests.unit.test_config_files import SERVERS


@pytest.fixture
def config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "dep"
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1", "--no-index"]
    assert main([*init, "--chain-length", "1000", "--m", "3", "--tick", "1"]) == 0
    capsys.readouterr()
    path = tmp_path / "server.toml"
    path.write_text(
        f'deployment = "{directory}"\n'
        'listen = "10.0.0.2:80"\n'
        'service = "127.0.0.1:8080"\n'
        f'log-json = "{tmp_path / "log" / "server.jsonl"}"\n'
        f'status = "{tmp_path / "run" / "server.json"}"\n'
        'metrics = "127.0.0.1:9464"\n'
    )
    return path


def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_code: int) -> Path:
    """A systemctl that records its arguments and exits with ``exit_code``."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "systemctl.calls"
    script = fake / "systemctl"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        + ('echo "Failed to connect to bus: No such file" >&2\n' if exit_code else "")
        + f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    return calls


def settings(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )


def test_the_unit_runs_the_config_hardened_with_cleanup_after_it(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = fake_systemctl(tmp_path, monkeypatch, 0)
    units = tmp_path / "units"
    argv = ["server", "install", str(config), "--unit-dir", str(units), "--netns", "srv1"]
    status, out, err = outcome(capsys, *argv)
    assert status == 0, err
    unit = units / "roam-server-10.0.0.2-80.service"
    assert out.splitlines() == [f"wrote {unit}", f"started {unit.name}"]
    assert calls.read_text().splitlines() == ["daemon-reload", f"enable --now {unit.name}"]
    found = settings(unit.read_text())
    assert found["ExecStart"].endswith(f" server --config {config}")
    assert found["ExecStopPost"].endswith(" cleanup")
    assert found["NetworkNamespacePath"] == "/run/netns/srv1"
    assert set(found["CapabilityBoundingSet"].split()) >= {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert found["ProtectSystem"] == "strict"
    assert found["PrivateTmp"] == found["NoNewPrivileges"] == "yes"
    assert found["UMask"] == "0077"
    # Writable: exactly the directories the shim writes (state, log, status), made 0700.
    writable = [Path(p) for p in found["ReadWritePaths"].split()]
    assert sorted(writable) == sorted(
        [tmp_path / "dep" / "state", tmp_path / "log", tmp_path / "run"]
    )
    assert all(p.is_dir() and p.stat().st_mode & 0o777 == 0o700 for p in writable)
    assert "private /tmp hides it" in err  # the test's files live under /tmp
    # Installed twice: refused, the unit kept.
    status, _out, err = outcome(capsys, *argv)
    assert status == 1
    assert "already exists; run 'roam server uninstall' first" in err


def test_install_without_systemd_writes_nothing(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    without_systemctl(monkeypatch, tmp_path)
    units = tmp_path / "units"
    status, _out, err = outcome(capsys, "server", "install", str(config), "--unit-dir", str(units))
    assert status == 1
    assert err.startswith("roam: error: systemctl is not available on this host; nothing written")
    assert err.count("\n") == 1
    assert not units.exists()
    assert not (tmp_path / "log").exists()
    assert not (tmp_path / "dep" / "state").exists()


def test_a_failing_systemctl_takes_back_the_unit_and_the_directories_made(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_systemctl(tmp_path, monkeypatch, 1)
    (tmp_path / "run").mkdir()  # there before: left alone
    units = tmp_path / "units"
    status, _out, err = outcome(capsys, "server", "install", str(config), "--unit-dir", str(units))
    assert status == 1
    assert err.startswith("roam: error: systemctl daemon-reload: Failed to connect to bus")
    assert err.count("\n") == 1
    assert list(units.iterdir()) == []
    assert not (tmp_path / "log").exists()
    assert not (tmp_path / "dep" / "state").exists()
    assert (tmp_path / "run").is_dir()


@pytest.mark.parametrize(
    ("key", "replacement", "message"),
    [
        ("listen", 'listen = "10.0.0.9:80"', "key 'listen': 10.0.0.9:80 is not in the deployment"),
        ("service", "", "the server needs the keys service"),
    ],
)
def test_a_config_the_shim_would_refuse_is_refused_before_anything_is_written(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    key: str,
    replacement: str,
    message: str,
) -> None:
    without_systemctl(monkeypatch, tmp_path)
    kept = [line for line in config.read_text().splitlines() if not line.startswith(key)]
    config.write_text("\n".join([*kept, replacement]) + "\n")
    units = tmp_path / "units"
    status, _out, err = outcome(
        capsys, "server", "install", str(config), "--unit-dir", str(units), "--no-start"
    )
    assert status == 1
    assert message in err
    assert err.count("\n") == 1
    assert not units.exists()


def test_a_path_systemd_would_misread_and_a_bad_namespace_are_refused(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    units = tmp_path / "units"
    status, _out, err = outcome(
        capsys, "server", "install", str(config), "--unit-dir", str(units), "--no-start",
        "--netns", "x\nExecStartPre=/bin/sh",
    )  # fmt: skip
    assert status == 1
    assert "--netns" in err
    assert not units.exists()
    odd = tmp_path / "with space.toml"
    odd.write_text(config.read_text())
    status, _out, err = outcome(
        capsys, "server", "install", str(odd), "--unit-dir", str(units), "--no-start"
    )
    assert status == 1
    assert "may not hold spaces" in err


def test_uninstall_removes_that_servers_unit_or_every_one(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    without_systemctl(monkeypatch, tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    for name in ("roam-server-10.0.0.2-80.service", "roam-server-10.0.0.3-80.service"):
        (units / name).write_text("[Unit]\n")
    status, out, err = outcome(capsys, "server", "uninstall", str(config), "--unit-dir", str(units))
    assert (status, err) == (0, "")
    assert sorted(p.name for p in units.iterdir()) == ["roam-server-10.0.0.3-80.service"]
    status, out, err = outcome(capsys, "server", "uninstall", "--unit-dir", str(units))
    assert (status, err) == (0, "")
    assert "roam-server-10.0.0.3-80.service" in out
    assert list(units.iterdir()) == []
    status, _out, err = outcome(capsys, "server", "uninstall", "--unit-dir", str(units))
    assert status == 1
    assert "no roam server unit is installed" in err
