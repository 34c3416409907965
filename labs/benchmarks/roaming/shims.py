"""``shims``: the steady-state data path through both shims, next to its baselines (no roam)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from labs import Lab, PoolTopo
from labs.benchmarks.relay import (
    background_busy_pct,
    machine_busy_ticks,
    start_haproxy,
)
from labs.benchmarks.relay import cpu_seconds as user_system_seconds
from labs.benchmarks.roaming import (
    CLIENT_TIMEOUT_S,
    DIRECT_BULK_PORT,
    HAPROXY_PORTS,
    HTTP_BULK_MIB,
    HTTP_COPIES,
    LATENCY_PORT,
    PROJECT_ROOT,
    SMALL_BYTES,
    STILL_TICK,
)
from labs.benchmarks.roaming.analysis import sum_dicts, summarise_shims
from labs.benchmarks.roaming.orchestration import (
    benchmark_argv,
    deploy,
    restart_shims,
    shim_trouble,
    source_state,
    start_service_nginx,
)
from labs.clients import iperf3
from labs.roaming import LISTEN_PORT, SERVICE_PORT, RoamingLab, write_content
from labs.services import start_iperf3_server

T = TypeVar("T")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads (0 if it is gone)."""
    try:
        user, system = user_system_seconds(pid)
    except OSError:
        return 0.0
    return user + system


def measure_bulk(
    lab: Lab, address: str, port: int, seconds: float, reverse: bool, pids: dict[str, int]
) -> dict[str, Any]:
    result, figures = _with_cpu(
        pids,
        lambda: iperf3(lab["c1"], address, port=port, duration_s=seconds, reverse=reverse),
    )
    return {
        "gbit_s": result.received_mbit / 1000,
        "retransmits": result.retransmits or 0,
        **figures,
    }


def measure_http_bulk(
    lab: Lab, address: str, port: int, copies: int, size: int, pids: dict[str, int]
) -> dict[str, Any]:
    """curl fetches /big ``copies`` times on one keep-alive connection (nginx's sendfile on
    the service side: the live shims' HTTP codec, Date masking and running hash, not
    iperf3's opaque stream); the same figures as ``measure_bulk``."""
    url = f"http://{address}:{port}/big"
    argv = ["curl", "-sS", "--fail", "--max-time", f"{CLIENT_TIMEOUT_S:g}",
            "-w", "%{size_download}\n"] + ["-o", "/dev/null", url] * copies  # fmt: skip
    completed, figures = _with_cpu(pids, lambda: lab["c1"].run(argv, timeout=CLIENT_TIMEOUT_S + 10))
    sizes = [int(line) for line in completed.stdout.split() if line.isdigit()]
    if completed.returncode != 0 or sizes != [size] * copies:
        raise RuntimeError(
            f"curl of {url} x{copies} failed (exit {completed.returncode}, sizes {sizes}): "
            f"{completed.stderr.strip()[:200]}"
        )
    return {
        "gbit_s": 8 * size * copies / figures["elapsed_s"] / 1e9,
        "retransmits": 0,  # curl does not count them; iperf3's runs do
        **figures,
    }


