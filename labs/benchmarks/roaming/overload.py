"""``overload``: issue 14's overload acceptance, as a benchmark repeated on fresh schedules.

A client opens ``RATE`` keep-alive connections a second for ``SECONDS`` s through the VIP
(1000 in all), each GETting a small file from nginx every ``INTERVAL`` s (``--role
busy-client``), while the service roams among three servers in live mode about every second
(tick 0.5 s, m=1: epochs of 0.5 or 1 s; a schedule with at least ``SWITCHES[0]`` roams in the
client's first ``SWITCHES[1]`` s is drawn for each run). The baseline, in the same lab and
run, is the same client against one server that never roams: if it breaks, the machine cannot
carry the load at all. Each run prints the connections broken (of 1000, by kind), the roams'
pauses, the CPU seconds of the four shims (``/proc``, since their start), the datagrams the
client sent on the migration ports (cover cells, real requests among them) and what the client
shim logged for the hand-overs that did not migrate. The schedule is random, and the
count of broken connections depends on it (a burst of short epochs is what a pool cannot keep
up with): compare medians over several runs (``--repeat``), never single runs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labs import Lab, PoolTopo
from labs.benchmarks.roaming import PROJECT_ROOT
from labs.benchmarks.roaming.orchestration import benchmark_argv, deploy, serve_files_with_nginx
from labs.roaming import LISTEN_PORT, SERVICE_PORT, RoamingLab
from labs.stats import p50_p99

RATE = 50  # new connections a second
SECONDS = 20  # of opening them
INTERVAL = 0.5  # between two GETs of one connection
TICK = 0.5  # m=1, three servers: epochs of 0.5 or 1 s
SWITCHES = (20, 25)  # at least 20 roams in the first 25 s
START_DELAY = 12.0  # from a deployment's creation to its first epoch (the shims start first)
BUSY_TIMEOUT_S = 300


def busy_run(
    lab: Lab, pool: RoamingLab, rate: float, seconds: float, interval: float
) -> dict[str, Any]:
    """The busy client in ``c1`` once, through the VIP: its JSON result."""
    argv = benchmark_argv(
        "--role", "busy-client", "--host", pool.vip, "--port", LISTEN_PORT, "--path", "/small",
        "--rate", rate, "--seconds", seconds, "--interval", interval,
    )  # fmt: skip
    done = lab["c1"].run(argv, timeout=BUSY_TIMEOUT_S, cwd=PROJECT_ROOT)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the busy client printed nothing: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def not_moved(events: list[dict[str, Any]]) -> collections.Counter[str]:
    """The client shim's hand-overs that neither migrated nor found their connection closed,
    by outcome and reason (deferred ones included: held for the next roam, not broken)."""
    return collections.Counter(
        f"{e['outcome']}: {str(e.get('detail'))[:100]}"
        for e in events
        if e["event"] == "handoff" and e["outcome"] not in ("migrated", "closed")
    )


def shim_cpu_s(pool: RoamingLab) -> float:
    """CPU seconds the running shims have used since they started (user and system)."""
    total = 0
    for shim in [*pool.clients.values(), *pool.servers.values()]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{shim.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return round(total / os.sysconf("SC_CLK_TCK"), 1)


def cells_sent(pool: RoamingLab, host: str = "c1") -> int | None:
    """Datagrams the client sent on the migration ports (cover cells, real ones among them)."""
    try:
        status = json.loads(pool.clients[host].status_path.read_text())
        return int(status["live"]["cover"]["cells_sent"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("errors", "started", "ended")}


def keep_run_logs(pool: RoamingLab, directory: Path, run: int) -> None:
    """Copy the shims' event logs of run ``run`` into ``directory`` (``run-N-HOST.jsonl``)."""
    for host, shim in [*pool.clients.items(), *pool.servers.items()]:
        with contextlib.suppress(OSError):  # a shim that never wrote one: nothing to keep
            shutil.copyfile(shim.log_json, directory / f"run-{run}-{host}.jsonl")


def run_overload(
    repeat: int, progress: Callable[[str], None], keep_logs: Path | None = None
) -> dict[str, Any]:
    results: dict[str, Any] = {"subcommand": "overload", "runs": []}
    with Lab(PoolTopo(servers=3, clients=1)) as lab:
        pool = RoamingLab(lab, tick=TICK, m=1, service="none", start_delay=START_DELAY)
        try:
            every = list(pool.server_hosts)
            serve_files_with_nginx(pool, {"small": os.urandom(100)}, SERVICE_PORT)
            deploy(pool, mode="live", servers=every[:1], tick=86400.0)
            results["baseline"] = _summary(busy_run(lab, pool, RATE, SECONDS, INTERVAL))
            progress(f"one server, no roam: {results['baseline']}")
            for index in range(repeat):
                deploy(pool, mode="live", servers=every, tick=TICK, switches=SWITCHES)
                measured = _summary(busy_run(lab, pool, RATE, SECONDS, INTERVAL))
                measured["shim_cpu_s"] = shim_cpu_s(pool)
                measured["cells_sent"] = cells_sent(pool)
                events = pool.clients["c1"].events()
                if keep_logs is not None:
                    keep_run_logs(pool, keep_logs, index + 1)
                roams = [e for e in events if e["event"] == "roam" and e.get("connections")]
                measured["pause_ms"] = p50_p99(r["pause_ms"] for r in roams)
                measured["roams"] = len(roams)
                measured["largest_roam"] = max((r["connections"] for r in roams), default=0)
                measured["not_moved"] = dict(not_moved(events).most_common(8))
                results["runs"].append(measured)
                progress(
                    f"run {index + 1}/{repeat}: {measured['broken']} broken of "
                    f"{measured['connections']} {measured.get('broken_by_kind')}, "
                    f"{measured['roams']} roams"
                )
        finally:
            pool.stop()
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_overload(results: dict[str, Any]) -> str:
    baseline = results["baseline"]
    lines = [
        f"1000 busy connections ({RATE} new a second for {SECONDS} s, a GET every {INTERVAL} s "
        f"each), live mode, tick {TICK} s (m=1)",
        f"one server, no roam: {baseline['broken']} broken, {baseline['answered']} of "
        f"{baseline['gets']} GETs answered, GET p50 {_ms(baseline['get_ms'].get('p50'))} ms",
        "run | roams (largest) | broken (by kind) | GETs answered | GET p50 / p99 ms | "
        "roam pause p50 / p99 ms | shims' CPU s | client's cells | "
        "hand-overs not migrated (most common)",
    ]
    for index, run in enumerate(results["runs"], 1):
        held = "; ".join(f"{count} {what}" for what, count in list(run["not_moved"].items())[:3])
        pause = run.get("pause_ms") or {}
        lines.append(
            f"{index} | {run['roams']} ({run['largest_roam']}) | {run['broken']} "
            f"{run.get('broken_by_kind') or ''} | {run['answered']}/{run['gets']} | "
            f"{_ms(run['get_ms'].get('p50'))} / {_ms(run['get_ms'].get('p99'))} | "
            f"{_ms(pause.get('p50'))} / {_ms(pause.get('p99'))} | "
            f"{run.get('shim_cpu_s', '-')} | {run.get('cells_sent') or '-'} | {held or '-'}"
        )
    broken = sorted(run["broken"] for run in results["runs"])
    if broken:
        lines.append(f"broken per run, sorted: {broken}; median {statistics.median(broken):g}")
    return "\n".join(lines)
