"""``migration``: roams, their pauses and goodput, and the cost per re-incarnated connection."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from labs import Lab, PoolTopo
from labs.benchmarks.roaming import (
    BIG_MIB,
    CLIENT_TIMEOUT_S,
    PACED_RATE,
    PACED_RCVBUF,
    PROJECT_ROOT,
    SMALL_BYTES,
    STILL_TICK,
)
from labs.benchmarks.roaming.analysis import (
    analyse_stream,
    events_of,
    ping_times,
    regenerations,
    sum_dicts,
    summarise_streams,
)
from labs.benchmarks.roaming.orchestration import (
    benchmark_argv,
    client_counters,
    counter_delta,
    deploy,
    serve_files_with_nginx,
    shim_trouble,
    source_state,
)
from labs.benchmarks.roaming.rendering import connections_line, opening_line
from labs.errors import LabError
from labs.roaming import SERVICE_PORT, RoamingLab
from labs.stats import p50_p99


@dataclass(frozen=True)
class StreamRun:
    name: str
    rate: float  # bytes/s, 0 = as fast as the client reads
    rcvbuf: int


# Deployments compared per migration mode: one server (the brief's baseline), three servers
# with epochs of a day (no roam, and no one-server pathology), three servers roaming.
LAYOUTS = {"live": ("single", "still", "roaming"), "reconnect": ("single", "roaming")}
STREAM_RUNS = (
    StreamRun("paced 8 MiB/s", PACED_RATE, PACED_RCVBUF),
    StreamRun("unlimited", 0.0, 0),
)

SERVER_COUNTERS = ("Tcp.RetransSegs", "TcpExt.TCPTimeouts", "TcpExt.TCPLossProbes")


def measure_stream(
    pool: RoamingLab, run: StreamRun, seconds: float, stall_timeout: float, digest: str
) -> dict[str, Any]:
    client = pool.lab["c1"]
    before = client_counters(client)
    servers_before = [client_counters(pool.lab[host]) for host in pool.servers]
    argv = benchmark_argv(
        "--role", "stream-client", "--host", pool.vip, "--port", 80, "--path", "/big",
        "--seconds", seconds, "--rate", run.rate, "--rcvbuf", run.rcvbuf,
        "--stall-timeout", stall_timeout, "--sha256", digest,
    )  # fmt: skip
    completed = client.run(argv, timeout=seconds + CLIENT_TIMEOUT_S, cwd=PROJECT_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"stream client failed: {completed.stderr.strip()[-300:]}")
    after = client_counters(client)
    servers_tcp = sum_dicts(
        counter_delta(b, client_counters(pool.lab[host]), *SERVER_COUNTERS)
        for b, host in zip(servers_before, pool.servers, strict=True)
    )
    stream: dict[str, Any] = json.loads(completed.stdout)
    analysis = analyse_stream(stream, pool.clients["c1"].events(), stall_timeout)
    server_events = [
        {**e, "host": shim.host} for shim in pool.servers.values() for e in shim.events()
    ]
    return {
        "mbit_s": stream["mbit_s"],
        "bytes": stream["bytes"],
        "files": stream["files"],
        "bad_files": stream["bad_files"],
        # BeyondWindow: segments the client dropped past its receive window (a new server
        # sending more than the client could take).
        "client_tcp": counter_delta(
            before,
            after,
            "TcpExt.PAWSEstab",
            "Tcp.RetransSegs",
            "Tcp.InErrs",
            "TcpExt.BeyondWindow",
        ),
        # Where a pause of about an RTO comes from: the servers' retransmissions and timeouts.
        "servers_tcp": servers_tcp,
        **analysis,
        "regenerations": regenerations(server_events, stream["first"], stream["last"]),
        # Per roam: what the servers logged from 50 ms before the switch to 400 ms after it.
        "server_near_switch": [
            [
                f"{e['host']}:{e['event']} {1000 * (e['ts'] - at):+.1f}" + event_detail(e)
                for e in sorted(server_events, key=lambda e: e["ts"])
                if at - 0.05 <= e["ts"] <= at + 0.4
            ]
            for at in analysis["switch_ts"]
        ],
        "shim_log": shim_trouble(pool),
    }


def event_detail(event: dict[str, Any]) -> str:
    """What a slow roam's server event says about the pause: for a re-incarnation, the window
    its socket took and how much it read of the service to reach the client (and how)."""
    if event["event"] != "reincarnated":
        return ""
    parts = [f"{event.get('regeneration')} {event.get('regenerated', 0) / 2**20:.1f} MiB"]
    if event.get("rebased"):
        parts.append(f"rebased {event['rebased']}")
    if event.get("aside"):
        parts.append(f"window checked aside {event['aside']}")
    if event.get("unsent"):
        parts.append(f"sent first {event['unsent'] / 2**20:.1f} MiB")
    if event.get("window") is not None:
        parts.append(f"window {event['window']}")
    if event.get("commit_ms"):
        steps = ", ".join(f"{step} {at}" for step, at in event["commit_ms"].items())
        parts.append(f"COMMIT ms from its arrival: {steps}")
    return f" ({', '.join(parts)})"


def measure_rtt(lab: Lab, target: IPv4Address) -> dict[str, Any]:
    completed = lab["c1"].run(
        ["ping", "-n", "-c", "50", "-i", "0.02", "-W", "1", str(target)], timeout=30
    )
    times = ping_times(completed.stdout)
    return {**p50_p99(times), "max": max(times, default=0.0)}


def _read_json_line(process: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        raise RuntimeError(f"no answer from the hold client within {timeout_s:.0f} s")
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"the hold client exited with {process.wait(timeout=5)}")
    result: dict[str, Any] = json.loads(line)
    return result


def measure_connections(pool: RoamingLab, count: int, wait_s: float) -> dict[str, Any]:
    """N keep-alive connections across one roam (see the module docstring)."""
    client = pool.lab["c1"]
    counters = client_counters(client)
    process = client.popen(
        benchmark_argv("--role", "hold-client", "--host", pool.vip, "--port", 80,
                     "--path", "/small", "--count", count),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(PROJECT_ROOT),
    )  # fmt: skip
    try:
        ready = _read_json_line(process, CLIENT_TIMEOUT_S)
        ports = set(ready.pop("ports"))
        # The first roam whose preparations all began after the connections had checkpoints:
        # the client shim prepares at most MAX_PREPARE_LEAD (4 s) before the boundary.
        not_before = ready["ready"] + wait_s
        deadline = time.time() + 60
        roam: dict[str, Any] | None = None
        while roam is None:
            if time.time() > deadline:
                raise RuntimeError("no roam within 60 s")
            time.sleep(0.1)
            roam = next(
                (
                    e
                    for e in events_of(pool.clients["c1"].events(), "roam")
                    if e["ts"] - (e.get("pause_ms") or 0) / 1000 > not_before
                ),
                None,
            )
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
        after = _read_json_line(process, CLIENT_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    handoffs = [
        e
        for e in events_of(pool.clients["c1"].events(), "handoff")
        if e["epoch"] == roam["epoch"] and e["port"] in ports
    ]
    ours: dict[str, int] = {}
    for event in handoffs:
        ours[event["outcome"]] = ours.get(event["outcome"], 0) + 1
    earlier: dict[str, int] = {}
    later: dict[str, int] = {}  # the roams while the GETs after it ran: what broke them
    for event in events_of(pool.clients["c1"].events(), "handoff"):
        if event["port"] in ports and event["epoch"] != roam["epoch"]:
            line = f"epoch {event['epoch']} {event['outcome']}: {str(event.get('detail'))[:200]}"
            side = earlier if event["epoch"] < roam["epoch"] else later
            side[line] = side.get(line, 0) + 1
    new_host = pool.host_of(roam["server"])
    # This roam's preparations began after the previous roam ended (one hand-over at a time).
    since = max(
        [ready["ready"]]
        + [e["ts"] for e in events_of(pool.clients["c1"].events(), "roam") if e["ts"] < roam["ts"]]
    )
    addresses = {f"{pool.lab['c1'].address}:{port}" for port in ports}
    server_events = [
        e
        for e in pool.servers[new_host].events()
        if since <= e["ts"] <= roam["ts"] + 1.0 and e.get("client") in addresses
    ]
    prepared = events_of(server_events, "prepared")
    epoch = pool.schedule(roam["epoch"], 1)[0]
    pause_ms = float(roam.get("pause_ms") or 0.0)
    first_prepare = min((e["ts"] - e["seconds"] for e in prepared), default=None)
    return {
        "n": count,
        "setup": ready,
        "roam": {
            k: roam.get(k)
            for k in ("epoch", "server", "connections", "outcomes", "pause_ms", "steps_ms")
        },
        "ours": ours,
        "earlier_handoffs": earlier,
        "later_handoffs": later,
        "pause_ms": pause_ms,
        "pause_per_connection_ms": pause_ms / count,
        "switch_late_ms": 1000 * (roam["ts"] - epoch["start"]),
        "prepared": len(prepared),
        "prepare_s": {
            **p50_p99(e["seconds"] for e in prepared),
            "max": max((e["seconds"] for e in prepared), default=0.0),
        },
        "first_prepare_to_switch_s": None if first_prepare is None else roam["ts"] - first_prepare,
        "reincarnated": len(events_of(server_events, "reincarnated")),
        "failed_on_server": len(events_of(server_events, "reincarnation_failed")),
        "after": after,
        "client_tcp": counter_delta(counters, client_counters(client), "TcpExt.PAWSEstab"),
        "shim_log": shim_trouble(pool),
    }


def measure_opening(pool: RoamingLab, seconds: float) -> dict[str, Any]:
    """New connections one after another for ``seconds`` (``opening_client``), with the roams
    the client made meanwhile and the outcome of the connections they moved."""
    since = time.time()
    completed = pool.lab["c1"].run(
        benchmark_argv("--role", "opening-client", "--host", pool.vip, "--port", 80,
                       "--path", "/small", "--seconds", seconds),
        check=True, timeout=seconds + CLIENT_TIMEOUT_S, cwd=PROJECT_ROOT,
    )  # fmt: skip
    measured: dict[str, Any] = json.loads(completed.stdout)
    roams = [e for e in events_of(pool.clients["c1"].events(), "roam") if e["ts"] >= since]
    measured["roams"] = len(roams)
    measured["outcomes"] = sum_dicts(e.get("outcomes", {}) for e in roams)
    measured["shim_log"] = shim_trouble(pool)
    return measured


def run_migration(
    seconds: float,
    repeat: int,
    tick: float,
    stall_timeout: float,
    counts: Sequence[int],
    progress: Callable[[str], None],
    with_streams: bool = True,
    live_server_args: Sequence[str] = (),
    stream_mib: int = BIG_MIB,
    connections_tick: float = 2.0,
    opening_s: float = 0.0,
) -> dict[str, Any]:
    """``live_server_args``: options of every live-mode server shim (its relay);
    ``opening_s``: how long new connections are opened one after another, live, with one
    server (the baseline) and roaming (0: not measured);
    ``stream_mib``: the size of the file the downloads fetch again and again;
    ``connections_tick``: the tick of the deployment the connection counts roam in.

    The connection counts are one client's: its servers' bound of pending preparations per
    client (``--max-pending-per-client``) is raised to the largest count, as an operator
    would for such a client (the default, 1024, refuses the rest by design), and nginx has
    room for twice as many connections (its own and the previous roam's)."""
    most = max(counts, default=0)
    pending = max(1024, most)
    big = os.urandom(stream_mib * 1024 * 1024) if with_streams else b""
    digest = hashlib.sha256(big).hexdigest()
    small = os.urandom(SMALL_BYTES)
    results: dict[str, Any] = {
        "subcommand": "migration",
        "source": source_state(),
        "date": time.strftime("%Y-%m-%d"),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "seconds": seconds,
        "repeat": repeat,
        "tick": tick,
        "stall_timeout_s": stall_timeout,
        "live_server_args": list(live_server_args),
        "stream_mib": stream_mib,
        "connections_tick": connections_tick,
        "max_pending_per_client": pending,
        "streams": {},
        "connections": [],
        "opening_s": opening_s,
        "opening": {},
    }
    with Lab(PoolTopo(servers=3, clients=1)) as lab:
        pool = RoamingLab(lab, tick=tick, m=1, service="none", start_delay=2.0)
        every = list(pool.server_hosts)
        room = max(4096, 2 * most + 1000)
        serve_files_with_nginx(pool, {"big": big, "small": small}, SERVICE_PORT, room)
        results["rtt_ms"] = measure_rtt(lab, lab["s1"].address)
        progress(f"rtt c1 -> s1: {results['rtt_ms']}")
        streams: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for round_index in range(repeat if with_streams else 0):
            for run in STREAM_RUNS:
                for mode in ("live", "reconnect"):
                    extra = tuple(live_server_args) if mode == "live" else ()
                    for layout in LAYOUTS[mode]:
                        if layout == "single":
                            deploy(pool, mode=mode, servers=every[:1], tick=tick, extra=extra)
                        elif layout == "still":
                            deploy(pool, mode=mode, servers=every, tick=STILL_TICK,
                                   first_switch_after=seconds + 60, extra=extra)  # fmt: skip
                        else:
                            deploy(pool, mode=mode, servers=every, tick=tick, extra=extra)
                        stall = stall_timeout if mode == "reconnect" else 0.0
                        measured = measure_stream(pool, run, seconds, stall, digest)
                        key = f"{run.name} | {mode}"
                        streams.setdefault(key, {}).setdefault(layout, []).append(measured)
                        progress(
                            f"round {round_index + 1}/{repeat} {key} {layout}: "
                            f"{measured['mbit_s']:.0f} Mbit/s, {measured['roams']} roams, "
                            f"app pause p50 {measured['app_pause']['p50']:.1f} ms "
                            f"max {measured['app_pause_max_ms']:.1f} ms, "
                            f"shim pause p50 {measured['shim_pause']['p50']:.1f} ms, "
                            f"breaks {measured['breaks']}, client {measured['client_tcp']}, "
                            f"servers {measured['servers_tcp']}"
                        )
        results["streams"] = summarise_streams(streams)
        # New connections one after another (--opening): against s1 alone, then roaming.
        layouts = ("single", "roaming") if opening_s else ()
        for layout in layouts:
            servers = every[:1] if layout == "single" else every
            deploy(pool, mode="live", servers=servers, tick=tick, extra=tuple(live_server_args))
            results["opening"][layout] = opened = measure_opening(pool, opening_s)
            progress(f"new connections, live, {layout}: {opening_line(opened)}")
        if counts:
            try:
                extra = (*live_server_args, "--max-pending-per-client", str(pending))
                deploy(pool, mode="live", servers=every, tick=connections_tick,
                       first_switch_after=2.0, extra=extra)  # fmt: skip
            except (LabError, RuntimeError) as error:
                results["connections_error"] = str(error)
                progress(f"connections: {error}")
                counts = []
            for count in counts:
                try:
                    measured = measure_connections(pool, count, wait_s=5.0)
                except (RuntimeError, OSError, json.JSONDecodeError) as error:
                    measured = {"n": count, "error": str(error), "shim_log": shim_trouble(pool)}
                results["connections"].append(measured)
                progress(f"{count} connections: {connections_line(measured)}")
        pool.stop()
    return results
