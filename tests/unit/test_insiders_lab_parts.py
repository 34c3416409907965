"""The pieces of ``roam lab insiders`` that need no lab: the attacker's aim from a leaked
bundle and state, and the experiment's options (one-line errors)."""

from __future__ import annotations

import pytest

from client_shim.state import ClientState
from labs.experiments.insider_attack import insider_target
from labs.experiments.insiders import InsidersOptions
from migrate.activeset import ActiveSchedule
from migrate.errors import ConfigError
from migrate.hashchain import KeyChain, hash_down
from migrate.kernel.deployment import DeploymentDir, load_bundle
from roam_cli.recorded import deployment_schedule
from tests.unit.cli import run, subscribe

from .test_cli_active import init


@pytest.fixture
def leaked(tmp_path, capsys):
    directory = tmp_path / "dep"
    status, _, err = init(capsys, directory, "--active", "3")
    assert status == 0, err
    bundle = tmp_path / "c1.bundle"
    status, _, err = subscribe(capsys, directory, "c1", "10.0.1.1", str(bundle), until=20)
    assert status == 0, err
    return directory, bundle


def test_the_attacker_aims_at_the_insiders_server_while_its_keys_last(leaked):
    directory, bundle_path = leaked
    dep = DeploymentDir(directory)
    truth = ActiveSchedule(deployment_schedule(dep, dep.deployment(), dep.secret()), 3)
    bundle = load_bundle(bundle_path)
    state = bundle_path.with_name(bundle_path.name + ".state")  # none yet: the bundle's keys
    for epoch in range(1, 21):
        info = truth.schedule.epoch(epoch)
        found = insider_target(bundle, state, info.start + info.length / 2)
        assert isinstance(found, tuple)
        assert found[0].index == epoch
        assert found[1] == truth.assigned(epoch, bundle.client_id)
    after = truth.schedule.epoch(21)
    assert insider_target(bundle, state, after.start + 0.1) == 20  # no key: nothing to aim at


def test_the_attacker_follows_the_insiders_key_extensions(leaked):
    directory, bundle_path = leaked
    dep = DeploymentDir(directory)
    secret = dep.secret()
    truth = ActiveSchedule(deployment_schedule(dep, dep.deployment(), secret), 3)
    bundle = load_bundle(bundle_path)
    # The client shim saves an extension to K_30 (what the servers send with a lease).
    key_30 = hash_down(secret.chain(dep.deployment().chain_length).held_key, 1000 - 30)
    extended = ClientState.from_bundle(bundle)
    extended.key_index, extended.chain_key = 30, key_30
    assert KeyChain(key_30, 30).key(20) == bundle.chain_key
    state = bundle_path.with_name(bundle_path.name + ".state")
    state.write_bytes(extended.encode())
    info = truth.schedule.epoch(25)
    found = insider_target(bundle, state, info.start + 0.01)
    assert isinstance(found, tuple)
    assert found[1] == truth.assigned(25, bundle.client_id)
    assert insider_target(bundle, state, truth.schedule.epoch(31).start + 0.01) == 30


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"active": 1}, "--active must be at least 2"),
        ({"active": 7}, "--active: the number of active servers must be in 1..6"),
        ({"clients": 1}, "--clients must be an integer in 2..40"),
        ({"insider": 9}, "--insider must be an integer in 0..5"),
        ({"confidence": 1.0}, "--confidence must be below 1"),
        ({"confidence": float("nan")}, "--confidence must be in (0, 1]"),
        ({"tick_s": 0.1}, "--tick must be in (0.2, 30]"),
    ],
)
def test_bad_options_are_one_line_errors(options, text):
    with pytest.raises(ConfigError) as caught:
        InsidersOptions(**options)
    assert text in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_command_refuses_bad_input_in_one_line(capsys):
    status, out, err = run(capsys, "lab", "insiders", "--active", "1")
    assert status != 0
    assert out == ""
    assert err.count("\n") == 1
    assert "--active must be at least 2" in err
    status, _, err = run(capsys, "lab", "insiders", "--flood-pps", "50000")
    assert status != 0
    assert "must be in (0, 20000]" in err
