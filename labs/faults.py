"""Faults during live transfers: the machinery of tests/system/test_faults.py and
``roam lab faults``.

A *trial* is one download through the VIP of a live-migration deployment (``RoamingLab`` with
``migration="live"`` on a ``PoolTopo`` of three servers) while a fault is injected: packet loss
on every link, skewed clocks, roaming updates dropped, a shim restarted, or the *active* server
killed. Its verdict compares what the client received with what the service holds:

* ``intact``: the download completed and its SHA-256 is the file's;
* ``failed-clean``: the download failed, every byte received is a prefix of the file, and a
  shim logged why (a hand-over that did not migrate, with its detail);
* ``failed-silent``: as above but nobody logged a reason (a bug);
* ``corrupted``: a byte received differs from the file's (the worst outcome; never expected).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labs.lab import Lab
from labs.params import LinkParams
from labs.roaming import RoamingLab, roam_argv
from labs.topologies import PoolTopo
from migrate.kernel.files import PUBLIC_FILE, write_private

# A keep-alive HTTP client, run with python -c in a lab host: COUNT GETs of /k0, /k1, ... on
# one connection (argv: host, count, pause in seconds); prints the bodies' SHA-256 and the
# local ports used, as JSON.
KEEPALIVE_CLIENT = """
import hashlib, http.client, json, sys, time
host, count, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conn = http.client.HTTPConnection(host, 80, timeout=20)
digests, ports = [], set()
for i in range(count):
    conn.request("GET", f"/k{i}")
    response = conn.getresponse()
    body = response.read()
    ports.add(conn.sock.getsockname()[1])
    digests.append(hashlib.sha256(body).hexdigest() if response.status == 200 else "")
    time.sleep(pause)
print(json.dumps({"digests": digests, "ports": sorted(ports)}))
"""
BAD_EVENTS = ("fatal", "connection_failed", "internal_error")
BLACKHOLE = (
    "table inet roam_blackhole {\n"
    "  chain in { type filter hook prerouting priority -500; policy drop; }\n"
    "  chain out { type filter hook output priority -500; policy drop; }\n"
    "}\n"
)


@contextmanager
def live_lab(
    params: LinkParams | None = None, clients: int = 1, outsiders: int = 0, **options: Any
) -> Iterator[RoamingLab]:
    """A started lab of three servers with a (not yet started) live deployment; closed after."""
    lab = Lab(PoolTopo(servers=3, clients=clients, outsiders=outsiders, params=params)).start()
    try:
        roaming = RoamingLab(lab, migration="live", **options)
        try:
            yield roaming
        finally:
            roaming.stop()
    finally:
        lab.close()


@contextmanager
def reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``process`` for the block; killed and reaped if it still runs when the block ends."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def learnt(shim_events: list[dict[str, Any]], message: str) -> bool:
    """Whether a server applied ``message`` (``"Strike"`` or ``"Revoke"``), itself (a control
    message, or its own verdict) or from a peer's control state (anti-entropy)."""
    words = {"Strike": "over its contract", "Revoke": "revoked"}[message]
    return any(
        (e["event"] == "control_applied" and e.get("message") == message)
        or (e["event"] == "control_synced" and words in str(e.get("detail", "")))
        for e in shim_events
    )


def shim_problems(roaming: RoamingLab) -> list[str]:
    """Events that must never appear, whatever the fault: crashes and internal errors."""
    return [
        f"{shim.kind} {shim.host}: {event['event']} {event.get('reason', '')}"
        for shim in [*roaming.servers.values(), *roaming.clients.values()]
        for event in shim.events()
        if event["event"] in BAD_EVENTS
    ]


def handoffs(roaming: RoamingLab, host: str = "c1") -> list[dict[str, Any]]:
    return [e for e in roaming.clients[host].events() if e["event"] == "handoff"]


