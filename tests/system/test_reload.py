"""A client subscribed while the pool runs is let in by ``roam reload`` (SIGHUP to each server
shim), and a download in progress through the pool is not disturbed by it.

Three servers, two client hosts; only c1 is subscribed at the start. The first epoch lasts at
least 30 s (tick 30, m 1), so nothing roams during the test: what it sees is the reload alone.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from labs.faults import live_lab, reaped, start_download
from labs.params import LinkParams
from labs.roaming import RoamingLab, roam_argv
from labs.waiting import wait_for

pytestmark = pytest.mark.system

SIZE = 3 * 1024 * 1024
RATE = "150K"  # about 20 s for the file (the link paces it too), within the first epoch


def reaches_service(roaming: RoamingLab, host: str) -> bool:
    result = roaming.lab[host].run(
        ["curl", "-s", "-o", "/dev/null", "--max-time", "2", roaming.url("/whoami")]
    )
    return result.returncode == 0


def test_reload_lets_a_new_client_in_without_disturbing_a_download() -> None:
    data = os.urandom(SIZE)
    # Links of 1 Mbit/s pace the download (at least 25 s): curl's --limit-rate alone let the
    # file through before the reload in some runs.
    with live_lab(
        LinkParams(rate_mbit=1), clients=2, tick=30.0, m=1, content={"file": data}
    ) as roaming:
        roaming.client_hosts = ["c1"]  # c2 is subscribed later, while the pool runs
        roaming.start()
        roaming.wait_for_schedule()
        out = roaming.workdir / "file.out"
        with reaped(start_download(roaming, "file", RATE, out)) as curl:
            wait_for(
                "the download's first bytes", lambda: out.exists() and out.stat().st_size > 0, 20
            )
            roaming.subscribe("c2")
            roaming.start_client("c2")
            roaming.wait_ready()
            # Subscribed, its shim running, but the servers read their list at start.
            assert not reaches_service(roaming, "c2")
            for host in roaming.server_hosts:
                result = roaming.lab[host].run(roam_argv("reload"), timeout=60)
                assert result.returncode == 0, result.stderr
                assert "SIGHUP" in result.stdout
            for host, shim in roaming.servers.items():
                wait_for(
                    f"{host} reloaded",
                    lambda shim=shim: any(
                        e["event"] == "clients_reloaded" and e["added"] == ["c2"]
                        for e in shim.events()
                    ),
                    10,
                )
            assert curl.poll() is None, "the download should still be running at the reload"
            wait_for("c2 reaches the service", lambda: reaches_service(roaming, "c2"), 15)
            assert curl.wait(timeout=120) == 0, curl.stderr.read() if curl.stderr else ""
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert all(shim.running() for shim in roaming.servers.values())
