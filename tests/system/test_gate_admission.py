"""Who the gate lets in, as time passes and as outsiders spoof (issue 12, finding 2).

* A client subscribed until a near epoch finds the active server by probing every server's
  service port directly while its subscription runs, and finds none once it has expired: the
  gates' sets of admissible addresses follow the epochs, not only the start of the shims.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from labs import Lab, PoolTopo
from labs.roaming import RoamingLab

pytestmark = pytest.mark.system


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")


@contextmanager
def pool(**options: Any) -> Iterator[RoamingLab]:
    lab = Lab(PoolTopo(servers=2, clients=1, outsiders=1)).start()
    try:
        roaming = RoamingLab(lab, **options)
        try:
            yield roaming
        finally:
            roaming.stop()
    finally:
        lab.close()


def events(roaming: RoamingLab, name: str) -> list[dict[str, Any]]:
    return [e for s in roaming.servers.values() for e in s.events() if e["event"] == name]


def probe(roaming: RoamingLab, host: str) -> str | None:
    """From c1, straight to ``host``'s service port (not through the VIP): the name of the
    server that answered, or ``None`` if nothing did."""
    address = roaming.lab[host].address
    result = roaming.lab["c1"].run(
        ["curl", "-s", "--max-time", "0.6", f"http://{address}/whoami"], timeout=10
    )
    return result.stdout.strip() if result.returncode == 0 else None


def wait_until(when: float) -> None:
    time.sleep(max(0.0, when - time.time()))


def test_an_expired_client_finds_no_server_by_probing() -> None:
    until = 5
    with pool(
        tick=2.0, m=1, migration="reconnect", subscribe_options={"until-epoch": str(until)}
    ) as roaming:
        roaming.start()
        roaming.wait_for_schedule(0.1)
        epochs = {e["epoch"]: e for e in roaming.schedule(1, until + 8)}
        margin = roaming.delta + roaming.gamma + 0.15
        # While subscribed: in epoch ``until - 1`` (away from its edges), exactly the active
        # server answers.
        before = epochs[until - 1]
        wait_until(before["start"] + margin)
        began = time.time()
        answered = {host for host in roaming.server_hosts if probe(roaming, host) == host}
        assert time.time() < before["start"] + before["length"] - roaming.delta, (
            "the probes ran past the epoch (machine too slow)"
        )
        assert began >= before["start"]
        assert answered == {roaming.host_of(before["server"])}, answered
        # Expired: from the first epoch whose key it does not hold, on every server, for 12
        # probes over several epochs.
        wait_until(epochs[until + 1]["start"] + margin)
        answers = [probe(roaming, host) for _round in range(6) for host in roaming.server_hosts]
        assert answers == [None] * 12, answers
        # Every gate said so, and the updates stopped.
        skipped = [
            e for e in events(roaming, "update_skipped") if e["error"] == "SubscriptionExpiredError"
        ]
        assert {e["client"] for e in skipped} == {"c1"}
        assert len(skipped) == len(roaming.servers), skipped
