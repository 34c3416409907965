"""Benchmark: the roaming data path, through both shims and across live migrations.

    python -m labs.benchmarks.roaming shims [--seconds 3] [--repeat 3] [--json]
    python -m labs.benchmarks.roaming migration [--seconds 20] [--repeat 1] [--json]

Each subcommand builds one lab, runs real programs only (``roam server``/``roam client`` through
``labs.roaming.RoamingLab``, iperf3, nginx, HAProxy, and small Python clients of this module run
inside the client's namespace), measures every configuration next to its baseline in the same
run, prints a table with ratios (or, with ``--json``, the figures).

``shims`` (the steady state, no roam): ``PoolTopo(servers=2, clients=1)``. On s1: ``iperf3 -s`` on
127.0.0.1:8000 (the legacy service behind the shims and HAProxy) and another on s1's LAN address
(the direct path); nginx serving a 100-byte file on 127.0.0.1:8080 and the LAN address (the
request/response service). Paths from c1:

* ``direct``: to the services on s1's LAN address, no shims;
* ``haproxy``: HAProxy in TCP mode in the server shim's place (LAN:81/82 -> loopback), with
  ``option splice-auto`` (its default heuristic), and ``haproxy-splice``, forced to splice
  (``labs.benchmarks.relay`` builds both);
* ``shims-reconnect``: client to the VIP through ``roam client --migration reconnect`` (an nft
  rewrite) and ``roam server --migration reconnect`` (splice relay, transparent inner
  connection), in a deployment of s1 and s2 whose epochs last a day or more, s1 first: the
  service never leaves s1 while the benchmark runs;
* ``shims-live``: the same with ``--migration live`` on both shims: the client copies SYNs and
  data to NFLOG, the server relays in copy mode with the stream observers (codec, running
  hashes, replay log) and pushes checkpoints;
* ``shims-live-1server``: ``--migration live`` in a deployment of s1 alone (tick 1 s), as the
  issue describes the steady state. (Until commit "Server shim: keep when the service
  leaves", a live server shim with no other server to hand over to spent most of a CPU
  looking for the next change of server; the two-server deployment shows the shims without
  that cost.)

Bulk: ``iperf3 -J`` client -> service and service -> client (``-R``), with the CPU the proxy
processes used. Latency: HTTP/1.1 GETs of the 100-byte file, p50/p99 of ``--requests`` in a row
on one keep-alive connection and of ``--connects`` with a new connection each. The server shim
is restarted between modes and between services (``RoamingLab.start_server`` with
``--service``); paths are interleaved round by round; ratios are taken per round against the
baselines of the same round, then the median. Last, the shims' CPU with no traffic at all.

``migration`` (roams): ``PoolTopo(servers=3, clients=1)``; nginx on each server (identical
files, identical mtimes) behind ``roam server``; one deployment after another in the same lab:

* RTT: ``ping`` c1 -> s1.
* Pause and goodput: a Python client in c1 downloads a 64 MiB file through the VIP again and
  again on one keep-alive connection for ``--seconds``, time-stamping every receive: paced at
  8 MiB/s with a 32 KiB receive buffer (the machine is not saturated; the buffer can hide up to
  ~8 ms of a pause), and as fast as it can. Every complete file is checked (sha256). Each runs
  on three deployments: ``roaming`` (s1-s3, ``tick=0.5, m=1``: a roam about every second),
  ``1 server`` (s1 alone, the issue's baseline) and, in live mode, ``3, no roam`` (s1-s3 with
  epochs of a day: no roam, and none of the one-server cost above). The pause of a roam as the
  application sees it is the longest interval without data around the client shim's
  ``switch`` event, from the freeze on (a stall that spans several roams counts once, for the
  roam it began in); the shim's own ``pause_ms`` (freeze to switch) is reported beside it.
  With ``--migration reconnect`` the connection breaks at each roam (reset, or no data for
  ``--stall-timeout``): the client reconnects and asks for the rest with a Range request, as
  ``curl -C -`` would; its pause is the interval without data, and the time from noticing the
  break to data again is reported too. c1's ``PAWSEstab`` counter (segments its TCP dropped as
  older than the last timestamp seen) is read before and after each run.
* Cost per re-incarnated connection: a Python client in c1 opens N (1, 100, 1000) HTTP/1.1
  keep-alive connections through the VIP, one GET each, holds them across one roam
  (``tick=2``), then sends one more GET on each. From the client shim's ``roam`` event:
  connections, outcomes, ``pause_ms``; from the new server's ``prepared`` events: how long the
  preparations took; the switch's lateness against the schedule.

Tests never assert times; this script is where speed is judged (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from labs import Lab, PoolTopo
from labs.benchmarks.relay import (
    background_busy_pct,
    machine_busy_ticks,
    start_haproxy,
)
from labs.benchmarks.relay import cpu_seconds as user_system_seconds
from labs.clients import iperf3
from labs.errors import LabError
from labs.node import Node
from labs.roaming import LISTEN_PORT, SERVICE_PORT, RoamingLab, write_content
from labs.services import Service, nginx_config, start_iperf3_server, wait_until_listening
from labs.stats import p50_p99

HTTP_CHUNK = 256 * 1024
GAP_FLOOR_S = 0.0005  # inter-arrival gaps above this are kept for the per-roam analysis
SMALL_BYTES = 100
BIG_MIB = 64
PACED_RATE = 8 * 1024 * 1024  # bytes/s
PACED_RCVBUF = 32 * 1024  # the kernel doubles it: ~8 ms of data at the paced rate
LATENCY_PORT = 8080
DIRECT_BULK_PORT = 5201
HAPROXY_PORTS = {"haproxy": (81, 82), "haproxy-splice": (83, 84)}
SHIM_PATHS = (
    "direct",
    "haproxy",
    "haproxy-splice",
    "shims-reconnect",
    "shims-live",
    "shims-live-1server",
)
STILL_TICK = 100_000.0  # epochs of a day or more: no roam while a benchmark runs
BASELINES = ("direct", "haproxy", "haproxy-splice")
CONNECTION_COUNTS = (1, 100, 1000)
CLIENT_TIMEOUT_S = 180.0
# Programs of this project started in the lab run from the project root (see relay.py).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


# --- pure parts: statistics, log analysis, parsers -----------------------------------------


def median_ratio(runs: Sequence[float], bases: Sequence[float]) -> float | None:
    """Median of the per-round ratios ``runs[i] / bases[i]`` (rounds with a zero base left
    out): robust to background load drifting between rounds."""
    ratios = [run / base for run, base in zip(runs, bases, strict=True) if base]
    return statistics.median(ratios) if ratios else None


def ping_times(output: str) -> list[float]:
    """Round-trip times (ms) of every reply in ``ping`` output."""
    return [float(value) for value in re.findall(r"time=([\d.]+) ms", output)]


def netstat_counters(text: str) -> dict[str, int]:
    """``/proc/net/netstat`` (or ``snmp``) as ``{"TcpExt.PAWSEstab": n, ...}``."""
    counters: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        prefix, _, keys = names.partition(":")
        _, _, numbers = values.partition(":")
        for key, value in zip(keys.split(), numbers.split(), strict=False):
            try:
                counters[f"{prefix}.{key}"] = int(value)
            except ValueError:
                continue
    return counters


def roam_pauses(
    gaps: Sequence[Sequence[float]],
    switches: Sequence[float],
    *,
    freeze_s: Sequence[float] | None = None,
    after_s: float = 1.5,
    floor_s: float = GAP_FLOOR_S,
) -> list[float | None]:
    """For each switch time, the longest interval without data that overlaps its window: from
    its freeze (``freeze_s[i]`` before the switch) less 0.1 s until ``after_s`` after the
    switch, or until the next roam's window starts. ``gaps`` are (last data, next data) pairs
    longer than ``floor_s``. A gap counts for the first roam whose window it overlaps only: a
    roam that began (froze) or switched inside an earlier roam's stall gets ``None``; a window
    that no gap overlaps gets ``floor_s`` (an upper bound)."""
    count = len(switches)
    order = sorted(range(count), key=lambda i: switches[i])
    freezes = [switches[i] - (freeze_s[i] if freeze_s else 0.0) for i in range(count)]
    starts = [min(freezes[i], switches[i]) - 0.1 for i in range(count)]
    owner: dict[int, int] = {}
    for rank, index in enumerate(order):
        end = switches[index] + after_s
        if rank + 1 < count:
            end = min(end, max(switches[index], starts[order[rank + 1]]))
        for number, (first, last) in enumerate(gaps):
            if number not in owner and last >= starts[index] and first < end:
                owner[number] = index
    result: list[float | None] = []
    for index in range(count):
        mine = [last - first for n, (first, last) in enumerate(gaps) if owner.get(n) == index]
        inside = any(
            first <= freezes[index] <= last or first <= switches[index] <= last
            for n, (first, last) in enumerate(gaps)
            if n in owner and owner[n] != index
        )
        result.append(None if inside else max(mine) if mine else floor_s)
    return result


def events_of(events: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event.get("event") == name]


def analyse_stream(
    stream: dict[str, Any], client_events: Sequence[dict[str, Any]], stall_timeout: float
) -> dict[str, Any]:
    """Per-roam pauses of one download: the application's (from its receive time stamps) and
    the shim's (``roam`` events), matched to the client shim's ``switch`` events that fell
    inside the download."""
    first, last = stream["first"], stream["last"]
    switches = [e for e in events_of(client_events, "switch") if first < e["ts"] < last]
    roams = {e["epoch"]: e for e in events_of(client_events, "roam")}
    leads = []
    shim_pauses: list[float] = []
    outcomes: dict[str, int] = {}
    for switch in switches:
        roam = roams.get(switch.get("epoch"))
        pause_ms = roam.get("pause_ms") if roam else None
        if pause_ms is not None:
            shim_pauses.append(float(pause_ms))
        leads.append((pause_ms or 0.0) / 1000)
        for outcome, count in (roam or {}).get("outcomes", {}).items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    pauses = roam_pauses(
        stream["gaps"],
        [s["ts"] for s in switches],
        freeze_s=leads,
        after_s=max(1.5, stall_timeout + 1.0),
    )
    app = [pause for pause in pauses if pause is not None]
    failed: dict[str, int] = {}
    for event in events_of(client_events, "handoff"):
        if first < event["ts"] < last and event["outcome"] not in ("migrated", "closed"):
            line = f"{event['outcome']}: {str(event.get('detail', ''))[:200]}"
            failed[line] = failed.get(line, 0) + 1
    breaks = stream["breaks"]
    recovery = [1000 * (b["data_again"] - b["detected"]) for b in breaks if "data_again" in b]
    return {
        "roams": len(switches),
        "app_pause_ms": [None if value is None else round(1000 * value, 3) for value in pauses],
        "roams_inside_a_stall": pauses.count(None),
        "app_pause": {k: v * 1000 if k != "n" else v for k, v in p50_p99(app).items()},
        "app_pause_max_ms": 1000 * max(app, default=0.0),
        "shim_pause_ms": shim_pauses,
        "shim_pause": p50_p99(shim_pauses),
        "outcomes": outcomes,
        "handoffs_not_migrated": failed,
        "breaks": len(breaks),
        "break_errors": sorted({b["error"].split(":")[0] for b in breaks}),
        "recovery_ms": recovery,
    }


# --- roles run inside the namespaces (python -m labs.benchmarks.roaming --role ...) ------


def _raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _request(path: str, host: str, start: int = 0) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: roaming-benchmark"]
    if start:
        lines.append(f"Range: bytes={start}-")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of an HTTP/1.1 response head (without the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, length


def _read_head(sock: socket.socket, pending: bytearray) -> tuple[int, int]:
    """Read one response head (``pending`` holds bytes already received; it is left holding
    the body bytes that came with the head)."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        pending += chunk
    end = pending.index(b"\r\n\r\n")
    status, length = parse_head(bytes(pending[:end]))
    del pending[: end + 4]
    return status, length


