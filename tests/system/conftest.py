"""Fixtures of the system tests: root check, and labs that are checked for leftovers.

``netns`` is a bare network namespace of the test's own, deleted afterwards.
``lab_factory(topo)`` starts a lab and, after the test, closes it and fails the test if
anything of it remains: a namespace, a process it started, its record, its work directory or an
nftables table with its name in the root namespace. ``lab`` is one such lab, of the topology
given by indirect parametrisation (default: ``PoolTopo(servers=2, clients=1, outsiders=1)``).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from labs import Lab, LabError, PoolTopo, Topo
from labs.naming import NETNS_DIR

LabFactory = Callable[..., Lab]

_namespaces = itertools.count()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test marked ``known_timing(cause=...)`` runs once more if it fails; no other test does.

    Each such marker names a timing problem that is understood but not fixed yet (listed in
    docs/reliability.md, with the issue that fixes it); the rerun is reported (``-ra``: R)."""
    for item in items:
        marker = item.get_closest_marker("known_timing")
        if marker is None:
            continue
        if not marker.kwargs.get("cause"):
            raise pytest.UsageError(f"{item.nodeid}: known_timing needs cause='...'")
        item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=2))


@pytest.fixture(autouse=True)
def _system_tests_need_root(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("system") is not None and os.geteuid() != 0:
        pytest.skip("system test: needs root (network namespaces, tc, nftables); run as root")


@pytest.fixture
def netns() -> Iterator[str]:
    """A new, empty network namespace, deleted after the test (with all that is in it).

    The name carries this process's id, so that parallel runs never share one."""
    name = f"roamk{os.getpid()}x{next(_namespaces)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)


def lab_leftovers(lab: Lab) -> list[str]:
    """Everything of ``lab`` that still exists, one line each (empty when fully removed)."""
    found = []
    lab_id = lab.id
    if NETNS_DIR.is_dir():
        found += [
            f"namespace {entry.name}"
            for entry in NETNS_DIR.iterdir()
            if entry.name.startswith(lab_id.namespace_prefix)
        ]
    found += [f"process {p.pid} ({p.args[4]})" for p in lab.processes if p.poll() is None]
    if lab_id.record_path.exists():
        found.append(f"record {lab_id.record_path}")
    if lab.workdir.exists():
        found.append(f"work directory {lab.workdir}")
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    if lab_id.nft_table in tables:
        found.append(f"nft table {lab_id.nft_table} in the root namespace")
    return found


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """Start labs for a test; close and check them for leftovers afterwards."""
    started: list[Lab] = []

    def make(topo: Topo, **options: Any) -> Lab:
        lab = Lab(topo, **options)
        started.append(lab)
        return lab.start()

    yield make
    problems = []
    for lab in reversed(started):
        try:
            lab.close()
        except LabError as error:
            problems.append(str(error))
    for lab in started:
        if lab.state != "closed":
            continue
        problems += [f"lab {lab.id} left {item}" for item in lab_leftovers(lab)]
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_factory: LabFactory) -> Lab:
    topo = getattr(request, "param", None) or PoolTopo(servers=2, clients=1, outsiders=1)
    return lab_factory(topo)
