"""Revocation reaches every server despite lost control datagrams and a server that was down.

Three servers, each with its own copy of the deployment directory (as on separate machines:
the operator's ``roam revoke`` changes only the operator's copy), two subscribed clients.
One server's shim is stopped (by its pid), half of all group-control datagrams are dropped by
the kernel (nft ``numgen random``) on every host, and the operator revokes c2. Every live
server must refuse c2 within the stated bound (``migrate.antientropy``: 20 sync periods at
50 % loss), and the stopped server, started again from its own stale copy, within the bound of
its return; c1 keeps being served throughout.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from labs import Lab, PoolTopo
from labs.faults import control_loss
from labs.roaming import RoamingLab, ShimProcess
from labs.waiting import wait_for
from migrate.antientropy import CONVERGENCE_PERIODS
from roam_cli.commands.registration import REVOKE_ATTEMPTS

pytestmark = pytest.mark.system

SYNC_PERIOD_S = 0.5
BOUND_S = CONVERGENCE_PERIODS * SYNC_PERIOD_S * 1.2  # periods are jittered up to +20 %
SLACK_S = 5.0  # a loaded two-CPU machine: processes start and schedule late


def revoked_at(shim: ShimProcess, client_id: int) -> float | None:
    """When the server applied the revocation of ``client_id`` (directly or by anti-entropy)."""
    for e in shim.events():
        if (e["event"] == "control_applied" and e["message"] == "Revoke") or (
            e["event"] == "control_synced" and e["detail"] == f"client {client_id} revoked"
        ):
            return float(e["ts"])
    return None


def started_at(shim: ShimProcess) -> float | None:
    return next((float(e["ts"]) for e in shim.events() if e["event"] == "start"), None)


def fetch(roaming: RoamingLab, host: str) -> int:
    return (
        roaming.lab[host]
        .run(["curl", "-s", "-o", "/dev/null", "--max-time", "2", roaming.url("/whoami")])
        .returncode
    )


def allowed_set(roaming: RoamingLab, shim: ShimProcess) -> str:
    status: dict[str, Any] = json.loads(shim.status_path.read_text())
    listing = roaming.lab[shim.host].run(
        ["nft", "list", "set", "ip", status["table"], "allowed"], check=True
    )
    return listing.stdout


def test_a_revocation_reaches_every_server_through_loss_and_a_server_that_was_down() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    lab = Lab(PoolTopo(servers=3, clients=2)).start()
    try:
        roaming = RoamingLab(
            lab,
            tick=0.5,
            m=2,
            update_period=0.5,
            server_dirs=True,
            server_extra=("--sync-period", str(SYNC_PERIOD_S)),
        )
        roaming.start()  # a client shim on c1 and on c2
        roaming.wait_for_schedule(0.5)
        inspect = json.loads(roaming.roam("inspect", str(roaming.deployment_dir), "--json").stdout)
        c2_id = next(c["client_id"] for c in inspect["clients"] if c["name"] == "c2")
        wait_for("c2 served before", lambda: fetch(roaming, "c2") == 0, 10)

        down = roaming.server_hosts[2]
        live = roaming.server_hosts[:2]
        roaming.servers[down].stop()  # SIGTERM to its pid: it removes its rules and exits
        with control_loss(roaming, 50) as figures:
            sent = time.time()
            result = roaming.operate("revoke", str(roaming.deployment_dir), "c2")
            print(result.stdout)
            delays = {}
            for host in live:
                at = wait_for(
                    f"{host} revokes c2",
                    lambda h=host: revoked_at(roaming.servers[h], c2_id),  # type: ignore[misc]
                    REVOKE_ATTEMPTS + BOUND_S + SLACK_S,
                )
                delays[host] = at - sent
            shim = roaming.start_server(down)
            back = wait_for("the stopped server returns", lambda: started_at(shim), 30)
            caught_up = wait_for(
                f"{down} catches up", lambda: revoked_at(shim, c2_id), BOUND_S + SLACK_S
            )
            delays[down] = caught_up - back
        print(
            f"control datagrams {figures['seen']}, dropped {figures['dropped']}; revocation "
            f"applied after (s): {', '.join(f'{h} {d:.2f}' for h, d in delays.items())} "
            f"({down} counted from its return); stated bound {BOUND_S:.1f} s"
        )
        assert figures["dropped"] > 0
        assert [e for e in shim.events() if e["event"] == "control_applied"] == []
        # Every server refuses c2 at its gate, and lets c1 in.
        c1_address, c2_address = (str(lab[h].address) for h in ("c1", "c2"))
        for host in roaming.server_hosts:
            listed = allowed_set(roaming, roaming.servers[host])
            assert c2_address not in listed, (host, listed)
            assert c1_address in listed, (host, listed)
        # Through the VIP, over several epochs (and roams): c1 is served, c2 is not.
        for _ in range(4):
            assert fetch(roaming, "c2") != 0, "the revoked client was served"
            # On failure, what c1's shim did lately (the cause of the one failure seen was
            # never read: its output was lost).
            started = time.time()
            code = fetch(roaming, "c1")
            if code != 0:
                # The whole story on stdout (an assertion message is cut short, and so is a
                # long output: the routine clock updates are left out).
                for name, shim in [("c1", roaming.clients["c1"]), *roaming.servers.items()]:
                    for e in shim.events():
                        if float(e["ts"]) >= started - 3 and e["event"] != "update_accepted":
                            print(name, json.dumps(e, sort_keys=True))
            assert code == 0, "the legitimate client was refused"
        roaming.stop()
    finally:
        lab.close()