def _get(sock: socket.socket, path: str, host: str) -> int:
    """One GET on a keep-alive connection; returns the status after reading the body."""
    sock.sendall(_request(path, host))
    pending = bytearray()
    status, length = _read_head(sock, pending)
    while len(pending) < length:
        chunk = sock.recv(length - len(pending))
        if not chunk:
            raise ConnectionError("closed in the body")
        pending += chunk
    return status


class _Arrivals:
    """Time stamps of received data: the gaps above a floor (for pauses), and totals."""

    def __init__(self, floor_s: float) -> None:
        self.floor_s = floor_s
        self.first = 0.0
        self.last = 0.0
        self.bytes = 0
        self.receives = 0
        self.gaps: list[tuple[float, float]] = []

    def add(self, now: float, count: int) -> None:
        if self.bytes == 0:
            self.first = now
        elif now - self.last > self.floor_s:
            self.gaps.append((round(self.last, 6), round(now, 6)))
        self.last = now
        self.bytes += count
        self.receives += 1


def stream_client(
    host: str,
    port: int,
    path: str,
    seconds: float,
    *,
    rate: float = 0.0,
    rcvbuf: int = 0,
    stall_timeout: float = 0.0,
    expected_sha256: str = "",
) -> dict[str, Any]:
    """Download ``path`` again and again on one HTTP/1.1 keep-alive connection for ``seconds``,
    time-stamping every receive. ``rate`` (bytes/s) paces the reads; ``stall_timeout`` treats
    that long without data as a broken connection. A broken connection (reset, closed, or
    stalled) is replaced by a new one that asks for the rest of the file with a Range request,
    as ``curl -C -`` would; each break is reported. Every complete file is checked against
    ``expected_sha256``."""
    deadline = time.time() + seconds
    arrivals = _Arrivals(GAP_FLOOR_S)
    breaks: list[dict[str, Any]] = []
    files = bad_files = 0
    offset = 0  # position within the current file
    digest = hashlib.sha256()
    chunk_size = HTTP_CHUNK if rate <= 0 else max(4096, int(rate / 1000))
    sock: socket.socket | None = None
    broken: dict[str, Any] | None = None
    pending = bytearray()
    remaining = 0
    paced_from = 0.0
    paced_bytes = 0
    while time.time() < deadline:
        try:
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                if rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.settimeout(stall_timeout or 30.0)
                sock.connect((host, port))
                pending = bytearray()
                remaining = 0
            if remaining == 0:
                sock.sendall(_request(path, host, offset))
                status, length = _read_head(sock, pending)
                if status not in (200, 206):
                    raise ConnectionError(f"HTTP status {status}")
                if offset == 0:
                    digest = hashlib.sha256()
                remaining = length
            if pending:
                data = bytes(pending[:remaining])
                del pending[: len(data)]
            else:
                data = sock.recv(min(chunk_size, remaining))
                if not data:
                    raise ConnectionError("closed by the service")
            now = time.time()
            if broken is not None:
                broken["data_again"] = round(now, 6)
                breaks.append(broken)
                broken = None
            arrivals.add(now, len(data))
            if expected_sha256:
                digest.update(data)
            offset += len(data)
            remaining -= len(data)
            if remaining == 0:
                files += 1
                if expected_sha256 and digest.hexdigest() != expected_sha256:
                    bad_files += 1
                offset = 0
            if rate > 0:
                paced_from = paced_from or now
                paced_bytes += len(data)
                due = paced_from + paced_bytes / rate
                if due > now:
                    time.sleep(due - now)
        except (OSError, ValueError, IndexError) as error:
            if broken is None:
                broken = {
                    "last_data": round(arrivals.last, 6),
                    "detected": round(time.time(), 6),
                    "error": type(error).__name__ + (f": {error}" if str(error) else ""),
                    "offset": offset,
                }
            if sock is not None:
                sock.close()
                sock = None
            remaining = 0
            time.sleep(0.001)
    if sock is not None:
        sock.close()
    if broken is not None:
        breaks.append(broken)
    elapsed = arrivals.last - arrivals.first
    return {
        "bytes": arrivals.bytes,
        "first": arrivals.first,
        "last": arrivals.last,
        "mbit_s": 8 * arrivals.bytes / elapsed / 1e6 if elapsed > 0 else 0.0,
        "files": files,
        "bad_files": bad_files,
        "receives": arrivals.receives,
        "gaps": arrivals.gaps,
        "breaks": breaks,
    }


