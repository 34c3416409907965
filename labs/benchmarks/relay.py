"""Benchmark: the server relay (``proxy.relay``) against direct and HAProxy, in one lab run.

    python -m labs.benchmarks.relay [--seconds 3] [--repeat 3] [--placement N] [--json]

Topology: ``PoolTopo(servers=1, clients=1)`` (c1 and s1 on one switch, offloads as default).
The services run on s1 and listen on every address: ``iperf3 -s`` for bulk throughput and a
small threaded Python echo service for latency. Paths from c1:

* ``direct``: straight to the service on s1's LAN address (the baseline);
* ``haproxy``: HAProxy in TCP mode with ``option splice-auto``, on s1, to the service on
  127.0.0.1 (a private config in the lab's work directory, ``haproxy -f cfg -db``). Its
  heuristic never splices in this lab (it moves 16 KiB buffers with recvfrom/sendto), so:
* ``haproxy-splice``: the same with ``option splice-request`` and ``option splice-response``,
  HAProxy splicing always (64 KiB pipes);
* ``relay-splice``: ``python -m proxy.relay --mode splice`` (uvloop), to 127.0.0.1;
* ``relay-copy``: ``--mode copy:noop``, a copy through Python with an observer that does
  nothing (the floor of any observer);
* ``relay-copy-sha256``: ``--mode copy:sha256``, every byte hashed on the way (what the
  checkpoint's running hash will cost);
* optional (``--paths``): ``relay-splice-asyncio`` (default loop), ``relay-splice-transparent``
  (the service sees the client's address; replies routed locally as in production).

Measured per path: bulk TCP throughput client -> service and service -> client (``iperf3 -J``,
and ``-R``), the CPU time the proxy process used during each run (user and system) and how busy
the whole machine was; small-request latency p50/p99 of 100-byte request/response round trips on
one connection, and of a new connection per request, both as the scheduler places the processes
and with client, service and proxy pinned to CPU 0 (a cross-CPU wakeup costs tens of µs in a
VM, and placement changes from run to run: pinned figures isolate the processing cost). Runs are
interleaved (every path once per round) and the median of the rounds is reported, with ratios
against direct and against HAProxy from the same run; how busy the machine was before each round
is reported too (other work on the host makes the figures noisier). Tests never assert times;
this script is where speed is judged (docs/benchmarks.md).

With ``--placement N``, every path's bulk runs are repeated N times with the proxy, the iperf3
server and the iperf3 client pinned in each of the three ways two vCPUs can be shared
(``LAYOUTS``): on this kind of VM that choice, which the scheduler makes differently from run to
run, moves a relayed path between about 5 and 12 Gbit/s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from labs import Lab, PoolTopo
from labs.clients import iperf3, parse_iperf3_json
from labs.errors import LabError
from labs.node import Node
from labs.services import Service, start_iperf3_server, wait_until_listening
from labs.stats import nearest_rank

IPERF_PORT = 5201
ECHO_PORT = 7000
RETURN_TABLE = "100"
REQUEST_BYTES = 100
LOOPBACK = "127.0.0.1"
CLIENT_TIMEOUT_S = 120.0
# Programs of this project started in the lab run from the project root: a `python -m` in
# another directory can resolve `labs` through the editable install's namespace fallback,
# which lacks the package's __init__.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ProxyPath:
    name: str
    relay_args: tuple[str, ...] = ()  # for relay paths: python -m proxy.relay arguments
    transparent: bool = False
    haproxy_options: tuple[str, ...] = ()  # for HAProxy paths: its defaults' splice options


PATHS: dict[str, ProxyPath] = {
    path.name: path
    for path in (
        ProxyPath("direct"),
        ProxyPath("haproxy", haproxy_options=("option splice-auto",)),
        ProxyPath(
            "haproxy-splice",
            haproxy_options=("option splice-request", "option splice-response"),
        ),
        ProxyPath("relay-splice", ("--mode", "splice")),
        ProxyPath("relay-copy", ("--mode", "copy:noop")),
        ProxyPath("relay-copy-sha256", ("--mode", "copy:sha256")),
        ProxyPath("relay-splice-asyncio", ("--mode", "splice", "--loop", "asyncio")),
        ProxyPath("relay-splice-transparent", ("--mode", "splice", "--transparent"), True),
    )
}
DEFAULT_PATHS = (
    "direct",
    "haproxy",
    "haproxy-splice",
    "relay-splice",
    "relay-copy",
    "relay-copy-sha256",
)
BASELINES = ("direct", "haproxy", "haproxy-splice")


@dataclass
class Endpoint:
    """Where c1 connects for one path, and the proxy processes behind it (none for direct)."""

    path: ProxyPath
    bulk_port: int
    echo_port: int
    pids: tuple[int, ...]


# --- roles run inside the namespaces (python -m labs.benchmarks.relay --role ...) ---------


def echo_server(port: int) -> None:
    """A threaded echo service on every address (the same service behind every path)."""

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while chunk := conn.recv(1 << 16):
                conn.sendall(chunk)

    listener = socket.create_server(("0.0.0.0", port), backlog=1024, reuse_port=False)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def _exchange(sock: socket.socket, request: bytes) -> None:
    sock.sendall(request)
    received = 0
    while received < len(request):
        chunk = sock.recv(len(request) - received)
        if not chunk:
            raise ConnectionError("the echo service closed early")
        received += len(chunk)


def latency_client(host: str, port: int, requests: int, connects: int) -> dict[str, Any]:
    """Round-trip times in µs: ``requests`` in a row on one connection, then ``connects``
    connections each carrying one request (connect, request, response, close)."""
    request = os.urandom(REQUEST_BYTES)
    one_connection: list[float] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(requests + requests // 10):
            started = time.perf_counter_ns()
            _exchange(sock, request)
            if index >= requests // 10:  # the first tenth warms caches and the window
                one_connection.append((time.perf_counter_ns() - started) / 1000)
    per_connection: list[float] = []
    for _ in range(connects):
        started = time.perf_counter_ns()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _exchange(sock, request)
        per_connection.append((time.perf_counter_ns() - started) / 1000)
    return {"rr_us": _percentiles(one_connection), "connect_us": _percentiles(per_connection)}


def _percentiles(samples: list[float]) -> dict[str, float]:
    return {"p50": nearest_rank(samples, 0.5), "p99": nearest_rank(samples, 0.99)}


# --- the lab side ---------------------------------------------------------------------------


def _this_module(*args: object) -> list[str]:
    return [sys.executable, "-m", "labs.benchmarks.relay", *map(str, args)]


def _start(node: Node, kind: str, argv: Sequence[str], address: str, port: int) -> Service:
    workdir = node.lab.workdir
    log_path = workdir / f"{kind}-{port}.log"
    with open(log_path, "ab") as log:
        process = node.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(PROJECT_ROOT))
    service = Service(kind, node, IPv4Address(address), port, process, workdir, log_path)
    return wait_until_listening(service)


def haproxy_config(
    frontends: Sequence[tuple[str, int, int]],
    options: Sequence[str] = ("option splice-auto",),
) -> str:
    """TCP mode with ``options`` in the defaults; ``frontends`` are (bind address, port,
    service port)."""
    lines = [
        "global",
        "    maxconn 4096",  # 2 fds each, within the default 20000-fd limit
        "defaults",
        "    mode tcp",
        *(f"    {option}" for option in options),
        "    timeout connect 5s",
        "    timeout client 1m",
        "    timeout server 1m",
    ]
    for address, port, service_port in frontends:
        lines += [
            f"listen relay_{port}",
            f"    bind {address}:{port}",
            f"    server service {LOOPBACK}:{service_port}",
        ]
    return "\n".join(lines) + "\n"


def start_haproxy(
    node: Node,
    frontends: Sequence[tuple[str, int, int]],
    options: Sequence[str] = ("option splice-auto",),
) -> Service:
    config = node.lab.workdir / f"haproxy-{frontends[0][1]}.cfg"
    config.write_text(haproxy_config(frontends, options))
    address, port, _ = frontends[0]
    service = _start(node, "haproxy", ["haproxy", "-f", str(config), "-db"], address, port)
    for address, port, _ in frontends[1:]:
        wait_until_listening(
            Service("haproxy", node, IPv4Address(address), port, service.process,
                    service.workdir, service.log_path)
        )  # fmt: skip
    return service


def setup_return_path(node: Node, service_ports: Sequence[int]) -> None:
    """Replies from the loopback services to client addresses are delivered locally, so that
    transparent connections work (what TransparentReturnPath does in production)."""
    for port in service_ports:
        node.run(
            ["ip", "rule", "add", "from", LOOPBACK, "ipproto", "tcp", "sport", str(port),
             "lookup", RETURN_TABLE],
            check=True, timeout=10,
        )  # fmt: skip
    node.run(
        ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", RETURN_TABLE],
        check=True,
        timeout=10,
    )
    node.sysctl("net.ipv4.conf.all.route_localnet", 1)
    node.sysctl("net.ipv4.conf.lo.route_localnet", 1)


def start_endpoints(lab: Lab, names: Sequence[str]) -> list[Endpoint]:
    server = lab["s1"]
    address = str(server.address)
    endpoints: list[Endpoint] = []
    port = 6000
    proxied = [PATHS[name] for name in names if name != "direct"]
    if any(path.transparent for path in proxied):
        setup_return_path(server, (IPERF_PORT, ECHO_PORT))
    for path in proxied:
        port += 2
        if path.haproxy_options:
            frontends = [(address, port, IPERF_PORT), (address, port + 1, ECHO_PORT)]
            haproxy = start_haproxy(server, frontends, path.haproxy_options)
            pids: tuple[int, ...] = (haproxy.process.pid,)
        else:
            pids = tuple(
                _start(
                    server,
                    path.name,
                    [sys.executable, "-m", "proxy.relay", "--listen", f"{address}:{listen}",
                     "--service", f"{LOOPBACK}:{service_port}", *path.relay_args],
                    address,
                    listen,
                ).process.pid
                for listen, service_port in ((port, IPERF_PORT), (port + 1, ECHO_PORT))
            )  # fmt: skip
        endpoints.append(Endpoint(path, port, port + 1, pids))
    if "direct" in names:
        endpoints.insert(0, Endpoint(PATHS["direct"], IPERF_PORT, ECHO_PORT, ()))
    order = {name: index for index, name in enumerate(names)}
    return sorted(endpoints, key=lambda endpoint: order[endpoint.path.name])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def background_busy_pct(window_s: float = 1.0) -> float:
    """How busy the machine is while the lab is idle (% of one CPU): other work on the host
    (other tests, other labs) makes every figure of the round noisier."""
    before = machine_busy_ticks()
    time.sleep(window_s)
    after = machine_busy_ticks()
    share = (after[0] - before[0]) / max(1, after[1] - before[1])
    return 100 * share * (os.cpu_count() or 1)


def measure_bulk(lab: Lab, endpoint: Endpoint, seconds: float, reverse: bool) -> dict[str, Any]:
    before = [cpu_seconds(pid) for pid in endpoint.pids]
    busy_before = machine_busy_ticks()
    started = time.monotonic()
    result = iperf3(
        lab["c1"], lab["s1"].address, port=endpoint.bulk_port, duration_s=seconds, reverse=reverse
    )
    elapsed = time.monotonic() - started
    busy_after = machine_busy_ticks()
    after = [cpu_seconds(pid) for pid in endpoint.pids]
    user = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    cpus = os.cpu_count() or 1
    busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    return {
        "gbit_s": result.received_mbit / 1000,
        "retransmits": result.retransmits,
        "proxy_user_pct": 100 * user / elapsed,
        "proxy_system_pct": 100 * system / elapsed,
        "machine_busy_pct": 100 * busy * cpus,  # of one CPU, as top counts
        # what the path costs the machine, whatever the scheduler made of the run
        "machine_cpu_s_per_gb": busy * cpus / (result.received_mbit / 8000)
        if result.received_mbit
        else 0.0,
    }


# Where each party of a bulk run is pinned, as (proxy, iperf3 server, iperf3 client) CPUs: with
# two vCPUs, two of the three share one, and which two decides much of a relayed path's speed.
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "proxy with the server": ("0", "0", "1"),
    "proxy with the client": ("0", "1", "0"),
    "proxy alone": ("1", "0", "0"),
}


def measure_bulk_pinned(
    lab: Lab,
    endpoint: Endpoint,
    seconds: float,
    reverse: bool,
    iperf_server_pid: int,
    layout: tuple[str, str, str],
) -> float:
    """Throughput (Gbit/s) of one iperf3 run with the parties pinned as ``layout`` says."""
    proxy_cpu, server_cpu, client_cpu = layout
    set_affinity(endpoint.pids, proxy_cpu)
    set_affinity([iperf_server_pid], server_cpu)
    argv = [
        "taskset", "-c", client_cpu, "iperf3", "-c", str(lab["s1"].address),
        "-p", str(endpoint.bulk_port), "-J", "-t", f"{seconds:g}", *(["-R"] if reverse else []),
    ]  # fmt: skip
    try:
        completed = lab["c1"].run(argv, timeout=seconds + 20)
    finally:
        set_affinity([*endpoint.pids, iperf_server_pid], f"0-{(os.cpu_count() or 1) - 1}")
    return parse_iperf3_json(completed.stdout).received_mbit / 1000


def set_affinity(pids: Sequence[int], cpus: str) -> None:
    """Move every thread of each process in ``pids`` to ``cpus`` (taskset list syntax)."""
    for pid in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpus, str(pid)],
            check=True,
            capture_output=True,
            timeout=10,
        )


def measure_latency(
    lab: Lab, endpoint: Endpoint, requests: int, connects: int, *, pin: Sequence[int] = ()
) -> dict[str, Any]:
    """Latency through ``endpoint``. With ``pin`` (the service's pids), the client, the
    service and the proxy all run on CPU 0 for the measurement: a wakeup across CPUs costs
    tens of µs in this VM, and where the scheduler places each process differs from run to
    run, so pinned figures show the processing cost alone."""
    argv = _this_module(
        "--role", "latency-client", "--host", lab["s1"].address, "--port", endpoint.echo_port,
        "--requests", requests, "--connects", connects,
    )  # fmt: skip
    pids = (*pin, *endpoint.pids)
    if pin:
        set_affinity(pids, "0")
        argv = ["taskset", "-c", "0", *argv]
    try:
        completed = lab["c1"].run(argv, check=True, timeout=CLIENT_TIMEOUT_S, cwd=PROJECT_ROOT)
    finally:
        if pin:
            set_affinity(pids, f"0-{(os.cpu_count() or 1) - 1}")
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def _median_row(
    runs: list[dict[str, Any]], baselines: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Medians of a path's runs in one direction. Ratios are taken round by round (against
    the baseline's run of the same round) and then their median: on a shared machine the
    background load drifts between rounds, and a round's runs are close together in time."""
    row: dict[str, Any] = {key: statistics.median(run[key] or 0 for run in runs) for key in runs[0]}
    row["runs_gbit_s"] = [round(run["gbit_s"], 2) for run in runs]
    for name, base_runs in baselines.items():
        ratios = [
            run["gbit_s"] / base["gbit_s"]
            for run, base in zip(runs, base_runs, strict=True)
            if base["gbit_s"]
        ]
        row[f"vs_{name}"] = statistics.median(ratios) if ratios else None
    return row


def _summary(
    bulk: dict[str, dict[str, list[dict[str, Any]]]],
    latency: dict[str, list[dict[str, Any]]],
    pinned: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for name, directions in bulk.items():
        row: dict[str, Any] = {}
        for direction, runs in directions.items():
            baselines: dict[str, list[dict[str, Any]]] = {
                base: bulk[base][direction] for base in BASELINES if base in bulk
            }
            row[direction] = _median_row(runs, baselines)
        row["latency"] = _median_latency(latency[name])
        row["latency_one_cpu"] = _median_latency(pinned[name])
        paths[name] = row
    return paths


def run_benchmark(
    names: Sequence[str],
    seconds: float,
    repeat: int,
    requests: int,
    connects: int,
    progress: Callable[[str], None],
    placement_repeat: int = 0,
) -> dict[str, Any]:
    with Lab(PoolTopo(servers=1, clients=1, outsiders=0)) as lab:
        server = lab["s1"]
        iperf_server = start_iperf3_server(server, port=IPERF_PORT, address="0.0.0.0")
        echo = _start(server, "echo", _this_module("--role", "echo-server", "--port", ECHO_PORT),
                      "0.0.0.0", ECHO_PORT)  # fmt: skip
        endpoints = start_endpoints(lab, names)
        bulk: dict[str, dict[str, list[dict[str, Any]]]] = {
            e.path.name: {"client_to_service": [], "service_to_client": []} for e in endpoints
        }
        latency: dict[str, list[dict[str, Any]]] = {e.path.name: [] for e in endpoints}
        pinned: dict[str, list[dict[str, Any]]] = {e.path.name: [] for e in endpoints}
        background: list[float] = []
        for round_index in range(repeat):
            background.append(background_busy_pct())
            for endpoint in endpoints:
                name = endpoint.path.name
                for direction, reverse in (
                    ("client_to_service", False),
                    ("service_to_client", True),
                ):
                    run = measure_bulk(lab, endpoint, seconds, reverse)
                    bulk[name][direction].append(run)
                    progress(f"round {round_index + 1}/{repeat} {name} {direction}: "
                             f"{run['gbit_s']:.2f} Gbit/s")  # fmt: skip
                latency[name].append(measure_latency(lab, endpoint, requests, connects))
                pinned[name].append(
                    measure_latency(lab, endpoint, requests, connects, pin=(echo.process.pid,))
                )
        placement: dict[str, dict[str, dict[str, float]]] = {}
        if placement_repeat and (os.cpu_count() or 1) >= 2:
            for endpoint in endpoints:
                name = endpoint.path.name
                placement[name] = {}
                for layout_name, layout in LAYOUTS.items():
                    cell = {}
                    for direction, reverse in (
                        ("client_to_service", False),
                        ("service_to_client", True),
                    ):
                        runs = [
                            measure_bulk_pinned(
                                lab, endpoint, seconds, reverse, iperf_server.process.pid, layout
                            )
                            for _ in range(placement_repeat)
                        ]
                        cell[direction] = statistics.median(runs)
                    placement[name][layout_name] = cell
                    progress(f"placement {name} {layout_name}: {cell}")
        return {
            "date": time.strftime("%Y-%m-%d"),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "seconds": seconds,
            "repeat": repeat,
            "requests": requests,
            "connects": connects,
            "background_busy_pct": background,
            "placement": placement,
            "paths": _summary(bulk, latency, pinned),
        }


def _median_latency(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        kind: {q: statistics.median(run[kind][q] for run in runs) for q in ("p50", "p99")}
        for kind in ("rr_us", "connect_us")
    }


def _cpu_per_gb(row: dict[str, Any]) -> str:
    value = row.get("machine_cpu_s_per_gb")
    return "-" if not value else f"{value:.2f}"


def _ratio(row: dict[str, Any], base: str) -> str:
    value = row.get(f"vs_{base}")
    return "-" if value is None else f"{value:.2f}x"


def idle_and_runs_lines(background_busy_pct: Sequence[float], paths: dict[str, Any]) -> list[str]:
    """The machine's load before each round and every run's throughput, under a table."""
    background = ", ".join(f"{value:.0f}" for value in background_busy_pct)
    lines = [
        "",
        f"Machine busy before each round with the lab idle (% of one CPU): {background}",
        "",
        "Throughput per run (Gbit/s, c->s then s->c):",
    ]
    for name, row in paths.items():
        lines.append(
            f"- {name}: {row['client_to_service']['runs_gbit_s']} "
            f"{row['service_to_client']['runs_gbit_s']}"
        )
    return lines


def render(results: dict[str, Any]) -> str:
    paths = results["paths"]
    lines = [
        "| path | c->s Gbit/s | s->c Gbit/s | vs direct c->s / s->c | "
        "vs haproxy c->s / s->c | vs haproxy-splice c->s / s->c |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in paths.items():
        up, down = row["client_to_service"], row["service_to_client"]
        ratios = " | ".join(f"{_ratio(up, base)} / {_ratio(down, base)}" for base in BASELINES)
        lines.append(f"| {name} | {up['gbit_s']:.2f} | {down['gbit_s']:.2f} | {ratios} |")
    lines += [
        "",
        "CPU during the bulk runs: the proxy process (user + system, % of one CPU), the whole",
        "machine (% of one CPU, 2 CPUs = 200), and machine CPU-seconds per GB moved:",
        "",
        "| path | proxy c->s | proxy s->c | machine c->s / s->c | CPU-s per GB c->s / s->c |",
        "|---|---|---|---|---|",
    ]
    for name, row in paths.items():
        up, down = row["client_to_service"], row["service_to_client"]
        cpu = [f"{r['proxy_user_pct']:.0f}+{r['proxy_system_pct']:.0f}" for r in (up, down)]
        if name == "direct":
            cpu = ["-", "-"]
        lines.append(
            f"| {name} | {cpu[0]} | {cpu[1]} | "
            f"{up['machine_busy_pct']:.0f} / {down['machine_busy_pct']:.0f} | "
            f"{_cpu_per_gb(up)} / {_cpu_per_gb(down)} |"
        )
    lines += [
        "",
        "Latency of a 100-byte request and its echo (µs, p50 / p99); *one CPU*: client, service",
        "and proxy pinned to CPU 0 (no cross-CPU wakeups):",
        "",
        "| path | one connection | new connection each | one connection, one CPU | "
        "new connection each, one CPU |",
        "|---|---|---|---|---|",
    ]
    for name, row in paths.items():
        cells = [
            f"{row[key][kind]['p50']:.0f} / {row[key][kind]['p99']:.0f}"
            for key in ("latency", "latency_one_cpu")
            for kind in ("rr_us", "connect_us")
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    lines += idle_and_runs_lines(results["background_busy_pct"], paths)
    placement = results.get("placement") or {}
    if placement:
        lines += [
            "",
            "Pinned (Gbit/s c->s / s->c; direct has no proxy: server and client apart in the",
            "first two layouts, together in the third):",
            "",
            "| path | " + " | ".join(LAYOUTS) + " |",
            "|---|" + "---|" * len(LAYOUTS),
        ]
        for name, cells in placement.items():
            row_text = " | ".join(
                f"{cells[layout]['client_to_service']:.2f} / "
                f"{cells[layout]['service_to_client']:.2f}"
                for layout in LAYOUTS
            )
            lines.append(f"| {name} | {row_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per iperf3 run (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--requests", type=int, default=2000,
                        help="round trips on one connection per round (default 2000)")  # fmt: skip
    parser.add_argument(
        "--connects",
        type=int,
        default=500,
        help="new connections, one request each, per round (default 500)",
    )
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"comma-separated, of: {', '.join(PATHS)}")  # fmt: skip
    parser.add_argument(
        "--placement",
        type=int,
        default=0,
        metavar="N",
        help="also run every path N times per pinned layout of proxy, iperf3 server and client",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--role", choices=("echo-server", "latency-client"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "echo-server":
        echo_server(args.port)
        return 0
    if args.role == "latency-client":
        print(json.dumps(latency_client(args.host, args.port, args.requests, args.connects)))
        return 0
    names = [name.strip() for name in args.paths.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown or not names:
        parser.error(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    if not 1 <= args.repeat <= 100 or not 0 < args.seconds <= 600:
        parser.error("--repeat must be in [1, 100] and --seconds in (0, 600]")

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = run_benchmark(
            names,
            args.seconds,
            args.repeat,
            args.requests,
            args.connects,
            progress,
            placement_repeat=args.placement,
        )
    except LabError as error:
        print(f"relay benchmark: {error}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