def _with_cpu(pids: dict[str, int], client: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    """Run ``client`` and return its result with the CPU share of each process in ``pids``
    and of the whole machine over the run (100 = one CPU)."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy_before = machine_busy_ticks()
    started = time.monotonic()
    result = client()
    elapsed = time.monotonic() - started
    busy_after = machine_busy_ticks()
    busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    return result, {
        "elapsed_s": elapsed,
        "cpu_pct": {
            name: 100 * (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()
        },
        "machine_busy_pct": 100 * busy * (os.cpu_count() or 1),
    }


def measure_latency(
    lab: Lab, address: str, port: int, requests: int, connects: int
) -> dict[str, Any]:
    argv = benchmark_argv(
        "--role", "latency-client", "--host", address, "--port", port, "--path", "/small",
        "--requests", requests, "--connects", connects,
    )  # fmt: skip
    completed = lab["c1"].run(argv, check=True, timeout=CLIENT_TIMEOUT_S, cwd=PROJECT_ROOT)
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


@dataclass(frozen=True)
class ShimSetup:
    mode: str  # --migration of both shims
    servers: int  # hosts in the deployment: 2 (a long tick, s1 serves throughout) or 1
    relay: str = "copy"  # the server shim's --live-relay (live mode)
    range_bodies: str = "hash"  # the server shim's --range-bodies (live mode)

    @property
    def server_args(self) -> tuple[str, ...]:
        if self.mode != "live":
            return ()
        return ("--live-relay", self.relay, "--range-bodies", self.range_bodies)


SHIM_SETUPS = {
    "shims-reconnect": ShimSetup("reconnect", 2),
    "shims-live": ShimSetup("live", 2),
    "shims-live-splice-thread": ShimSetup("live", 2, "splice-thread"),
    "shims-live-window": ShimSetup("live", 2, "splice-thread", "window"),
    "shims-live-1server": ShimSetup("live", 1),
}


class ShimControl:
    """Which deployment, mode and service the running shims have; changes only what differs:
    a new deployment, both shims (mode), or the server shim alone (service)."""

    def __init__(self, pool: RoamingLab, run_bound_s: float) -> None:
        self.pool = pool
        self.run_bound_s = run_bound_s
        self.deployment: int | None = None
        self.mode: str | None = None
        self.service: int | None = None
        self.server_args: tuple[str, ...] | None = None  # the live server shim's relay options
        self.label: str | None = None
        self.log: dict[str, dict[str, int]] = {}

    def collect(self) -> None:
        """Count the running shims' complaints under the path they ran for (call before they
        are replaced)."""
        if self.label is not None:
            self.log[self.label] = sum_dicts([self.log.get(self.label, {}),
                                               shim_trouble(self.pool)])  # fmt: skip

    def use(self, path: str, service_port: int) -> dict[str, int]:
        pool = self.pool
        setup = SHIM_SETUPS[path]
        extra = ("--service", f"127.0.0.1:{service_port}", *setup.server_args)
        running = (self.deployment, self.mode, self.service, self.server_args)
        changing = running != (setup.servers, setup.mode, service_port, setup.server_args)
        if changing:
            self.collect()
        self.label = path
        if self.deployment != setup.servers:
            hosts = pool.lab.topo.servers[: setup.servers]  # type: ignore[attr-defined]
            if setup.servers > 1:
                # Epochs of a day or more, s1 first: no roam while the benchmark runs.
                deploy(
                    pool,
                    mode=setup.mode,
                    servers=hosts,
                    tick=STILL_TICK,
                    first_switch_after=self.run_bound_s,
                    first_server="s1",
                    extra=extra,
                )
            else:
                deploy(pool, mode=setup.mode, servers=hosts, tick=1.0, extra=extra)
        elif (self.mode, self.service, self.server_args) != (
            setup.mode,
            service_port,
            setup.server_args,
        ):
            restart_shims(pool, setup.mode, ["s1"], extra, client=self.mode != setup.mode)
        self.deployment, self.mode, self.service = setup.servers, setup.mode, service_port
        self.server_args = setup.server_args
        return {
            "server shim": pool.servers["s1"].process.pid,
            "client shim": pool.clients["c1"].process.pid,
        }


def run_shims(
    seconds: float,
    repeat: int,
    requests: int,
    connects: int,
    paths: Sequence[str],
    progress: Callable[[str], None],
    http_mib: int = HTTP_BULK_MIB,
) -> dict[str, Any]:
    """``seconds`` 0: no bulk runs (latency only); ``http_mib`` 0: no HTTP downloads."""
    with Lab(PoolTopo(servers=2, clients=1)) as lab:
        pool = RoamingLab(lab, m=1, service="none", start_delay=1.0)
        server = lab["s1"]
        lan = str(server.address)
        server.run(["ip", "link", "set", "lo", "up"], check=True)
        start_iperf3_server(server, port=SERVICE_PORT, address="127.0.0.1")
        start_iperf3_server(server, port=DIRECT_BULK_PORT, address=lan)
        files = {"small": os.urandom(SMALL_BYTES)}
        if seconds and http_mib:
            files["big"] = os.urandom(http_mib << 20)
        root = write_content(lab.workdir / "www", files)
        start_service_nginx(server, root, LATENCY_PORT, extra_listen=f"{lan}:{LATENCY_PORT}")
        haproxy_pids: dict[str, int] = {}
        options = {
            "haproxy": ("option splice-auto",),
            "haproxy-splice": ("option splice-request", "option splice-response"),
        }
        for name, (bulk_port, latency_port) in HAPROXY_PORTS.items():
            if name in paths:
                frontends = [(lan, bulk_port, SERVICE_PORT), (lan, latency_port, LATENCY_PORT)]
                haproxy_pids[name] = start_haproxy(server, frontends, options[name]).process.pid
        shims = ShimControl(pool, run_bound_s=3600.0)

        def target(path: str, service_port: int) -> tuple[str, int, dict[str, int]]:
            if path == "direct":
                return lan, DIRECT_BULK_PORT if service_port == SERVICE_PORT else service_port, {}
            if path in HAPROXY_PORTS:
                bulk_port, latency_port = HAPROXY_PORTS[path]
                port = bulk_port if service_port == SERVICE_PORT else latency_port
                return lan, port, {"haproxy": haproxy_pids[path]}
            pids = shims.use(path, service_port)
            return str(pool.vip), LISTEN_PORT, pids

        bulk: dict[str, dict[str, list[dict[str, Any]]]] = {
            p: {"client_to_service": [], "service_to_client": []} for p in paths
        }
        if seconds and http_mib:
            for directions in bulk.values():
                directions["http_service_to_client"] = []
        latency: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        background: list[float] = []
        for round_index in range(repeat):
            background.append(background_busy_pct())
            for path in paths if seconds else ():
                address, port, pids = target(path, SERVICE_PORT)
                for direction, reverse in (("client_to_service", False),
                                           ("service_to_client", True)):  # fmt: skip
                    run = measure_bulk(lab, address, port, seconds, reverse, pids)
                    bulk[path][direction].append(run)
                    speed = f"{run['gbit_s']:.2f} Gbit/s, {run['retransmits']} retransmits"
                    progress(f"round {round_index + 1}/{repeat} {path} {direction}: {speed}")
        for round_index in range(repeat):
            for path in paths:
                address, port, pids = target(path, LATENCY_PORT)
                if seconds and http_mib:
                    run = measure_http_bulk(lab, address, port, HTTP_COPIES, http_mib << 20, pids)
                    bulk[path]["http_service_to_client"].append(run)
                    speed = f"{run['gbit_s']:.2f} Gbit/s"
                    progress(f"round {round_index + 1}/{repeat} {path} HTTP s->c: {speed}")
                result = measure_latency(lab, address, port, requests, connects)
                latency[path].append(result)
                p50s = f"{result['rr_us']['p50']:.0f} / {result['connect_us']['p50']:.0f} µs"
                progress(f"round {round_index + 1}/{repeat} {path} latency p50: {p50s}")
        idle = idle_shim_cpu(shims, [p for p in paths if p in SHIM_SETUPS])
        shims.collect()
        pool.stop()
    return {
        "subcommand": "shims",
        "source": source_state(),
        "date": time.strftime("%Y-%m-%d"),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "seconds": seconds,
        "repeat": repeat,
        "requests": requests,
        "connects": connects,
        "http_mib": http_mib if seconds else 0,
        "http_copies": HTTP_COPIES,
        "background_busy_pct": background,
        "paths": summarise_shims(bulk, latency),
        "idle_shim_cpu_pct": idle,
        "shim_log": shims.log,
    }


def idle_shim_cpu(shims: ShimControl, paths: Sequence[str], window_s: float = 3.0) -> Any:
    """CPU the shims use with no traffic at all (% of one CPU), per shim path's setup."""
    idle: dict[str, dict[str, float]] = {}
    for path in paths:
        pids = shims.use(path, LATENCY_PORT)
        time.sleep(1.0)
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(window_s)
        idle[path] = {
            name: 100 * (cpu_seconds(pid) - before[name]) / window_s for name, pid in pids.items()
        }
    return idle