def unfinished(handoffs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hand-overs that failed their connection: all but the migrated, the closed, and the
    deferred whose connection a later roam migrated (or found closed). A hand-over whose
    PREPARE the new server could not answer in its window (a late start on a busy machine)
    holds the connection frozen for the next roam by design: a longer pause, not a loss."""
    latest: dict[Any, int] = {}
    for h in handoffs:
        if h["outcome"] in ("migrated", "closed"):
            latest[h["port"]] = max(h["epoch"], latest.get(h["port"], h["epoch"]))
    return [
        h
        for h in handoffs
        if h["outcome"] not in ("migrated", "closed")
        and not (h["outcome"] == "deferred" and latest.get(h["port"], h["epoch"]) > h["epoch"])
    ]


def complaints(roaming: RoamingLab) -> list[str]:
    """Every shim's warnings and errors but the hand-overs', a line each (failure messages)."""
    return [
        f"{shim.host} {e['event']}: {str(e.get('reason', e.get('error', '')))[:160]}"
        for shim in [*roaming.servers.values(), *roaming.clients.values()]
        for e in shim.events()
        if e["level"] != "info" and e["event"] != "handoff"
    ]


def handoff_detail(handoffs: list[dict[str, Any]], complaints: list[str]) -> str:
    """Hand-overs (two dozen at most) and complaints, for a failure message."""
    lines = "; ".join(
        f"epoch {e.get('epoch')} {e.get('outcome')} {e.get('bytes_replayed')}: "
        f"{str(e.get('detail'))[:100]}"
        for e in handoffs[:24]
    )
    return lines + "\n" + "\n".join(complaints[:12])


def logged_reasons(roaming: RoamingLab) -> list[str]:
    """Why connections were lost, as the shims logged it (hand-overs that did not migrate,
    refused or failed re-incarnations)."""
    reasons = [
        f"handoff {e['outcome']}: {str(e.get('detail', ''))[:160]}"
        for shim in roaming.clients.values()
        for e in shim.events()
        if e["event"] == "handoff" and e["outcome"] not in ("migrated", "closed")
    ]
    reasons += [
        f"{shim.host} untracked_connections: {str(e.get('reason', ''))[:160]}"
        for shim in roaming.clients.values()
        for e in shim.events()
        if e["event"] == "untracked_connections"
    ]
    reasons += [
        f"{shim.host} {e['event']} {e.get('error', '')}: "
        f"{str(e.get('reason', e.get('status', '')))[:160]}"
        for shim in roaming.servers.values()
        for e in shim.events()
        if e["event"] in ("reincarnation_failed", "reincarnation_refused", "reincarnation_rejected")
    ]
    return reasons


def verdict(received: bytes, expected: bytes, completed: bool, reasons: list[str]) -> str:
    if not expected.startswith(received):
        return "corrupted"
    if completed and hashlib.sha256(received).digest() == hashlib.sha256(expected).digest():
        return "intact"
    return "failed-clean" if reasons else "failed-silent"


def start_download(
    roaming: RoamingLab, name: str, rate: str, out: Path, host: str = "c1"
) -> subprocess.Popen[str]:
    return roaming.lab[host].popen(
        [
            "curl",
            "-sS",
            "--max-time",
            "600",
            "--limit-rate",
            rate,
            "-o",
            str(out),
            roaming.url(f"/{name}"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def just_after_a_roam(roaming: RoamingLab, host: str = "c1", timeout_s: float = 15.0) -> None:
    """Wait for the client's next switch of server. A connection younger than one checkpoint
    period cannot be handed over (no checkpoint covers its bytes: the hand-over is refused as
    unverifiable and the connection lost, with that reason logged); transfers that test other
    faults start right after a roam so that their first hand-over has a checkpoint."""
    shim = roaming.clients[host]
    seen = sum(1 for e in shim.events() if e["event"] == "switch")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(1 for e in shim.events() if e["event"] == "switch") > seen:
            return
        time.sleep(0.02)


def active_host(roaming: RoamingLab, now: float) -> tuple[str, float]:
    """The server host of the epoch running at ``now``, and when the service leaves it: the
    end of that epoch, or of the last of the epochs right after it on the same server (a
    server revived before the service has really left would find the client's connection
    still coming to it, with no socket for it)."""
    count = max(2, int((now - roaming.start_time) / roaming.tick) + 4)
    epochs = roaming.schedule(1, count + 64)
    for index, epoch in enumerate(epochs):
        if epoch["start"] <= now < epoch["start"] + epoch["length"]:
            leaves = epoch["start"] + epoch["length"]
            for later in epochs[index + 1 :]:
                if later["server"] != epoch["server"]:
                    break
                leaves = later["start"] + later["length"]
            return roaming.host_of(epoch["server"]), leaves
    raise RuntimeError(f"no epoch runs at {now:.3f}")


CONTROL_LOSS_TABLE = "roam_ctlloss"


@contextmanager
def control_loss(
    roaming: RoamingLab, percent: int = 50, port: int = 47475
) -> Iterator[dict[str, int]]:
    """Drop ``percent`` % of the group-control datagrams, drawn per packet by the kernel (nft
    ``numgen random``; netem is not in every kernel), on every host of the pool: datagrams to
    the control port as they arrive (operator to server, server to server: each crosses one
    such rule) and the servers' answers as they arrive at the operator. Yields a dict filled on
    exit with the datagrams seen and dropped, summed over hosts."""
    if not 0 <= percent <= 100:
        raise ValueError(f"loss percent must be in 0..100, got {percent}")
    rules = (
        f"table inet {CONTROL_LOSS_TABLE} {{\n"
        "  chain in {\n"
        "    type filter hook input priority -450; policy accept;\n"
        f"    udp dport {port} counter numgen random mod 100 < {percent} counter drop\n"
        f"    udp sport {port} udp dport != {port} counter numgen random mod 100 < {percent}"
        " counter drop\n"
        "  }\n"
        "}\n"
    )
    hosts = [*roaming.server_hosts, *roaming.client_hosts]
    installed: list[str] = []
    figures = {"seen": 0, "dropped": 0}
    try:
        for host in hosts:
            roaming.lab[host].run(["nft", "-f", "-"], check=True, input=rules)
            installed.append(host)
        yield figures
    finally:
        for host in installed:
            listing = roaming.lab[host].run(
                ["nft", "-j", "list", "table", "inet", CONTROL_LOSS_TABLE]
            )
            counters = [
                item["counter"]["packets"]
                for entry in json.loads(listing.stdout or '{"nftables": []}')["nftables"]
                for item in entry.get("rule", {}).get("expr", [])
                if isinstance(item, dict) and "counter" in item
            ]
            # Each rule holds two counters: what it saw, then what it dropped.
            figures["seen"] += sum(counters[0::2])
            figures["dropped"] += sum(counters[1::2])
            roaming.lab[host].run(["nft", "delete", "table", "inet", CONTROL_LOSS_TABLE])


def kill_server(roaming: RoamingLab, host: str) -> None:
    """The server dies as a host does: cut off first, then shim and service SIGKILLed, so the
    FINs its kernel sends for the dead processes' sockets never leave it (a crash of the
    processes alone on a reachable host closes the client's connections: not this fault)."""
    roaming.lab[host].run(["nft", "-f", "-"], check=True, input=BLACKHOLE)
    roaming.servers[host].stop(signal.SIGKILL)
    service = roaming.services.get(host)
    if service is not None:
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(timeout=10)


def revive_server(roaming: RoamingLab, host: str) -> None:
    roaming.lab[host].run(["nft", "delete", "table", "inet", "roam_blackhole"], check=True)
    roaming.lab[host].run(roam_argv("cleanup"), check=True, timeout=60)
    roaming.start_service(host)
    roaming.start_server(host)


def restart_client(roaming: RoamingLab, host: str = "c1", *extra: str) -> None:
    roaming.clients[host].stop()
    start_client(roaming, host, *extra)
    roaming.wait_ready()


def start_client(roaming: RoamingLab, host: str, *extra: str) -> None:
    """``RoamingLab.start_client`` with extra arguments (e.g. the hidden ``--clock-offset``)."""
    shim = roaming.start_client(host)
    if extra:
        shim.stop()
        roaming.clients[host] = roaming._spawn(  # same files layout as start_client
            host,
            "client",
            ["--bundle", str(roaming.bundle_path(host)), "--migration", "live", *extra],
        )


# --- the server-death trials of ``roam lab faults`` -----------------------------------------


@dataclass
class Trial:
    number: int
    kill_after_s: float  # into the transfer
    killed: str
    verdict: str
    received: int
    seconds: float
    outcomes: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    curl_error: str = ""


def server_death_trial(
    roaming: RoamingLab, number: int, data: bytes, rate: str, rng: random.Random
) -> Trial:
    """One download; the active server is killed at a random point of the transfer (when the
    client has received a random 5-70 % of the file: curl's rate limit is an average it
    overshoots at first, so a moment chosen by the clock could fall after the end) and
    revived once the service has roamed away from it."""
    duration = len(data) / _rate_bytes(rate)
    kill_at_bytes = int(len(data) * rng.uniform(0.05, 0.7))
    out = roaming.workdir / f"trial-{number}.out"
    out.unlink(missing_ok=True)
    seen_handoffs = len(handoffs(roaming))
    just_after_a_roam(roaming)
    began = time.time()
    curl = start_download(roaming, "data", rate, out)
    killed = ""
    try:
        patience = time.time() + 3 * duration + 30.0  # bounded: a stalled transfer ends it
        while curl.poll() is None and time.time() < patience:
            if out.exists() and out.stat().st_size >= kill_at_bytes:
                break
            time.sleep(0.02)
        kill_after = time.time() - began
        if curl.poll() is None:
            killed, ends = active_host(roaming, time.time())
            kill_server(roaming, killed)
            # Dead until the service has left it (its epoch is over), then back in a moment.
            while time.time() < ends + 0.3:
                time.sleep(0.05)
            revive_server(roaming, killed)
        curl.wait(timeout=600)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    received = out.read_bytes() if out.exists() else b""
    new = handoffs(roaming)[seen_handoffs:]
    outcomes: dict[str, int] = {}
    for handoff in new:
        outcomes[handoff["outcome"]] = outcomes.get(handoff["outcome"], 0) + 1
    reasons = [
        f"handoff {h['outcome']}: {str(h.get('detail', ''))[:160]}"
        for h in new
        if h["outcome"] not in ("migrated", "closed")
    ]
    curl_error = curl.stderr.read().strip()[:160] if curl.stderr is not None else ""
    return Trial(
        number,
        round(kill_after, 3),
        killed,
        verdict(received, data, curl.returncode == 0, reasons),
        len(received),
        round(time.time() - began, 3),
        outcomes,
        reasons,
        shim_problems(roaming),
        curl_error,
    )


def _rate_bytes(rate: str) -> float:
    units = {"K": 1024, "M": 1024 * 1024}
    return float(rate[:-1]) * units[rate[-1]] if rate[-1] in units else float(rate)


def run_server_death_trials(
    out_dir: Path,
    trials: int = 100,
    seed: int | None = None,
    size: int = 12 * 1024 * 1024,
    rate: str = "2M",
    trials_per_lab: int = 10,
    log: Any = print,
) -> dict[str, Any]:
    """``trials`` server-death trials, a fresh lab every ``trials_per_lab``; results in
    ``out_dir/faults.json`` (every trial) and ``out_dir/faults.md`` (the summary)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    results: list[Trial] = []
    while len(results) < trials:
        data = os.urandom(size)
        with live_lab(tick=2.0, m=1, content={"data": data}, first_switch_after=3.0) as roaming:
            # Small receive buffers: curl's rate limit then holds the transfer on the wire.
            roaming.lab["c1"].sysctl("net.ipv4.tcp_rmem", "4096 16384 65536")
            roaming.start()
            roaming.wait_for_schedule(0.5)
            for _ in range(min(trials_per_lab, trials - len(results))):
                trial = server_death_trial(roaming, len(results) + 1, data, rate, rng)
                results.append(trial)
                log(
                    f"trial {trial.number}/{trials}: killed {trial.killed or '-'} after "
                    f"{trial.kill_after_s:.1f} s: {trial.verdict} ({trial.seconds:.1f} s)"
                )
                if trial.problems:
                    break  # a shim crashed: start a fresh lab
    counts: dict[str, int] = {}
    for trial in results:
        counts[trial.verdict] = counts.get(trial.verdict, 0) + 1
    summary = {
        "trials": len(results),
        "seed": seed,
        "size": size,
        "rate": rate,
        "verdicts": counts,
        "bytes_lost_to_corruption": sum(t.received for t in results if t.verdict == "corrupted"),
        "shim_problems": sorted({p for t in results for p in t.problems}),
    }
    write_private(
        out_dir / "faults.json",
        json.dumps({"summary": summary, "trials": [asdict(t) for t in results]}, indent=2) + "\n",
        PUBLIC_FILE,
    )
    write_private(out_dir / "faults.md", _markdown(summary, results), PUBLIC_FILE)
    return summary


def _markdown(summary: dict[str, Any], results: list[Trial]) -> str:
    lines = [
        "# Server-death trials (`roam lab faults`)",
        "",
        f"{summary['trials']} downloads of {summary['size'] // (1024 * 1024)} MiB at "
        f"{summary['rate']}/s through a live deployment of three servers (epochs of 2 to 4 s); "
        "in each, the active server's shim and service are SIGKILLed and its host cut off at a "
        f"random moment, until the service has roamed away. Seed {summary['seed']}.",
        "",
        "| verdict | trials |",
        "| --- | --- |",
        *[f"| {name} | {count} |" for name, count in sorted(summary["verdicts"].items())],
        "",
    ]
    failed = [t for t in results if t.verdict != "intact"]
    if failed:
        lines += ["Trials that did not complete intact:", ""]
        lines += [
            f"- trial {t.number}: {t.verdict}, killed {t.killed} after {t.kill_after_s} s, "
            f"{t.received} bytes received ({t.curl_error or 'curl: no error'}); "
            f"{'; '.join(t.reasons) or 'no reason logged'}"
            for t in failed
        ]
        lines.append("")
    if summary["shim_problems"]:
        lines += ["Shim problems:", "", *[f"- {p}" for p in summary["shim_problems"]], ""]
    return "\n".join(lines)
