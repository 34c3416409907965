"""``roam init --active`` and ``roam schedule --active/--clients`` (PROTOCOL.md section 4)."""

import io
import json
import sys

import pytest

from tests.unit.cli import run, subscribe

from .test_activeset import SECTION4_TABLE
from .test_cli import assert_one_line_error
from .vectors import CHAIN_KEY_HEX, SERVERS_TEXT

SIX_TEXT = ",".join(f"10.0.0.{i}:80" for i in range(1, 7))
EXPLICIT = [
    "schedule",
    "--chain-key-file",
    "-",
    "--key-index",
    "1000",
    "--m",
    "6",
    "--tick",
    "1.0",
    "--start",
    "0",
]


@pytest.fixture(autouse=True)
def chain_key_on_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAIN_KEY_HEX + "\n"))


def full(short: str) -> str:
    return f"10.0.0{short}:80"


def test_section4_vector_through_the_cli(capsys):
    status, out, err = run(
        capsys, *EXPLICIT, "--servers", SIX_TEXT, "--count", "5", "--json", "--active", "3",
        "--clients", "1,2,7",
    )  # fmt: skip
    assert (status, err) == (0, "")
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5
    for record, (epoch, members, clients) in zip(records, SECTION4_TABLE, strict=True):
        assert record["epoch"] == epoch
        assert record["active"] == [full(s) for s in members]
        assert record["server"] == record["active"][0]
        assert record["assigned"] == {c: full(s) for c, s in zip("127", clients, strict=True)}
    assert list(records[0]) == ["epoch", "start", "length", "server", "active", "assigned"]


def test_k1_adds_only_the_set_of_one(capsys):
    status, out, _ = run(
        capsys, *EXPLICIT, "--servers", SERVERS_TEXT, "--count", "5", "--json", "--active", "1",
        "--clients", "3",
    )  # fmt: skip
    assert status == 0
    for line in out.splitlines():
        record = json.loads(line)
        assert record["active"] == [record["server"]]
        assert record["assigned"] == {"3": record["server"]}


def test_text_output_shows_set_and_assignments(capsys):
    status, out, _ = run(
        capsys, *EXPLICIT, "--servers", SIX_TEXT, "--count", "1", "--active", "3",
        "--clients", "1,2",
    )  # fmt: skip
    assert status == 0
    header, row = out.splitlines()
    assert header.split()[-2:] == ["active", "assigned"]
    assert "10.0.0.6:80,10.0.0.5:80,10.0.0.2:80" in row
    assert row.endswith("1=10.0.0.2:80 2=10.0.0.6:80")


@pytest.mark.parametrize("k", ["0", "-1", "7", "1000"])
def test_k_outside_1_to_n_is_one_line_and_prints_nothing(capsys, k):
    argv = [*EXPLICIT, "--servers", SIX_TEXT, "--json", "--active", k]
    assert_one_line_error(*run(capsys, *argv), f"must be in 1..6 (the number of servers), got {k}")


@pytest.mark.parametrize(
    ("clients", "text"),
    [
        ("0", "client id must be in 1..4294967294"),
        ("4294967295", "client id must be in 1..4294967294"),
        ("1,x", "'x' is not a client id"),
        ("1,,2", "has an empty entry"),
        ("2,2", "client id 2 is given twice"),
    ],
)
def test_bad_client_lists_are_refused(capsys, clients, text):
    argv = [*EXPLICIT, "--servers", SIX_TEXT, "--json", "--clients", clients]
    status, out, err = run(capsys, *argv)
    assert status != 0
    assert out == ""
    assert text in err
    assert err.count("\n") == 1


def init(capsys, directory, *extra):
    return run(
        capsys, "init", str(directory), "--servers", SIX_TEXT, "--vip", "10.99.0.1",
        "--chain-length", "1000", "--m", "6", "--tick", "1", "--start", "0", "--no-index",
        *extra,
    )  # fmt: skip


def test_init_records_k_and_schedule_uses_it_by_default(tmp_path, capsys):
    directory = tmp_path / "dep"
    status, out, err = init(capsys, directory, "--active", "3")
    assert status == 0, err
    assert "3 active per epoch" in out
    assert json.loads((directory / "deployment.json").read_text())["active"] == 3
    status, out, _ = run(
        capsys, "schedule", "--deployment", str(directory), "--json", "--count", "50",
        "--clients", "1",
    )  # fmt: skip
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert all(len(set(r["active"])) == 3 for r in records)
    assert all(r["assigned"]["1"] in r["active"] for r in records)
    # --active overrides the deployment's k.
    _, out, _ = run(capsys, "schedule", "--deployment", str(directory), "--json", "--active", "2")
    assert all(len(json.loads(line)["active"]) == 2 for line in out.splitlines())


def test_bundle_carries_k_and_agrees_with_the_deployment(tmp_path, capsys):
    directory = tmp_path / "dep"
    assert init(capsys, directory, "--active", "3")[0] == 0
    bundle = tmp_path / "alice.bundle"
    status, out, err = subscribe(capsys, directory, "alice", "10.0.0.50", str(bundle), until=100)
    assert status == 0, err
    assert json.loads(bundle.read_text())["active"] == 3
    # alice is client 1: its bundle computes the same set and server as the deployment.
    argv = ["--json", "--count", "100", "--clients", "1"]
    _, from_deployment, _ = run(capsys, "schedule", "--deployment", str(directory), *argv)
    _, from_bundle, _ = run(capsys, "schedule", "--bundle", str(bundle), *argv)
    assert from_deployment == from_bundle
    assert len(json.loads(from_bundle.splitlines()[0])["active"]) == 3
    status, out, err = run(capsys, "inspect", str(bundle), "--json")
    assert json.loads(out)["active"] == 3


def test_a_deployment_without_k_means_one_and_its_file_is_unchanged(tmp_path, capsys):
    directory = tmp_path / "dep"
    assert init(capsys, directory)[0] == 0
    assert "active" not in json.loads((directory / "deployment.json").read_text())
    status, out, _ = run(capsys, "schedule", "--deployment", str(directory), "--json")
    assert status == 0
    assert "active" not in json.loads(out.splitlines()[0])  # section 3's output, unchanged
    status, out, _ = run(capsys, "inspect", str(directory), "--json")
    assert json.loads(out)["active"] == 1


@pytest.mark.parametrize("k", ["0", "7"])
def test_init_refuses_k_outside_1_to_n(tmp_path, capsys, k):
    directory = tmp_path / "dep"
    assert_one_line_error(
        *init(capsys, directory, "--active", k), "--active: the number of active servers must be"
    )
    assert not directory.exists()


def test_a_deployment_file_with_a_bad_k_is_refused(tmp_path, capsys):
    directory = tmp_path / "dep"
    assert init(capsys, directory)[0] == 0
    path = directory / "deployment.json"
    document = json.loads(path.read_text())
    document["active"] = 9
    path.write_text(json.dumps(document))
    assert_one_line_error(
        *run(capsys, "schedule", "--deployment", str(directory)), "in 1..6 (the number of servers)"
    )
    document["active"] = 0
    path.write_text(json.dumps(document))
    assert_one_line_error(
        *run(capsys, "schedule", "--deployment", str(directory)), "'active' must be at least 1"
    )
