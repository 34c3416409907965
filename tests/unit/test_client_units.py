"""``roam client install/uninstall/status``: consistent options, nothing left behind on a host
without systemd, and every error one line with exit status 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from roam_cli.main import main

SERVERS = "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"


def outcome(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "dep"
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1", "--no-index"]
    assert main([*init, "--chain-length", "1000", "--m", "3", "--tick", "1"]) == 0
    out = tmp_path / "alice.bundle"
    subscribe = ["subscribe", str(directory), "alice", "--address", "10.0.0.60"]
    assert main([*subscribe, "--until-epoch", "500", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def without_systemctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_install_without_systemd_writes_nothing(
    bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    without_systemctl(monkeypatch, tmp_path)
    units = tmp_path / "units"
    status, out, err = outcome(
        capsys, "client", "install", "--bundle", str(bundle), "--unit-dir", str(units)
    )
    assert status == 1
    assert err.startswith("roam: error: systemctl is not available on this host; nothing written")
    assert err.count("\n") == 1
    assert not units.exists() or not any(units.iterdir())
    # --no-start writes the unit only, and says so.
    status, out, err = outcome(
        capsys, "client", "install", "--bundle", str(bundle), "--unit-dir", str(units), "--no-start"
    )
    assert (status, err) == (0, "")
    assert out.startswith("wrote ")
    assert (units / "roam-client-alice.service").exists()


def test_a_failing_systemctl_leaves_no_unit(
    bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A systemd that refuses (no D-Bus in a container): the unit written is taken back.
    fake = tmp_path / "bin"
    fake.mkdir()
    systemctl = fake / "systemctl"
    systemctl.write_text('#!/bin/sh\necho "Failed to connect to bus: No such file" >&2\nexit 1\n')
    systemctl.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    units = tmp_path / "units"
    status, _out, err = outcome(
        capsys, "client", "install", "--bundle", str(bundle), "--unit-dir", str(units)
    )
    assert status == 1
    assert err.startswith("roam: error: systemctl daemon-reload: Failed to connect to bus")
    assert err.count("\n") == 1
    assert not (units / "roam-client-alice.service").exists()


def test_uninstall_takes_a_bundle_like_install_and_status(
    bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    without_systemctl(monkeypatch, tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    (units / "roam-client-alice.service").write_text("[Unit]\n")
    (units / "roam-client-bob.service").write_text("[Unit]\n")
    status, out, err = outcome(
        capsys, "client", "uninstall", "--bundle", str(bundle), "--unit-dir", str(units)
    )
    assert (status, err) == (0, "")
    assert "roam-client-alice.service" in out
    assert sorted(p.name for p in units.iterdir()) == ["roam-client-bob.service"]
    status, _out, err = outcome(
        capsys, "client", "uninstall", "--bundle", str(bundle), "--unit-dir", str(units)
    )
    assert status == 1
    assert "roam-client-alice.service is not installed" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["client", "uninstall", "--bogus"],
        ["client", "install"],
        ["client", "status", "--json", "--bogus"],
        ["schedule", "--count", "0"],
        ["nonexistent-command"],
    ],
)
def test_every_usage_error_is_one_line_with_status_1(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = outcome(capsys, *argv)
    assert status == 1
    assert out == ""
    assert err.startswith("roam")
    assert err.count("\n") == 1