def latency_client(host: str, port: int, path: str, requests: int, connects: int) -> dict[str, Any]:
    """HTTP/1.1 GET round trips in µs: ``requests`` in a row on one keep-alive connection
    (after a tenth as many for warm-up), then ``connects`` connections with one GET each
    (connect, request, response, close)."""
    one_connection: list[float] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(requests + requests // 10):
            started = time.perf_counter_ns()
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
            if index >= requests // 10:
                one_connection.append((time.perf_counter_ns() - started) / 1000)
    per_connection: list[float] = []
    for _ in range(connects):
        started = time.perf_counter_ns()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
        per_connection.append((time.perf_counter_ns() - started) / 1000)
    return {"rr_us": p50_p99(one_connection), "connect_us": p50_p99(per_connection)}


SLOW_GET_MS = 500.0


def hold_client(host: str, port: int, path: str, count: int) -> None:
    """Open ``count`` keep-alive connections with one GET each, report, hold them until a line
    arrives on stdin, then send one more GET on each and report again (JSON lines)."""
    limit = _raise_nofile(2 * count + 100)
    sockets: list[socket.socket] = []
    errors: list[str] = []
    started = time.time()
    for _ in range(count):
        try:
            sock = socket.create_connection((host, port), timeout=10)
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
            sockets.append(sock)
        except OSError as error:
            errors.append(f"{type(error).__name__}: {error}")
    ready = {
        "ready": time.time(),
        "setup_s": time.time() - started,
        "opened": len(sockets),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "nofile": limit,
        "ports": sorted(sock.getsockname()[1] for sock in sockets),
    }
    print(json.dumps(ready), flush=True)
    sys.stdin.readline()
    times: list[float] = []
    failures: list[str] = []
    slow: list[list[float]] = []  # [port, when it ended, ms] of GETs slower than SLOW_GET_MS
    for sock in sockets:
        began = time.perf_counter()
        try:
            sock.settimeout(10)
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
            times.append(1000 * (time.perf_counter() - began))
            if times[-1] > SLOW_GET_MS:
                slow.append([sock.getsockname()[1], round(time.time(), 3), round(times[-1], 1)])
        except OSError as error:
            failures.append(f"port {sock.getsockname()[1]}: {type(error).__name__}: {error}")
        sock.close()
    print(
        json.dumps(
            {
                "answered": len(times),
                "failed": len(failures),
                "errors": sorted(set(failures))[:5],
                "get_ms": {**p50_p99(times), "max": max(times, default=0.0)},
                "slow": slow[:20],
            }
        ),
        flush=True,
    )


def _this_module(*args: object) -> list[str]:
    return [sys.executable, "-m", "labs.benchmarks.roaming", *map(str, args)]


# --- the lab side: shared --------------------------------------------------------------------


def source_state() -> dict[str, Any]:
    """The commit measured, and the tracked files modified in the working tree (other work in
    progress changes what a benchmark measures). ``SOURCE_COMMIT`` names the commit of a tree
    exported without its repository."""
    state: dict[str, Any] = {"commit": os.environ.get("SOURCE_COMMIT", "unknown"), "modified": []}
    try:
        head = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return state
    state["commit"] = head.stdout.strip()
    state["modified"] = [line[3:] for line in status.stdout.splitlines()]
    return state


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_service_nginx(
    node: Node, root: Path, port: int, *, extra_listen: str = "", connections: int = 4096
) -> Service:
    """nginx on 127.0.0.1:``port`` (and ``extra_listen``), with room for ``connections`` and
    unlimited requests per keep-alive connection (nginx closes after 1000 by default)."""
    workdir = node.lab.workdir / f"{node.name}-nginx-bench-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    config = nginx_config(
        workdir,
        root.resolve(),
        IPv4Address("127.0.0.1"),
        port,
        http_config="    keepalive_requests 1000000;",
        server_config=f"        listen {extra_listen};" if extra_listen else "",
    )
    config = re.sub(r"worker_connections \d+;", f"worker_connections {connections};", config)
    (workdir / "nginx.conf").write_text(config)
    argv = ["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e",
            str(workdir / "error.log")]  # fmt: skip
    log_path = workdir / "error.log"
    with open(workdir / "stdout.log", "ab") as log:
        process = node.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    service = Service("nginx", node, IPv4Address("127.0.0.1"), port, process, workdir, log_path)
    return wait_until_listening(service)


