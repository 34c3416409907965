"""The schedule as it runs now, not as it was created.

A deployment's ``deployment.json`` and a bundle hold the schedule as issued. Threat changes and
triggers move it at run time; what this host knows of them is recorded in
``DIR/state/*.json`` (the operator's ``operator.json``, written by ``roam threat``, ``trigger``
and ``resync``, or a server's own state file) and, for a client, in ``BUNDLE.state`` (its key
extensions and m schedule, written by the client shim). ``inspect``, ``schedule`` and
``subscribe`` read them so that what they print and issue matches what the servers run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from migrate.errors import RoamError
from migrate.hashchain import KeyChain
from migrate.kernel.deployment import DeploymentDir
from migrate.pool import PoolState
from migrate.registration import Bundle, Deployment, DeploymentSecret
from migrate.schedule import EpochSchedule, MSchedule


def latest_state(directory: Path) -> PoolState | None:
    """The most recent view of the pool's run-time state this host has."""
    candidates = sorted((directory / "state").glob("*.json"), key=lambda path: path.stat().st_mtime)
    for path in reversed(candidates):
        try:
            return PoolState.decode(path.read_bytes())
        except RoamError:
            continue
    return None


def recorded_state(directory: DeploymentDir, deployment: Deployment) -> PoolState | None:
    state = latest_state(directory.path)
    if state is None or state.deployment_id != deployment.deployment_id:
        return None
    return state


def current_m(directory: DeploymentDir, deployment: Deployment) -> MSchedule:
    """The m schedule with every recorded threat change."""
    state = recorded_state(directory, deployment)
    return deployment.m if state is None or state.m is None else state.m


def deployment_schedule(
    directory: DeploymentDir, deployment: Deployment, secret: DeploymentSecret
) -> EpochSchedule:
    """The deployment's schedule with the recorded threat changes and last trigger."""
    state = recorded_state(directory, deployment)
    params = replace(deployment.schedule_params(), m=current_m(directory, deployment))
    anchor = None if state is None else state.anchor
    return EpochSchedule(secret.chain(deployment.chain_length), params, anchor)


def bundle_state_path(bundle_path: Path) -> Path:
    """Where the client shim keeps a bundle's key extensions by default."""
    return bundle_path.with_name(bundle_path.name + ".state")


def bundle_schedule(bundle: Bundle, state_path: Path | None) -> EpochSchedule:
    """The bundle's schedule with the key extensions and m changes its client recorded in
    ``state_path`` (if it exists), as the client shim computes it at start."""
    from client_shim.state import load_state

    if state_path is None or not state_path.exists():
        return EpochSchedule(bundle.chain(), bundle.schedule_params())
    saved = load_state(state_path, bundle)
    # The bundle's pebble index holds for its own key only.
    index = bundle.pebble_index() if saved.key_index == bundle.key_index else None
    chain = KeyChain(saved.chain_key, saved.key_index, index)
    return EpochSchedule(chain, replace(bundle.schedule_params(), m=saved.m))
