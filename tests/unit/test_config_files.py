"""``roam server --config FILE`` / ``roam client --config FILE`` (TOML) and ``--check-config``:
every option has a key, the command line overrides the file, and a bad file is refused in one
line naming the key, before anything is created."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from roam_cli.main import main

SERVERS = "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"


def outcome(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "dep"
    start = str(round(time.time() - 5))
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1", "--no-index"]
    assert main([*init, "--chain-length", "1000", "--m", "3", "--tick", "1", "--start", start]) == 0
    capsys.readouterr()
    return directory


def server_config(tmp_path: Path, directory: Path, extra: str = "") -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        f'deployment = "{directory}"\n'
        'listen = "10.0.0.2:80"\n'
        'service = "127.0.0.1:8080"\n'
        'migration = "reconnect"\n'
        "update-period = 2.5\n"
        "no-transparent = true\n"
        f'log-json = "{tmp_path / "server.jsonl"}"\n' + extra
    )
    return path


def test_a_server_configured_from_a_file_checks_out(
    directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_config(tmp_path, directory)
    status, out, err = outcome(capsys, "server", "--config", str(config), "--check-config")
    assert (status, err) == (0, "")
    assert out.startswith("configuration OK: server 10.0.0.2:80 (index 1)")
    assert "migration reconnect" in out
    # The command line overrides the file.
    status, out, _err = outcome(
        capsys, "server", "--config", str(config), "--listen", "10.0.0.3:80", "--check-config"
    )
    assert status == 0
    assert "server 10.0.0.3:80 (index 2)" in out
    assert not (tmp_path / "server.jsonl").exists()  # checked, not started
    assert not (directory / "state").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("updte-period = 2\n", "unknown key 'updte-period'"),
        ('checkpoint-period = "fast"\n', "key 'checkpoint-period': 'fast' is not a number"),
        ("sync-period = -1\n", "key 'sync-period': '-1' must be"),
        (
            'codec = "telnet"\n',
            "key 'codec': 'telnet' is not one of auto, generic, http, resp, memcached",
        ),
        ('quiet = "yes"\n', "key 'quiet' is a switch: give true or false"),
        ("control-port = [1, 2]\n", "key 'control-port' takes a string or a number"),
        ("clock-offset = 5\n", "unknown key 'clock-offset'"),  # hidden testing option
        ("listen = \n", "not valid TOML"),
    ],
)
def test_a_bad_server_config_is_one_line_naming_the_key_and_creates_nothing(
    directory: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    message: str,
) -> None:
    config = server_config(tmp_path, directory, extra)
    status, out, err = outcome(capsys, "server", "--config", str(config))
    assert status == 1
    assert out == ""
    assert err.startswith(f"roam: error: {config}")
    assert message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "server.jsonl").exists()
    assert not (directory / "state").exists()


def test_a_listen_address_outside_the_pool_is_refused_by_check_config(
    directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_config(tmp_path, directory, "")
    status, _out, err = outcome(
        capsys, "server", "--config", str(config), "--listen", "10.0.0.9:80", "--check-config"
    )
    assert status == 1
    assert "--listen 10.0.0.9:80 is not in the deployment's server list" in err


def test_a_client_takes_its_options_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'bundle = "{tmp_path / "absent.bundle"}"\ncover-rate = 0\n')
    status, _out, err = outcome(capsys, "client", "--config", str(config))
    assert status == 1
    assert err.startswith("roam: error: ")
    assert f"bundle {tmp_path / 'absent.bundle'} does not exist" in err
    config.write_text("cover-rate = -3\n")
    status, _out, err = outcome(capsys, "client", "--config", str(config))
    assert status == 1
    assert "key 'cover-rate'" in err
    status, _out, err = outcome(capsys, "client", "--config", str(tmp_path / "none.toml"))
    assert status == 1
    assert err.startswith("roam: error: config file ")


def test_metrics_is_a_key_and_a_bad_address_is_refused_naming_it(
    directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = server_config(tmp_path, directory, 'metrics = "127.0.0.1:9464"\n')
    status, _out, err = outcome(capsys, "server", "--config", str(good), "--check-config")
    assert (status, err) == (0, "")
    bad = server_config(tmp_path, directory, 'metrics = "localhost"\n')
    status, _out, err = outcome(capsys, "server", "--config", str(bad), "--check-config")
    assert status == 1
    assert err.count("\n") == 1
    assert "key 'metrics'" in err
