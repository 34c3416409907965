import io
import json
import stat
import subprocess
import sys

import pytest

from tests.unit.cli import run, subscribe

from .vectors import CHAIN_KEY_HEX, SERVERS_TEXT, TABLE

VECTOR = [
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
    "--servers",
    SERVERS_TEXT,
]


def assert_one_line_error(status, out, err, text):
    assert status != 0
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("roam")
    assert text in err


@pytest.fixture(autouse=True)
def chain_key_on_stdin(monkeypatch):
    """K_T arrives on standard input (``--chain-key-file -``), never in argv."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAIN_KEY_HEX + "\n"))


def test_schedule_prints_the_public_vector_exactly(capsys):
    status, out, err = run(capsys, *VECTOR, "--from", "1", "--count", "5", "--json")
    assert status == 0
    assert err == ""
    expected = [
        json.dumps({"epoch": e, "start": s, "length": length, "server": server})
        for e, s, length, server in TABLE
    ]
    assert out.splitlines() == expected


def test_schedule_stops_at_the_held_key(capsys):
    status, out, _ = run(capsys, *VECTOR, "--from", "998", "--count", "5", "--json")
    assert status == 0
    assert [json.loads(line)["epoch"] for line in out.splitlines()] == [998, 999, 1000]


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"--chain-key-file": "/nonexistent/key"}, "--chain-key-file /nonexistent/key does not"),
        ({"--servers": "10.0.0.1"}, "not IP:PORT"),
        ({"--servers": "10.0.0.1:80,"}, "empty entry"),
        ({"--m": "0"}, "1..32"),
        ({"--tick": "0"}, "greater than 0"),
        ({"--key-index": "-3"}, "at least 1"),
        ({"--from": "1001"}, "after the last key held"),
    ],
)
def test_schedule_errors_are_one_line_with_no_partial_output(capsys, changes, text):
    argv = [*list(VECTOR), "--from", "1", "--json"]
    for flag, value in changes.items():
        argv[argv.index(flag) + 1] = value
    assert_one_line_error(*run(capsys, *argv), text)


def test_schedule_needs_complete_key_material(capsys):
    assert_one_line_error(*run(capsys, "schedule", "--m", "6"), "missing --chain-key-file")


@pytest.mark.parametrize(
    ("content", "text"), [("zz", "is not hexadecimal"), ("00" * 31, "must be 32 bytes")]
)
def test_a_bad_chain_key_file_is_named_and_its_content_never_echoed(
    capsys, tmp_path, content, text
):
    key_file = tmp_path / "k"
    key_file.write_text(content + "\n")
    argv = [*VECTOR, "--from", "1", "--json"]
    argv[argv.index("--chain-key-file") + 1] = str(key_file)
    status, out, err = run(capsys, *argv)
    assert_one_line_error(status, out, err, f"--chain-key-file {key_file} {text}")
    assert content not in err


def test_the_chain_key_from_a_file_gives_the_public_vector(capsys, tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text(CHAIN_KEY_HEX + "\n")
    argv = [*VECTOR, "--from", "1", "--count", "5", "--json"]
    argv[argv.index("--chain-key-file") + 1] = str(key_file)
    status, out, err = run(capsys, *argv)
    assert (status, err) == (0, "")
    assert [json.loads(line)["server"] for line in out.splitlines()] == [t[3] for t in TABLE]


def test_the_deprecated_chain_key_flag_still_works_and_warns(capsys):
    argv = [*VECTOR, "--from", "1", "--count", "5", "--json"]
    argv[argv.index("--chain-key-file") : argv.index("--chain-key-file") + 2] = [
        "--chain-key",
        CHAIN_KEY_HEX,
    ]
    status, out, err = run(capsys, *argv)
    assert status == 0
    assert len(out.splitlines()) == 5
    assert "warning: --chain-key puts K_T in the process list" in err
    assert CHAIN_KEY_HEX not in err
    both = [*argv, "--chain-key-file", "-"]
    assert_one_line_error(*run(capsys, *both), "either --chain-key-file or --chain-key")


def test_the_chain_key_never_appears_in_the_process_arguments(tmp_path):
    """The schedule is computed by a real ``roam`` process reading K_T from stdin."""
    completed = subprocess.run(
        [sys.executable, "-m", "roam_cli.main", *VECTOR, "--from", "1", "--count", "1", "--json"],
        input=CHAIN_KEY_HEX,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(completed.stdout)["server"] == TABLE[0][3]
    assert CHAIN_KEY_HEX not in " ".join(completed.args)


@pytest.fixture
def deployment(tmp_path, capsys):
    directory = tmp_path / "dep"
    status, _, err = run(
        capsys,
        "init",
        str(directory),
        "--servers",
        SERVERS_TEXT,
        "--vip",
        "10.99.0.1",
        "--chain-length",
        "1000",
        "--m",
        "6",
        "--tick",
        "1",
        "--start",
        "0",
    )
    assert status == 0, err
    return directory


def test_init_writes_private_secrets_and_refuses_to_overwrite(deployment, capsys):
    assert stat.S_IMODE(deployment.stat().st_mode) == 0o700
    for name in ("secret.json", "clients.sealed"):
        assert stat.S_IMODE((deployment / name).stat().st_mode) == 0o600
    before = (deployment / "secret.json").read_bytes()
    assert_one_line_error(
        *run(
            capsys,
            "init",
            str(deployment),
            "--servers",
            SERVERS_TEXT,
            "--vip",
            "10.99.0.1",
            "--chain-length",
            "10",
            "--m",
            "6",
            "--tick",
            "1",
        ),
        "refusing to overwrite",
    )
    assert (deployment / "secret.json").read_bytes() == before


def test_deployment_schedule_matches_bundle_schedule(deployment, tmp_path, capsys):
    bundle = tmp_path / "alice.bundle"
    status, _, err = subscribe(capsys, deployment, "alice", "10.0.0.50", str(bundle), until=100)
    assert status == 0, err
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    _, from_deployment, _ = run(
        capsys, "schedule", "--deployment", str(deployment), "--json", "--count", "100"
    )
    _, from_bundle, _ = run(capsys, "schedule", "--bundle", str(bundle), "--json", "--count", "200")
    assert from_deployment == from_bundle
    assert_one_line_error(
        *run(capsys, "schedule", "--bundle", str(bundle), "--from", "101"),
        "after the last key held",
    )
    assert_one_line_error(
        *run(capsys, "schedule", "--bundle", str(bundle), "--m", "3"), "cannot be combined"
    )


def test_inspect_never_prints_secrets(deployment, tmp_path, capsys):
    bundle = tmp_path / "alice.bundle"
    subscribe(capsys, deployment, "alice", "10.0.0.50", str(bundle), until=100)
    secret = json.loads((deployment / "secret.json").read_text())
    bundle_doc = json.loads(bundle.read_text())
    secrets = [
        secret["chain_key"],
        secret["group_key"],
        bundle_doc["channel_key"],
        bundle_doc["chain_key"],
    ]
    for path in (deployment, bundle, deployment / "deployment.json"):
        for flags in ([], ["--json"]):
            status, out, err = run(capsys, "inspect", str(path), *flags)
            assert status == 0, err
            assert not any(s in out for s in secrets)
    _, out, _ = run(capsys, "inspect", str(deployment), "--json")
    info = json.loads(out)
    assert info["clients"][0]["name"] == "alice"
    assert info["servers"] == SERVERS_TEXT.split(",")


def test_subscribe_errors(deployment, tmp_path, capsys):
    out = tmp_path / "b"
    assert_one_line_error(
        *subscribe(capsys, deployment, "a", "10.0.0.5", str(out), until=1001),
        "past the chain",
    )
    assert_one_line_error(
        *subscribe(
            capsys,
            deployment,
            "a b",
            "10.0.0.5",
            str(out),
        ),
        "client name",
    )
    assert_one_line_error(
        *subscribe(
            capsys,
            deployment,
            "a",
            "nope",
            str(out),
        ),
        "not an IP address",
    )
    assert_one_line_error(
        *subscribe(capsys, tmp_path / "none", "a", "10.0.0.5", str(out)),
        "does not exist",
    )
    assert not out.exists()
    subscribe(
        capsys,
        deployment,
        "a",
        "10.0.0.5",
        str(out),
    )
    assert_one_line_error(
        *subscribe(
            capsys,
            deployment,
            "a",
            "10.0.0.5",
            str(tmp_path / "c"),
        ),
        "already subscribed",
    )


def test_subscribe_refuses_an_address_already_subscribed(deployment, tmp_path, capsys):
    def subscribe_seven(name, out):
        return subscribe(capsys, deployment, name, "10.0.0.7", tmp_path / out)

    subscribe_seven("first", "b1")
    assert_one_line_error(*subscribe_seven("second", "b2"), "already subscribed as client 'first'")
    assert not (tmp_path / "b2").exists()
    # Once the first is revoked, its address may be given to another client.
    assert run(capsys, "revoke", str(deployment), "first", "--no-notify")[0] == 0
    subscribe_seven("second", "b2")
    assert (tmp_path / "b2").exists()


def test_revoke(deployment, tmp_path, capsys):
    subscribe(
        capsys,
        deployment,
        "alice",
        "10.0.0.50",
        str(tmp_path / "b"),
    )
    assert run(capsys, "revoke", str(deployment), "alice", "--no-notify")[0] == 0
    _, out, _ = run(capsys, "inspect", str(deployment), "--json")
    assert json.loads(out)["clients"][0]["revoked"] is True
    assert_one_line_error(*run(capsys, "revoke", str(deployment), "alice"), "already revoked")
    assert_one_line_error(*run(capsys, "revoke", str(deployment), "bob"), "no client named")


def test_tampered_client_list_is_reported(deployment, tmp_path, capsys):
    sealed = deployment / "clients.sealed"
    data = bytearray(sealed.read_bytes())
    data[-1] ^= 1
    sealed.write_bytes(bytes(data))
    assert_one_line_error(
        *subscribe(
            capsys,
            deployment,
            "a",
            "10.0.0.5",
            str(tmp_path / "b"),
        ),
        "failed authentication",
    )


def test_keys_split_combine_refresh(deployment, tmp_path, capsys):
    shares = tmp_path / "shares"
    assert (
        run(
            capsys,
            "keys",
            "split",
            str(deployment),
            "--threshold",
            "2",
            "--shares",
            "3",
            "--out",
            str(shares),
        )[0]
        == 0
    )
    files = sorted(shares.iterdir())
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert run(capsys, "keys", "combine", str(files[0]), str(files[2]))[0] == 0
    assert_one_line_error(*run(capsys, "keys", "combine", str(files[0])), "need 2 shares")
    fresh = tmp_path / "fresh"
    assert run(capsys, "keys", "refresh", *map(str, files), "--out", str(fresh))[0] == 0
    fresh_files = sorted(fresh.iterdir())
    assert_one_line_error(
        *run(capsys, "keys", "combine", str(files[0]), str(fresh_files[1])), "different generations"
    )
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "deployment.json").write_bytes((deployment / "deployment.json").read_bytes())
    assert (
        run(capsys, "keys", "combine", *map(str, fresh_files[:2]), "--into", str(restored))[0] == 0
    )
    assert (restored / "secret.json").read_bytes() == (deployment / "secret.json").read_bytes()
    assert_one_line_error(
        *run(capsys, "keys", "combine", *map(str, fresh_files[:2]), "--into", str(restored)),
        "refusing to overwrite",
    )


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "roam_cli.main", *VECTOR, "--count", "1", "--json"],
        input=CHAIN_KEY_HEX,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"] == "10.0.0.3:80"


def test_building_the_command_line_imports_no_shim_module() -> None:
    """Every ``roam`` command builds the whole parser. A shim module imported there (the
    relay, live mode, the event loop) cost every command 0.4 s on this machine, and a lab
    that waits for a roam with ``roam schedule`` then missed its moment."""
    code = (
        "import json, sys, roam_cli.main as m; m.build_parser(); "
        "print(json.dumps(sorted(x for x in sys.modules if x.split('.')[0] in "
        "('proxy', 'client_shim', 'labs', 'asyncio', 'uvloop', 'pyroute2', 'scapy'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == ["proxy", "proxy.live_relays"]