def client_counters(node: Node) -> dict[str, int]:
    completed = node.run(["cat", "/proc/net/netstat", "/proc/net/snmp"], timeout=10)
    return netstat_counters(completed.stdout)


def counter_delta(before: dict[str, int], after: dict[str, int], *names: str) -> dict[str, int]:
    return {name.split(".")[-1]: after.get(name, 0) - before.get(name, 0) for name in names}


def restart_shims(
    pool: RoamingLab,
    mode: str,
    servers: Sequence[str],
    extra: Sequence[str] = (),
    *,
    client: bool = True,
) -> None:
    """Stop the running shims (only the server shims unless ``client``) and start them in
    ``mode``; return once every one has started and a gate is open."""
    stopping = [*(pool.clients.values() if client else ()), *pool.servers.values()]
    for shim in stopping:
        shim.stop()
    if client:
        pool.clients.clear()
    pool.servers.clear()
    pool.migration = mode
    for host in servers:
        pool.start_server(host, *extra)
    if client:
        for host in pool.client_hosts:
            pool.start_client(host)
    pool.wait_ready()
    deadline = time.monotonic() + 15
    while not any(
        e["event"] == "gate" and e.get("open")
        for shim in pool.servers.values()
        for e in shim.events()
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("no server gate opened within 15 s")
        time.sleep(0.05)
    time.sleep(0.2)


def deploy(
    pool: RoamingLab,
    *,
    mode: str,
    servers: Sequence[str],
    tick: float,
    first_switch_after: float = 0.0,
    first_server: str | None = None,
    extra: Sequence[str] = (),
) -> None:
    """A fresh deployment (new chain, new bundles) of ``servers`` in the same lab, its shims
    started in ``mode`` and ready, returning once its schedule has begun. ``first_server``:
    draw until that host serves the first epoch (with a long tick and ``first_switch_after``,
    the service then stays there for the whole benchmark)."""
    for shim in [*pool.clients.values(), *pool.servers.values()]:
        shim.stop()
    pool.clients.clear()
    pool.servers.clear()
    pool.server_hosts = list(servers)
    pool.tick = tick
    pool.migration = mode
    pool.first_switch_after = first_switch_after
    for _attempt in range(50):
        for host in pool.client_hosts:
            # ``roam subscribe`` refuses to overwrite a bundle, and the client shim refuses a
            # state file of another deployment.
            bundle = pool.bundle_path(host)
            bundle.unlink(missing_ok=True)
            bundle.with_name(bundle.name + ".state").unlink(missing_ok=True)
        pool.create()
        if first_server is None or pool.schedule(1, 1)[0]["server"] == pool.listen_of(first_server):
            break
    else:
        raise RuntimeError(f"no deployment starting on {first_server} in 50 draws")
    restart_shims(pool, mode, servers, extra)
    pool.wait_for_schedule(0.3)


def shim_trouble(pool: RoamingLab) -> dict[str, int]:
    """Warnings and errors in the running shims' logs (and connection resets), counted."""
    counts: dict[str, int] = {}
    for shim in [*pool.servers.values(), *pool.clients.values()]:
        for event in shim.events():
            if event.get("level") == "info" and event["event"] not in ("connection_reset",):
                continue
            reason = str(event.get("reason") or event.get("status") or "")[:240]
            line = f"{shim.kind} {shim.host}: {event['event']} {reason}".rstrip()
            counts[line] = counts.get(line, 0) + 1
    return counts


def trouble_lines(counts: dict[str, int], limit: int = 15) -> list[str]:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [f"- {count} x {line}" for line, count in ordered[:limit]]


# --- shims: steady-state data path ------------------------------------------------------------


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
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy_before = machine_busy_ticks()
    started = time.monotonic()
    result = iperf3(lab["c1"], address, port=port, duration_s=seconds, reverse=reverse)
    elapsed = time.monotonic() - started
    busy_after = machine_busy_ticks()
    cpus = os.cpu_count() or 1
    busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    return {
        "gbit_s": result.received_mbit / 1000,
        "retransmits": result.retransmits or 0,
        "cpu_pct": {
            name: 100 * (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()
        },
        "machine_busy_pct": 100 * busy * cpus,
    }


def measure_latency(
    lab: Lab, address: str, port: int, requests: int, connects: int
) -> dict[str, Any]:
    argv = _this_module(
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


SHIM_SETUPS = {
    "shims-reconnect": ShimSetup("reconnect", 2),
    "shims-live": ShimSetup("live", 2),
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
        self.label: str | None = None
        self.log: dict[str, dict[str, int]] = {}

    def collect(self) -> None:
        """Count the running shims' complaints under the path they ran for (call before they
        are replaced)."""
        if self.label is not None:
            self.log[self.label] = _sum_dicts([self.log.get(self.label, {}),
                                               shim_trouble(self.pool)])  # fmt: skip

    def use(self, path: str, service_port: int) -> dict[str, int]:
        pool = self.pool
        setup = SHIM_SETUPS[path]
        extra = ("--service", f"127.0.0.1:{service_port}")
        changing = (self.deployment, self.mode, self.service) != (
            setup.servers,
            setup.mode,
            service_port,
        )
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
        elif (self.mode, self.service) != (setup.mode, service_port):
            restart_shims(pool, setup.mode, ["s1"], extra, client=self.mode != setup.mode)
        self.deployment, self.mode, self.service = setup.servers, setup.mode, service_port
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
) -> dict[str, Any]:
    with Lab(PoolTopo(servers=2, clients=1)) as lab:
        pool = RoamingLab(lab, m=1, service="none", start_delay=1.0)
        server = lab["s1"]
        lan = str(server.address)
        server.run(["ip", "link", "set", "lo", "up"], check=True)
        start_iperf3_server(server, port=SERVICE_PORT, address="127.0.0.1")
        start_iperf3_server(server, port=DIRECT_BULK_PORT, address=lan)
        root = write_content(lab.workdir / "www", {"small": os.urandom(SMALL_BYTES)})
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
        latency: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        background: list[float] = []
        for round_index in range(repeat):
            background.append(background_busy_pct())
            for path in paths:
                address, port, pids = target(path, SERVICE_PORT)
                for direction, reverse in (("client_to_service", False),
                                           ("service_to_client", True)):  # fmt: skip
                    run = measure_bulk(lab, address, port, seconds, reverse, pids)
                    bulk[path][direction].append(run)
                    speed = f"{run['gbit_s']:.2f} Gbit/s, {run['retransmits']} retransmits"
                    progress(f"round {round_index + 1}/{repeat} {path} {direction}: {speed}")
        for round_index in range(repeat):
            for path in paths:
                address, port, _ = target(path, LATENCY_PORT)
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


def summarise_shims(
    bulk: dict[str, dict[str, list[dict[str, Any]]]], latency: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Medians per path and direction, ratios per round against each baseline."""
    paths: dict[str, Any] = {}
    for path, directions in bulk.items():
        row: dict[str, Any] = {}
        for direction, runs in directions.items():
            speeds = [run["gbit_s"] for run in runs]
            cell: dict[str, Any] = {
                "gbit_s": statistics.median(speeds),
                "runs_gbit_s": [round(value, 2) for value in speeds],
                "retransmits": statistics.median(run["retransmits"] for run in runs),
                "machine_busy_pct": statistics.median(run["machine_busy_pct"] for run in runs),
                "cpu_pct": {
                    name: statistics.median(run["cpu_pct"][name] for run in runs)
                    for name in runs[0]["cpu_pct"]
                },
            }
            for base in BASELINES:
                if base in bulk:
                    base_speeds = [run["gbit_s"] for run in bulk[base][direction]]
                    cell[f"vs_{base}"] = median_ratio(speeds, base_speeds)
            row[direction] = cell
        row["latency"] = {
            kind: {
                q: statistics.median(run[kind][q] for run in latency[path]) for q in ("p50", "p99")
            }
            for kind in ("rr_us", "connect_us")
        }
        paths[path] = row
    return paths


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def source_line(results: dict[str, Any]) -> list[str]:
    source = results.get("source")
    if not source:
        return []
    modified = source.get("modified") or []
    dirty = f"; modified tracked files: {', '.join(modified)}" if modified else " (clean tree)"
    return [f"Source: commit {source.get('commit')}{dirty}", ""]


def render_shims(results: dict[str, Any]) -> str:
    paths = results["paths"]
    bases = [base for base in BASELINES if base in paths]
    lines = [
        *source_line(results),
        "| path | c->s Gbit/s | s->c Gbit/s | "
        + " | ".join(f"vs {base} c->s / s->c" for base in bases)
        + " |",
        "|---|---|---|" + "---|" * len(bases),
    ]
    for name, row in paths.items():
        up, down = row["client_to_service"], row["service_to_client"]
        ratios = " | ".join(
            f"{_ratio(up.get(f'vs_{base}'))} / {_ratio(down.get(f'vs_{base}'))}" for base in bases
        )
        lines.append(f"| {name} | {up['gbit_s']:.2f} | {down['gbit_s']:.2f} | {ratios} |")
    lines += [
        "",
        "CPU during the bulk runs (% of one CPU; machine: 2 CPUs = 200) and TCP retransmissions",
        "(iperf3's sender count, median):",
        "",
        "| path | proxy processes c->s | proxy processes s->c | machine c->s / s->c | "
        "retransmits c->s / s->c |",
        "|---|---|---|---|---|",
    ]
    for name, row in paths.items():
        up, down = row["client_to_service"], row["service_to_client"]
        cpu = [
            ", ".join(f"{proc} {pct:.0f}" for proc, pct in cell["cpu_pct"].items()) or "-"
            for cell in (up, down)
        ]
        lines.append(
            f"| {name} | {cpu[0]} | {cpu[1]} | {up['machine_busy_pct']:.0f} / "
            f"{down['machine_busy_pct']:.0f} | {up['retransmits']:.0f} / "
            f"{down['retransmits']:.0f} |"
        )
    lines += [
        "",
        f"Latency of a GET of a {SMALL_BYTES}-byte file from nginx (µs, p50 / p99):",
        "",
        "| path | one keep-alive connection | new connection each |",
        "|---|---|---|",
    ]
    for name, row in paths.items():
        cells = [
            f"{row['latency'][kind]['p50']:.0f} / {row['latency'][kind]['p99']:.0f}"
            for kind in ("rr_us", "connect_us")
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    background = ", ".join(f"{value:.0f}" for value in results["background_busy_pct"])
    lines += [
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
    idle = results.get("idle_shim_cpu_pct") or {}
    if idle:
        lines += ["", "Shims with no traffic at all (% of one CPU):"]
        for path, cpu in idle.items():
            lines.append(f"- {path}: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    for path, log in (results.get("shim_log") or {}).items():
        if log:
            lines += ["", f"Shim log of {path} (warnings, errors, connection resets):"]
            lines += trouble_lines(log)
    return "\n".join(lines)


# --- migration: roams ---------------------------------------------------------------------------


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


def measure_stream(
    pool: RoamingLab, run: StreamRun, seconds: float, stall_timeout: float, digest: str
) -> dict[str, Any]:
    client = pool.lab["c1"]
    before = client_counters(client)
    argv = _this_module(
        "--role", "stream-client", "--host", pool.vip, "--port", 80, "--path", "/big",
        "--seconds", seconds, "--rate", run.rate, "--rcvbuf", run.rcvbuf,
        "--stall-timeout", stall_timeout, "--sha256", digest,
    )  # fmt: skip
    completed = client.run(argv, timeout=seconds + CLIENT_TIMEOUT_S, cwd=PROJECT_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"stream client failed: {completed.stderr.strip()[-300:]}")
    after = client_counters(client)
    stream: dict[str, Any] = json.loads(completed.stdout)
    analysis = analyse_stream(stream, pool.clients["c1"].events(), stall_timeout)
    return {
        "mbit_s": stream["mbit_s"],
        "bytes": stream["bytes"],
        "files": stream["files"],
        "bad_files": stream["bad_files"],
        "client_tcp": counter_delta(
            before, after, "TcpExt.PAWSEstab", "Tcp.RetransSegs", "Tcp.InErrs"
        ),
        **analysis,
        "shim_log": shim_trouble(pool),
    }


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
        _this_module("--role", "hold-client", "--host", pool.vip, "--port", 80,
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
    for event in events_of(pool.clients["c1"].events(), "handoff"):
        if event["port"] in ports and event["epoch"] < roam["epoch"]:
            line = f"epoch {event['epoch']} {event['outcome']}: {str(event.get('detail'))[:200]}"
            earlier[line] = earlier.get(line, 0) + 1
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
        "roam": {k: roam[k] for k in ("epoch", "server", "connections", "outcomes", "pause_ms")},
        "ours": ours,
        "earlier_handoffs": earlier,
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


def run_migration(
    seconds: float,
    repeat: int,
    tick: float,
    stall_timeout: float,
    counts: Sequence[int],
    progress: Callable[[str], None],
    with_streams: bool = True,
) -> dict[str, Any]:
    big = os.urandom(BIG_MIB * 1024 * 1024)
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
        "streams": {},
        "connections": [],
    }
    with Lab(PoolTopo(servers=3, clients=1)) as lab:
        pool = RoamingLab(lab, tick=tick, m=1, service="none", start_delay=2.0)
        every = list(pool.server_hosts)
        for host in every:
            lab[host].run(["ip", "link", "set", "lo", "up"], check=True)
            root = write_content(lab.workdir / f"www-{host}", {"big": big, "small": small})
            start_service_nginx(lab[host], root, SERVICE_PORT)
        results["rtt_ms"] = measure_rtt(lab, lab["s1"].address)
        progress(f"rtt c1 -> s1: {results['rtt_ms']}")
        streams: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for round_index in range(repeat if with_streams else 0):
            for run in STREAM_RUNS:
                for mode in ("live", "reconnect"):
                    for layout in LAYOUTS[mode]:
                        if layout == "single":
                            deploy(pool, mode=mode, servers=every[:1], tick=tick)
                        elif layout == "still":
                            deploy(pool, mode=mode, servers=every, tick=STILL_TICK,
                                   first_switch_after=seconds + 60)  # fmt: skip
                        else:
                            deploy(pool, mode=mode, servers=every, tick=tick)
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
                            f"breaks {measured['breaks']}, {measured['client_tcp']}"
                        )
        results["streams"] = summarise_streams(streams)
        if counts:
            try:
                deploy(pool, mode="live", servers=every, tick=2.0, first_switch_after=2.0)
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


def summarise_streams(streams: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per (run, mode): goodput single and roaming (median over rounds, ratio per round) and
    the pauses of all roams of all rounds."""
    summary: dict[str, Any] = {}
    for key, layouts in streams.items():
        single, roaming = layouts["single"], layouts["roaming"]
        still = layouts.get("still", [])
        app = [p for run in roaming for p in run["app_pause_ms"] if p is not None]
        shim = [p for run in roaming for p in run["shim_pause_ms"]]
        speeds = [r["mbit_s"] for r in roaming]
        summary[key] = {
            "single_mbit_s": statistics.median(r["mbit_s"] for r in single),
            "still_mbit_s": statistics.median(r["mbit_s"] for r in still) if still else None,
            "roaming_mbit_s": statistics.median(speeds),
            "ratio": median_ratio(speeds, [r["mbit_s"] for r in single]),
            "ratio_still": median_ratio(speeds, [r["mbit_s"] for r in still]) if still else None,
            "roams": sum(r["roams"] for r in roaming),
            "roams_inside_a_stall": sum(r["roams_inside_a_stall"] for r in roaming),
            "app_pause_ms": {**p50_p99(app), "max": max(app, default=0.0)},
            "shim_pause_ms": {**p50_p99(shim), "max": max(shim, default=0.0)},
            "outcomes": _sum_dicts(r["outcomes"] for r in roaming),
            "breaks": [r["breaks"] for r in roaming],
            "single_breaks": [r["breaks"] for r in single],
            "break_errors": sorted({e for r in roaming for e in r["break_errors"]}),
            "recovery_ms": p50_p99(v for r in roaming for v in r["recovery_ms"]),
            "bad_files": sum(r["bad_files"] for r in [*single, *still, *roaming]),
            "files": sum(r["files"] for r in [*single, *still, *roaming]),
            "client_tcp": _sum_dicts(r["client_tcp"] for r in roaming),
            "single_client_tcp": _sum_dicts(r["client_tcp"] for r in single),
            "runs": {"single": single, "still": still, "roaming": roaming},
        }
    return summary


def _sum_dicts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for item in dicts:
        for key, value in item.items():
            total[key] = total.get(key, 0) + value
    return total


def connections_row(row: dict[str, Any]) -> str:
    setup, after = row["setup"], row["after"]
    outcomes = ", ".join(f"{k} {v}" for k, v in row["ours"].items()) or "-"
    first = row["first_prepare_to_switch_s"]
    prepare = row["prepare_s"]
    get = after["get_ms"]
    return (
        f"| {row['n']} | {setup['opened']} ({setup['setup_s']:.1f}) | "
        f"{row['roam']['connections']} | {outcomes} | {row['pause_ms']:.1f} | "
        f"{row['pause_per_connection_ms']:.3f} | {row['switch_late_ms']:.0f} | "
        f"{'-' if first is None else f'{first:.2f}'} | "
        f"{prepare['p50']:.4f} / {prepare['max']:.4f} | {after['answered']}/{setup['opened']} | "
        f"{get['p50']:.2f} / {get['p99']:.2f} / {get['max']:.2f} | "
        f"{row.get('client_tcp', {}).get('PAWSEstab', '-')} |"
    )


def connections_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    return (
        f"opened {row['setup']['opened']} in {row['setup']['setup_s']:.1f} s, roam with "
        f"{row['roam']['connections']}: {row['ours']}, pause {row['pause_ms']:.1f} ms, "
        f"answered after {row['after']['answered']}, errors "
        f"{row['setup']['errors'] + row['after']['errors']}"
    )


def render_migration(results: dict[str, Any]) -> str:
    rtt = results["rtt_ms"]
    lines = [
        *source_line(results),
        f"Lab RTT c1 -> s1 (ping, 50): p50 {rtt['p50']:.3f} ms, p99 {rtt['p99']:.3f} ms",
        "",
        "| download | migration | goodput Mbit/s: 1 server / 3, no roam / roaming | "
        "roaming vs 1 server / vs no roam | roams | app pause p50 / p99 / max ms | "
        "shim pause_ms p50 / p99 / max | outcomes | breaks | client PAWS drops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results["streams"].items():
        run, mode = key.split(" | ")
        app, shim = row["app_pause_ms"], row["shim_pause_ms"]
        shim_text = (
            f"{shim['p50']:.1f} / {shim['p99']:.1f} / {shim['max']:.1f}" if shim["n"] else "-"
        )
        outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items()) or "-"
        still = "-" if row["still_mbit_s"] is None else f"{row['still_mbit_s']:.0f}"
        stalled = row["roams_inside_a_stall"]
        inside = f" ({stalled} inside an earlier stall)" if stalled else ""
        lines.append(
            f"| {run} | {mode} | {row['single_mbit_s']:.0f} / {still} / "
            f"{row['roaming_mbit_s']:.0f} | {_ratio(row['ratio'])} / "
            f"{_ratio(row['ratio_still'])} | {row['roams']}{inside} | "
            f"{app['p50']:.1f} / {app['p99']:.1f} / {app['max']:.1f} | {shim_text} | "
            f"{outcomes} | {sum(row['breaks'])} | {row['client_tcp'].get('PAWSEstab', 0)} |"
        )
    files = sum(row["files"] for row in results["streams"].values())
    bad = sum(row["bad_files"] for row in results["streams"].values())
    lines += ["", f"Complete 64 MiB files received and checked (sha256): {files}, wrong: {bad}"]
    lines += ["", "Per roam, app pause (ms), in order:"]
    for key, row in results["streams"].items():
        pauses = [p for run in row["runs"]["roaming"] for p in run["app_pause_ms"]]
        text = ", ".join("(in the stall before)" if p is None else f"{p:.1f}" for p in pauses)
        lines.append(f"- {key}: {text}")
    recovery = [
        f"{key}: {row['recovery_ms']['p50']:.1f} ms ({', '.join(row['break_errors'])})"
        for key, row in results["streams"].items()
        if row["recovery_ms"]["n"]
    ]
    if recovery:
        lines += ["", "Reconnect: from noticing the break to data again (p50):"]
        lines += [f"- {line}" for line in recovery]
    for key, row in results["streams"].items():
        failed = _sum_dicts(run.get("handoffs_not_migrated", {}) for run in row["runs"]["roaming"])
        if failed:
            lines += ["", f"Hand-overs that did not migrate, {key}:"]
            lines += trouble_lines(failed)
    if results.get("connections_error"):
        lines += ["", f"Connections not measured: {results['connections_error']}"]
    if results["connections"]:
        lines += [
            "",
            "| N | opened (setup s) | in the roam | outcomes | pause_ms | per connection ms | "
            "switch late ms | first PREPARE to switch s | prepare on new server s p50 / max | "
            "answered after the roam | GET ms p50 / p99 / max | client PAWS drops |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        notes = []
        for row in results["connections"]:
            if "error" in row:
                lines.append(f"| {row['n']} | failed: {row['error']} |||||||||||")
                continue
            lines.append(connections_row(row))
            errors = [*row["setup"]["errors"], *row["after"]["errors"]]
            if errors:
                notes.append(f"- N={row['n']}: " + "; ".join(errors))
            for line, count in (row.get("earlier_handoffs") or {}).items():
                notes.append(f"- N={row['n']}, an earlier roam: {count} x {line}")
        if notes:
            lines += [
                "",
                "Errors the application saw, and earlier hand-overs of its connections:",
                *notes,
            ]
    for key, row in results["streams"].items():
        trouble = _sum_dicts(run["shim_log"] for run in row["runs"]["roaming"])
        if trouble:
            lines += ["", f"Shim log, {key}, roaming (warnings, errors, connection resets):"]
            lines += trouble_lines(trouble)
    if results["connections"]:
        # The connection runs share one deployment: the last count covers them all.
        trouble = results["connections"][-1].get("shim_log") or {}
        if trouble:
            lines += ["", "Shim log, connections (warnings, errors, connection resets):"]
            lines += trouble_lines(trouble)
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--role", choices=("stream-client", "latency-client", "hold-client"), help=argparse.SUPPRESS
    )
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/big", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--rcvbuf", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sha256", default="", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="shims: GETs in a row on one connection per round (default 2000)",
    )
    parser.add_argument(
        "--connects",
        type=int,
        default=500,
        help="shims: new connections, one GET each, per round (default 500)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="shims: per iperf3 run (default 3); migration: per download (default 20)",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="rounds (default 3 for shims, 1 for migration)"
    )
    parser.add_argument(
        "--paths",
        default=",".join(SHIM_PATHS),
        help=f"shims: comma-separated, of: {', '.join(SHIM_PATHS)}",
    )
    parser.add_argument(
        "--tick",
        type=float,
        default=0.5,
        help="migration: tick of the roaming deployment (default 0.5, m=1)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=0.25,
        help="migration, reconnect mode: no data this long is a broken connection (default 0.25 s)",
    )
    parser.add_argument(
        "--connections",
        default=",".join(map(str, CONNECTION_COUNTS)),
        help="migration: connection counts across one roam (default 1,100,1000; empty to skip)",
    )
    parser.add_argument(
        "--no-streams",
        action="store_true",
        help="migration: skip the downloads (pauses and goodput), only RTT and connections",
    )
    parser.add_argument("subcommand", nargs="?", choices=("shims", "migration"))
    args = parser.parse_args(argv)
    if args.role == "stream-client":
        print(
            json.dumps(
                stream_client(
                    args.host,
                    args.port,
                    args.path,
                    args.seconds or 10.0,
                    rate=args.rate,
                    rcvbuf=args.rcvbuf,
                    stall_timeout=args.stall_timeout,
                    expected_sha256=args.sha256,
                )
            )
        )
        return 0
    if args.role == "latency-client":
        print(
            json.dumps(
                latency_client(args.host, args.port, args.path, args.requests, args.connects)
            )
        )
        return 0
    if args.role == "hold-client":
        hold_client(args.host, args.port, args.path, args.count)
        return 0
    if args.subcommand is None:
        parser.error("choose a subcommand: shims or migration")
    if os.geteuid() != 0:
        parser.error("the benchmark builds network namespaces: run it as root")
    try:
        if args.subcommand == "shims":
            paths = [p.strip() for p in args.paths.split(",") if p.strip()]
            unknown = [p for p in paths if p not in SHIM_PATHS]
            if unknown or not paths:
                parser.error(f"unknown paths {unknown}; choose from {', '.join(SHIM_PATHS)}")
            seconds = args.seconds or 3.0
            repeat = args.repeat or 3
            if not 1 <= repeat <= 100 or not 0 < seconds <= 600:
                parser.error("--repeat must be in [1, 100] and --seconds in (0, 600]")
            results = run_shims(seconds, repeat, args.requests, args.connects, paths, _progress)
            print(json.dumps(results, indent=2) if args.json else render_shims(results))
        else:
            seconds = args.seconds or 20.0
            repeat = args.repeat or 1
            if not 1 <= repeat <= 20 or not 2 <= seconds <= 600:
                parser.error("--repeat must be in [1, 20] and --seconds in [2, 600]")
            counts = [int(c) for c in args.connections.split(",") if c.strip()]
            results = run_migration(
                seconds,
                repeat,
                args.tick,
                args.stall_timeout,
                counts,
                _progress,
                with_streams=not args.no_streams,
            )
            print(json.dumps(results, indent=2) if args.json else render_migration(results))
    except (LabError, RuntimeError) as error:
        print(f"roaming benchmark: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
