"""Prometheus metrics (``--metrics HOST:PORT``) of real shims during a paced download across
roams: the text parses with prometheus-client's parser, and the figures agree with the shims'
JSON logs (hand-overs by outcome, re-incarnations) and with the schedule (exactly one open gate
in the middle of an epoch)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labs.faults import handoffs, live_lab, shim_problems
from labs.params import LinkParams
from labs.roaming import RoamingLab
from labs.waiting import poll

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
    # Links of 16 Mbit/s pace the download (at least 12 s, several roams): curl's
    # --limit-rate alone sometimes lets a transfer through at full speed.
    with live_lab(
        LinkParams(rate_mbit=16),
        outsiders=1,
        tick=1.0,
        m=1,
        content={"big": data},
        min_switches=6,
        switch_window=13.0,
        server_extra=("--metrics", METRICS),
        client_extra=("--metrics", METRICS),
    ) as pool:
        pool.lab["c1"].run(["ip", "link", "set", "lo", "up"], check=True)
        pool.start()
        pool.wait_for_schedule(0.2)
        out = pool.workdir / "big.out"
        download = pool.lab["c1"].popen(
            ["curl", "-sS", "-o", str(out), pool.url("/big")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # During the download: every shim answers, in the text format, and one server
            # relays the connection (once curl has connected, and not in the instant of a
            # hand-over, when the old server has let it go and the new one not yet taken it).
            during: dict[str, Samples] = {}

            def relayed() -> bool:
                during.update({host: scrape(pool, host) for host in [*pool.server_hosts, "c1"]})
                return sum(during[h][("roam_connections", ())] for h in pool.server_hosts) >= 1

            poll(lambda: relayed() or download.poll() is not None, 10, interval_s=0.2)
            assert during["c1"][("roam_key_epochs_left", ())] > 0
            assert sum(during[h][("roam_connections", ())] for h in pool.server_hosts) >= 1, (
                download.poll(),
                handoffs(pool)[-3:],
            )
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
        migrated_in = sum(
            s[("roam_reincarnations_total", (("outcome", "ready"),))] for s in servers.values()
        )
        assert migrated_in == logged["migrated"]
        # An outsider (no subscription) tries every server directly: each gate drops its SYNs,
        # open or closed, and counts them.
        for host in pool.server_hosts:
            address = pool.listen_of(host)
            pool.lab["o1"].run(["curl", "-s", "--max-time", "1", f"http://{address}/"])
        for host, samples in servers.items():
            before = samples[("roam_gate_dropped_packets_total", ())]
            after = scrape(pool, host)[("roam_gate_dropped_packets_total", ())]
            assert after > before, f"{host}: {before} -> {after}"
        sent = sum(
            s[("roam_relay_bytes_total", (("direction", "service_to_client"),))]
            for s in servers.values()
        )
        assert sent > 0
        pool.stop()
        assert shim_problems(pool) == []


def test_the_endpoint_answers_only_get_metrics_and_is_bounded() -> None:
    """The HTTP handler itself, on loopback: /metrics parses, anything else is refused, an
    oversized or idle request is cut off, and no more than 4 scrapes are served at once."""
    from migrate.kernel.metrics import (
        MAX_REQUEST_BYTES,
        MAX_SCRAPES_AT_ONCE,
        MetricsServer,
        registry_of,
        server_families,
    )

    async def request(port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            answer = b""  # cut off with unread bytes: the kernel resets
        writer.close()
        return answer

    async def scenario() -> None:
        scrapes = 0

        async def before() -> None:
            nonlocal scrapes
            scrapes += 1

        server = MetricsServer(registry_of(lambda: server_families({"epoch": 3})), before)
        await server.start("127.0.0.1", 0)
        try:
            answer = await request(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            names = {f.name for f in text_string_to_metric_families(body.decode())}
            assert "roam_epoch" in names
            assert scrapes == 1
            answer = await request(server.port, b"GET / HTTP/1.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404")
            answer = await request(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 405")
            # A head longer than the limit: cut off without an answer.
            answer = await request(server.port, b"GET /" + b"a" * 2 * MAX_REQUEST_BYTES)
            assert answer == b""
            # Idle connections hold the slots; one more is closed at once, unanswered.
            idle = [
                await asyncio.open_connection("127.0.0.1", server.port)
                for _ in range(MAX_SCRAPES_AT_ONCE)
            ]
            await asyncio.sleep(0.2)  # let the server take them
            answer = await request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert answer == b""
            for _reader, writer in idle:
                writer.close()
            assert scrapes == 1
        finally:
            await server.close()

    asyncio.run(scenario())


def test_a_taken_metrics_port_is_one_line_and_leaves_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    with live_lab(tick=30.0, m=1, server_extra=("--metrics", METRICS)) as pool:
        pool.start_service("s1")
        pool.create()
        holder = pool.lab["s1"].popen(
            [
                sys.executable,
                "-c",
                "import socket, sys, time\n"
                "s = socket.socket()\n"
                f"s.bind(('127.0.0.1', {METRICS.rsplit(':', 1)[1]}))\n"
                "s.listen()\n"
                "print('held', flush=True)\n"
                "time.sleep(120)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "held\n"
            shim = pool.start_server("s1")
            assert shim.process.wait(timeout=60) == 1
            last = shim.stderr_tail(1)
            assert last.startswith(f"roam: error: --metrics {METRICS}: "), shim.stderr_tail()
            assert "in use" in last
        finally:
            holder.kill()
            holder.wait()
        tables = pool.lab["s1"].run(["nft", "list", "tables"], check=True).stdout
        assert "roam_" not in tables
        stopped = [e for e in shim.events() if e["event"] == "stop"]
        assert [e["reason"] for e in stopped] == ["error"]
