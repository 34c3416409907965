"""k of N with real shims (issue 17, PROTOCOL.md section 4): N = 4 servers, k = 2, three
clients with live downloads across roams. Each client's traffic reaches exactly its assigned
server in every epoch, the downloads arrive intact, no RST reaches or leaves a client while its
connection lives, and an outsider reaches nothing.

Real processes: ``roam server --migration live`` in front of python's http.server on four server
hosts, ``roam client`` on three client hosts, curl as the application, tcpdump on each client.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from labs.capture import client_resets
from labs.faults import shim_problems
from labs.lab import Lab
from labs.params import LinkParams
from labs.roaming import LISTEN_PORT, RoamingLab
from labs.topologies import PoolTopo

pytestmark = [pytest.mark.system]

# About 10 s over the 4 Mbit/s links: several roams per client. The links set the pace, not
# curl's --limit-rate (which reads the last bytes late: curl then closes its end seconds after
# the server's FIN, across a roam; tests/system/test_closed_by_server.py covers that case).
SIZE = 5 * 1024 * 1024
CLIENTS = ("c1", "c2", "c3")


def resets(capture: Path) -> list[str]:
    """The RSTs of a client's capture that could touch a connection. Left out: the client
    kernel's bare RST answering a segment that arrives after its connection closed for good
    (labs.capture.client_resets), e.g. a second acknowledgement of its FIN when the first took
    longer than its retransmission timeout: TCP's own (docs/reliability.md)."""
    return [reset.line for reset in client_resets(capture, LISTEN_PORT) if not reset.after_close]


class Epochs:
    """The deployment's epochs with their sets and each client host's server."""

    def __init__(self, roaming: RoamingLab, until: float) -> None:
        count = int((until - roaming.start_time) / roaming.tick) + 4
        self.rows = roaming.assignments(1, count)
        self.starts = [row["start"] for row in self.rows]

    def at(self, when: float) -> dict[str, Any]:
        return self.rows[max(0, bisect.bisect_right(self.starts, when) - 1)]

    def by_index(self, index: int) -> dict[str, Any]:
        return self.rows[index - 1]


def events(roaming: RoamingLab, kind: str, name: str) -> list[dict[str, Any]]:
    shims = roaming.clients if kind == "client" else roaming.servers
    return [e for shim in shims.values() for e in shim.events() if e["event"] == name]


