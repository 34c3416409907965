"""``roam suspects DIR --reports FILE``: the ranking through the CLI, and its errors."""

import json

import pytest

from migrate.activeset import ActiveSchedule
from migrate.kernel.deployment import DeploymentDir
from roam_cli.recorded import deployment_schedule
from tests.unit.cli import run, subscribe

from .test_cli_active import init

INSIDER = "c05"
CLIENTS = 8


@pytest.fixture
def deployment(tmp_path, capsys):
    directory = tmp_path / "dep"
    status, _, err = init(capsys, directory, "--active", "3")
    assert status == 0, err
    for number in range(1, CLIENTS + 1):
        bundle = tmp_path / f"c{number:02}.bundle"
        status, _, err = subscribe(
            capsys, directory, f"c{number:02}", f"10.0.1.{number}", str(bundle), until=100
        )
        assert status == 0, err
    return directory


def flood_reports(directory, insider_id, epochs, path, extra=()):
    """Every server reports each epoch; the insider's server is flooded."""
    dep = DeploymentDir(directory)
    deployment = dep.deployment()
    active = ActiveSchedule(deployment_schedule(dep, deployment, dep.secret()), 3)
    lines = []
    for epoch in epochs:
        target = str(active.assigned(epoch, insider_id))
        for server in deployment.servers:
            dropped = 90_000 if str(server) == target else 3
            lines.append(json.dumps({"epoch": epoch, "server": str(server), "dropped": dropped}))
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def test_the_insider_is_ranked_first_and_flagged(deployment, tmp_path, capsys):
    reports = flood_reports(deployment, 5, range(1, 31), tmp_path / "reports.jsonl")
    status, out, err = run(capsys, "suspects", str(deployment), "--reports", str(reports))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("180 reports, epochs 1..30 (30 with evidence), k = 3")
    first = lines[2].split()
    assert first[:3] == ["1", INSIDER, "5"]
    assert lines[2].endswith("SUSPECT")
    assert not any(line.endswith("SUSPECT") for line in lines[3:])
    assert len(lines) == 2 + CLIENTS

    status, out, _ = run(capsys, "suspects", str(deployment), "--reports", str(reports), "--json")
    document = json.loads(out)
    top = document["suspects"][0]
    assert (top["client"], top["client_id"], top["above_threshold"]) == (INSIDER, 5, True)
    assert top["hits"] == top["epochs"] == 30
    assert top["evidence"] == list(range(1, 31))
    assert [s["above_threshold"] for s in document["suspects"][1:]] == [False] * (CLIENTS - 1)


def test_a_revoked_client_is_not_ranked(deployment, tmp_path, capsys):
    assert run(capsys, "revoke", str(deployment), INSIDER, "--no-notify")[0] == 0
    reports = flood_reports(deployment, 5, range(1, 31), tmp_path / "reports.jsonl")
    _, out, _ = run(capsys, "suspects", str(deployment), "--reports", str(reports), "--json")
    ranked = [s["client"] for s in json.loads(out)["suspects"]]
    assert INSIDER not in ranked
    assert len(ranked) == CLIENTS - 1


def test_k1_says_the_reports_cannot_tell_clients_apart(deployment, tmp_path, capsys):
    reports = flood_reports(deployment, 5, range(1, 11), tmp_path / "reports.jsonl")
    argv = ["suspects", str(deployment), "--reports", str(reports), "--active", "1"]
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert "with k = 1 every client has the same server" in out
    assert "SUSPECT" not in out


@pytest.mark.parametrize(
    ("line", "text"),
    [
        ("{", "line 31: not a JSON object"),
        ('{"epoch": 2, "server": "10.9.9.9:80", "dropped": 1}', "line 31: server 10.9.9.9:80"),
        ('{"epoch": 2000, "server": "10.0.0.1:80", "dropped": 1}', "after the chain's last"),
        ('{"epoch": 2, "server": "10.0.0.1:80", "dropped": "x"}', "'dropped' must be a non"),
    ],
)
def test_malformed_reports_are_one_line_errors(deployment, tmp_path, capsys, line, text):
    reports = flood_reports(deployment, 5, range(1, 6), tmp_path / "r.jsonl", extra=[line])
    status, out, err = run(capsys, "suspects", str(deployment), "--reports", str(reports))
    assert status != 0
    assert out == ""
    assert err.count("\n") == 1
    assert f"{reports} line 31" in err
    assert text in err


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--active", "7"], "--active: the number of active servers must be in 1..6"),
        (["--confidence", "1"], "must be between 0 and 1"),
        (["--window", "5000"], "--window must be at most 4096"),
        (["--dropped", "0"], "must be at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(deployment, tmp_path, capsys, extra, text):
    reports = flood_reports(deployment, 5, range(1, 3), tmp_path / "r.jsonl")
    status, out, err = run(capsys, "suspects", str(deployment), "--reports", str(reports), *extra)
    assert status != 0
    assert out == ""
    assert err.count("\n") == 1
    assert text in err


def test_a_missing_reports_file_is_named(deployment, tmp_path, capsys):
    status, out, err = run(capsys, "suspects", str(deployment), "--reports", str(tmp_path / "none"))
    assert status != 0
    assert out == ""
    assert f"--reports {tmp_path / 'none'} does not exist" in err
