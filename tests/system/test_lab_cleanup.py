"""Cleanup that survives crashes: bad input creates nothing, signals clean up, and
``roam lab cleanup`` removes the labs of dead owners and nothing else."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labs import ConfigError, Lab, LinkParams, PaperTopo, Topo, netem_available
from labs.clients import ping
from labs.linkcheck import LinkTopo
from labs.naming import NETNS_DIR, LabId

pytestmark = pytest.mark.system

LabFactory = Callable[..., Lab]  # the lab_factory fixture (tests/system/conftest.py)

REPO = Path(__file__).resolve().parents[2]
OWNER_READY_TIMEOUT_S = 30.0

# A lab owner in another process: builds a lab, starts a program in it, reports, then sleeps
# (bounded) until it is killed.
OWNER_SCRIPT = """
import json, sys, time
from labs import Lab, PoolTopo
with Lab(PoolTopo(servers=2, clients=1)) as lab:
    sleeper = lab["s1"].popen(["sleep", "120"])
    print(json.dumps({"lab_id": str(lab.id), "namespaces": lab.namespaces,
                      "workdir": str(lab.workdir), "pid": sleeper.pid}), flush=True)
    time.sleep(60)
"""


def own_namespaces() -> set[str]:
    prefix = f"roam-{os.getpid()}-"
    return (
        {e.name for e in NETNS_DIR.iterdir() if e.name.startswith(prefix)}
        if NETNS_DIR.is_dir()
        else set()
    )


def start_owner() -> tuple[subprocess.Popen[str], dict[str, Any]]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert owner.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(owner.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=OWNER_READY_TIMEOUT_S):
            owner.kill()
            owner.wait(timeout=10)
            pytest.fail("the lab owner did not report within 30 s")
    line = owner.stdout.readline()
    if not line:
        owner.wait(timeout=10)
        pytest.fail(f"the lab owner failed: {owner.stderr.read() if owner.stderr else ''}")
    return owner, json.loads(line)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def run_cleanup_cli() -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "roam_cli.main", "lab", "cleanup", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize(
    "make_params",
    [
        lambda: LinkParams(rate_mbit=-1),
        lambda: LinkParams(rate_mbit=0),
        lambda: LinkParams(loss_pct=150),
        lambda: LinkParams(loss_pct=float("nan")),
        lambda: LinkParams(delay_ms=-5),
        lambda: LinkParams(burst_kb=10),
        lambda: LinkParams(rate_mbit=10, queue_packets=0),
        lambda: LinkParams(rate_mbit=True),
    ],
)
def test_invalid_link_parameters_fail_before_any_namespace(make_params: Any) -> None:
    class Bad(Topo):
        def build(self) -> None:
            self.add_link(self.add_host("a"), self.add_host("b"), make_params())

    before = own_namespaces()
    with pytest.raises(ConfigError, match="invalid link parameters"):
        Lab(Bad()).start()
    assert own_namespaces() == before
    with pytest.raises(ConfigError):
        PaperTopo(rate_mbit=-2)
    assert own_namespaces() == before


def test_delay_without_netem_is_refused_before_any_namespace() -> None:
    if netem_available():
        pytest.skip("this kernel has netem: delays are applied")
    before = own_namespaces()
    with pytest.raises(ConfigError, match="no netem"):
        Lab(LinkTopo(LinkParams(rate_mbit=10, delay_ms=20)))
    assert own_namespaces() == before


def test_sigkilled_owner_is_cleaned_up_and_live_lab_untouched(lab_factory: LabFactory) -> None:
    live = lab_factory(LinkTopo(LinkParams()))
    owner, report = start_owner()
    dead_id = LabId.parse(report["lab_id"])
    try:
        assert all((NETNS_DIR / name).exists() for name in report["namespaces"])
        assert pid_alive(report["pid"])
        owner.kill()  # SIGKILL: no handler, no atexit, no __exit__
        owner.wait(timeout=10)
        # the crash left everything behind
        assert all((NETNS_DIR / name).exists() for name in report["namespaces"])
        assert dead_id.record_path.exists()
        assert pid_alive(report["pid"])

        result = run_cleanup_cli()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=10)
    cleaned = {lab["lab_id"]: lab for lab in result["labs"]}
    assert str(dead_id) in cleaned
    assert sorted(cleaned[str(dead_id)]["namespaces"]) == sorted(report["namespaces"])
    assert report["pid"] in cleaned[str(dead_id)]["pids"]
    assert str(live.id) not in cleaned
    assert not any((NETNS_DIR / name).exists() for name in report["namespaces"])
    assert not pid_alive(report["pid"])
    assert not dead_id.record_path.exists()
    assert not Path(report["workdir"]).exists()
    # the live lab is untouched and still works
    assert all((NETNS_DIR / name).exists() for name in live.namespaces)
    assert live.id.record_path.exists()
    assert ping(live["a"], live["b"].address, count=2, interval_s=0.05).received == 2
    # a second run finds nothing of ours to do
    again = run_cleanup_cli()
    assert str(live.id) not in {lab["lab_id"] for lab in again["labs"]}


def test_sigterm_to_owner_removes_its_lab() -> None:
    owner, report = start_owner()
    try:
        owner.send_signal(signal.SIGTERM)
        owner.wait(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=10)
    # the previous (default) handler ran after cleanup: the owner died of SIGTERM
    assert owner.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while pid_alive(report["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(report["pid"])
    assert not any((NETNS_DIR / name).exists() for name in report["namespaces"])
    assert not LabId.parse(report["lab_id"]).record_path.exists()
    assert not Path(report["workdir"]).exists()


def interrupt_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)  # the handler runs between bytecodes, long before this ends


def test_sigint_handler_is_chained_and_restored() -> None:
    # Python's own handler (KeyboardInterrupt) as the one to chain to, whatever this process
    # inherited: a test run started in the background of a shell inherits SIGINT ignored, and
    # an ignored signal is (rightly) not turned into KeyboardInterrupt.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        previous = signal.getsignal(signal.SIGINT)
        with Lab(LinkTopo(LinkParams())) as lab:
            assert signal.getsignal(signal.SIGINT) is not previous
            with pytest.raises(KeyboardInterrupt):
                interrupt_self()
            assert lab.state == "closed"  # closed by the handler, before KeyboardInterrupt
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, inherited)