def test_three_clients_each_reach_only_their_assigned_server_across_roams() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    data = os.urandom(SIZE)
    topo = PoolTopo(servers=4, clients=3, outsiders=1, params=LinkParams(rate_mbit=4))
    lab = Lab(topo).start()
    try:
        roaming = RoamingLab(
            lab,
            migration="live",
            tick=1.0,
            m=1,
            active=2,
            service="http",
            content={"big": data},
        )
        try:
            roaming.start()
            roaming.wait_for_schedule(0.2)
            began = time.time()
            outputs = {host: roaming.workdir / f"{host}.out" for host in CLIENTS}
            captures = {host: roaming.workdir / f"{host}.pcap" for host in CLIENTS}
            with contextlib.ExitStack() as stack:
                for host in CLIENTS:
                    stack.enter_context(
                        lab[host].capture(
                            "eth0",
                            captures[host],
                            bpf_filter=["tcp", "port", str(LISTEN_PORT)],
                            snaplen_bytes=96,
                        )
                    )
                curls = {
                    host: lab[host].popen(
                        [
                            "curl",
                            "-sS",
                            "-o",
                            str(outputs[host]),
                            roaming.url("/big"),
                        ],
                        stderr=stack.enter_context(open(roaming.workdir / f"{host}.curl", "wb")),
                    )
                    for host in CLIENTS
                }
                codes = {host: curl.wait(timeout=120) for host, curl in curls.items()}
            ended = time.time()

            # An outsider reaches no server, active or not (its address is registered nowhere).
            for host in roaming.server_hosts:
                probe = lab["o1"].run(
                    [
                        "curl",
                        "-sS",
                        "--connect-timeout",
                        "1",
                        "-o",
                        "/dev/null",
                        f"http://{lab[host].address}:{LISTEN_PORT}/big",
                    ],
                    timeout=30,
                )
                assert probe.returncode != 0, f"the outsider reached {host}"
        finally:
            roaming.stop()

        keep = os.environ.get("ROAM_TEST_ARTIFACTS")
        if keep:  # the shims' logs and captures, for a closer look
            target = Path(keep) / f"active-set-{time.time():.0f}"
            shutil.copytree(
                roaming.workdir, target, ignore=shutil.ignore_patterns("www-*", "*.out")
            )
        epochs = Epochs(roaming, ended)
        detail = {
            host: (roaming.workdir / f"{host}.curl").read_text(errors="replace") for host in CLIENTS
        }
        assert shim_problems(roaming) == []
        for host in CLIENTS:
            failed = [
                (e["epoch"], e["server"], e["outcome"], e["detail"])
                for e in roaming.clients[host].events()
                if e["event"] == "handoff" and e["outcome"] not in ("migrated", "closed")
            ]
            assert codes[host] == 0, f"{host}: {detail[host]} hand-overs not moved: {failed}"
            digest = hashlib.sha256(outputs[host].read_bytes()).digest()
            assert digest == hashlib.sha256(data).digest(), f"{host}'s download differs"
            assert resets(captures[host]) == [], host

        # The client shims aim at their assigned server in every epoch, and move only where
        # it changes: each switch is to the epoch's assigned server, and every change of the
        # assigned server while the downloads ran has its switch.
        handoffs = events(roaming, "client", "handoff")
        for host in CLIENTS:
            shim = roaming.clients[host]
            switches = {
                e["epoch"]: e["server"]
                for e in shim.events()
                if e["event"] == "switch" and "epoch" in e
            }
            for index, server in switches.items():
                assert server == epochs.by_index(index)["assigned"][host], (host, index)
            first, last = epochs.at(began)["epoch"] + 1, epochs.at(ended)["epoch"]
            changes = {
                index
                for index in range(first, last + 1)
                if epochs.by_index(index)["assigned"][host]
                != epochs.by_index(index - 1)["assigned"][host]
            }
            assert changes <= switches.keys(), (host, sorted(changes - switches.keys()))
            assert all(
                e["server"] == epochs.by_index(e["epoch"])["assigned"][host]
                for e in shim.events()
                if e["event"] == "handoff"
            )
        migrated = [e for e in handoffs if e["outcome"] == "migrated"]
        assert len(migrated) >= 3, f"only {len(migrated)} live hand-overs"
        assert all(e["outcome"] in ("migrated", "closed") for e in handoffs), handoffs

        # Server side: every re-incarnated connection came up at its client's assigned
        # server of the epoch, and each server's epochs name the clients assigned to it.
        address_of = {str(lab[host].address): host for host in CLIENTS}
        for server_host, shim in roaming.servers.items():
            listen = roaming.listen_of(server_host)
            for event in shim.events():
                if event["event"] == "reincarnated":
                    client = address_of[event["client"].rsplit(":", 1)[0]]
                    # Committed at the boundary (the epoch starting then, or just before),
                    # or late, in the epoch after it.
                    row = epochs.at(event["ts"] + roaming.delta)
                    rows = [row, epochs.by_index(max(1, row["epoch"] - 1))]
                    assert listen in [r["assigned"][client] for r in rows], (
                        server_host,
                        client,
                        row,
                    )
                if event["event"] == "epoch":
                    row = epochs.by_index(event["epoch"])
                    expected = sorted(h for h in CLIENTS if row["assigned"][h] == listen)
                    assert event["assigned"] == expected, (server_host, event)
                    assert event["active"] == (listen in row["active"])
        reincarnated = events(roaming, "server", "reincarnated")
        assert len(reincarnated) >= len(migrated)

        # The servers' attack reports are what ``roam suspects`` reads.
        ranked = roaming.roam("suspects", str(roaming.deployment_dir), "--json")
        assert json.loads(ranked.stdout)["reports"] > 0
    finally:
        lab.close()
