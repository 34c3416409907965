"""An eavesdropper on the client's link cannot tell the next server from migration-port traffic
(issue 12, finding 6): real ``roam`` shims in a live lab, tcpdump on the client's interface,
several roams of a keep-alive connection; the figures come from ``labs.traffic``."""

from __future__ import annotations

import os

import pytest

from labs.traffic import run

pytestmark = [pytest.mark.system, pytest.mark.slow]

SHARE_TOLERANCE = 0.1  # next-server share within 1/N +- this (the windows cut slots at edges)


def test_the_next_server_gets_one_share_of_same_size_datagrams_before_each_roam() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    found = run(None)  # the client's defaults
    leak = found["leak"]
    print(f"\n{leak}\nhand-overs {found['handoffs']}")
    assert found["problems"] == []
    assert leak.roams >= 5, leak
    # Every datagram each way has one size: size tells nothing.
    assert len(leak.sizes_out) == 1, leak.sizes_out
    assert len(leak.sizes_in) == 1, leak.sizes_in
    # In the 4 s before each roam, the next server got its 1/N share of what the client sent,
    # and the eavesdropper's best guess does no better than guessing blindly.
    assert abs(leak.next_share - 1 / leak.servers) <= SHARE_TOLERANCE, leak
    assert abs(leak.next_share_bytes - 1 / leak.servers) <= SHARE_TOLERANCE, leak
    assert leak.accuracy <= leak.baseline + 0.2, leak
    # And the hand-overs still work.
    assert found["client_ok"], found["handoffs"]
    assert found["handoffs"].get("migrated", 0) >= 5, found["handoffs"]
    assert set(found["handoffs"]) <= {"migrated", "closed"}, found["handoffs"]
