"""Prometheus metrics (``--metrics HOST:PORT``) of real shims during a paced download across
roams: the text parses with prometheus-client's parser, and the figures agree with the shims'
JSON logs (hand-overs by outcome, re-incarnations) and with the schedule (exactly one open gate
in the middle of an epoch)."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labs.faults import handoffs, live_lab, shim_problems
from labs.params import LinkParams
from labs.roaming import RoamingLab

pytestmark = pytest.mark.system

METRICS = "127.0.0.1:9464"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(pool: RoamingLab, host: str) -> Samples:
    """``/metrics`` of the shim on ``host``, from inside its namespace, parsed."""
    result = pool.lab[host].run(
        ["curl", "-sS", "--fail", "--max-time", "5", f"http://{METRICS}/metrics"], timeout=10
    )
    assert result.returncode == 0, f"{host}: {result.stderr}"
    found: Samples = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {
        dict(labels)[label]: value
        for (metric, labels), value in samples.items()
        if metric == name and value
    }


def gates_mid_epoch(pool: RoamingLab, epochs: list[dict[str, Any]]) -> list[float]:
    """Every server's ``roam_gate_open``, scraped well inside one epoch (away from the window
    overlaps around boundaries: delta before and delta + gamma after)."""
    for _ in range(40):
        now = time.time()
        current = next(e for e in epochs if e["start"] <= now < e["start"] + e["length"])
        steady_from, steady_until = current["start"] + 0.35, current["start"] + current["length"]
        if now < steady_from:
            time.sleep(steady_from - now)
        gates = [scrape(pool, host)[("roam_gate_open", ())] for host in pool.server_hosts]
        # Only a scrape that ended before the next boundary's window opens counts.
        if time.time() < steady_until - 0.15:
            return gates
        time.sleep(max(0.0, steady_until - time.time()))
    raise AssertionError("no scrape fitted inside an epoch")


def test_metrics_agree_with_the_logs_during_a_download_across_roams() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    data = os.urandom(24 * 1024 * 1024)
    with live_lab(
        LinkParams(rate_mbit=72),
        tick=1.0,
        m=1,
        content={"big": data},
        min_switches=4,
        switch_window=12.0,
        server_extra=("--metrics", METRICS),
        client_extra=("--metrics", METRICS),
    ) as pool:
        pool.lab["c1"].run(["ip", "link", "set", "lo", "up"], check=True)
        pool.start()
        pool.wait_for_schedule(0.2)
        out = pool.workdir / "big.out"
        download = pool.lab["c1"].popen(
            ["curl", "-sS", "--limit-rate", "2M", "-o", str(out), pool.url("/big")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # During the download: every shim answers, in the text format.
            during = {host: scrape(pool, host) for host in [*pool.server_hosts, "c1"]}
            assert during["c1"][("roam_key_epochs_left", ())] > 0
            assert sum(during[h][("roam_connections", ())] for h in pool.server_hosts) >= 1
            assert download.wait(timeout=120) == 0, download.stderr
        finally:
            if download.poll() is None:
                download.kill()
                download.wait()
        assert out.read_bytes() == data
        # Steady state: no hand-over runs after the download ended.
        epochs = pool.schedule(1, 1000)
        assert sorted(gates_mid_epoch(pool, epochs)) == [0.0, 0.0, 1.0]

        client = scrape(pool, "c1")
        logged = Counter(h["outcome"] for h in handoffs(pool))
        assert logged["migrated"] >= 2, logged
        assert labelled(client, "roam_handoffs_total", "outcome") == dict(logged)
        assert client[("roam_handoff_pause_seconds_count", ())] == sum(logged.values())
        accepted = sum(1 for e in pool.clients["c1"].events() if e["event"] == "update_accepted")
        # Updates keep coming between the scrape and reading the log: never fewer in the log.
        assert 0 < client[("roam_updates_accepted_total", ())] <= accepted

        servers = {host: scrape(pool, host) for host in pool.server_hosts}
        for host, samples in servers.items():
            reincarnated = sum(
                1 for e in pool.servers[host].events() if e["event"] == "reincarnated"
            )
            ready = samples[("roam_reincarnations_total", (("outcome", "ready"),))]
            assert ready == reincarnated, f"{host}: metric {ready}, log {reincarnated}"
            # Scraped one after the other: a boundary may pass between two scrapes.
            assert abs(samples[("roam_epoch", ())] - client[("roam_epoch", ())]) <= 1
            assert samples[("roam_updates_sent_total", ())] > 0
            # The closed gate dropped nothing of ours: a gate counter exists and reads.
            assert ("roam_gate_dropped_packets_total", ()) in samples
        migrated_in = sum(
            s[("roam_reincarnations_total", (("outcome", "ready"),))] for s in servers.values()
        )
        assert migrated_in == logged["migrated"]
        sent = sum(
            s[("roam_relay_bytes_total", (("direction", "service_to_client"),))]
            for s in servers.values()
        )
        assert sent > 0
        pool.stop()
        assert shim_problems(pool) == []
