"""The roaming benchmark's lab side shared by both subcommands: deployments, services,
shim restarts, counters and the shims' trouble log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from labs.benchmarks.roaming import PROJECT_ROOT
from labs.benchmarks.roaming.analysis import netstat_counters
from labs.node import Node
from labs.roaming import START_ATTEMPTS, START_MARGIN_S, RoamingLab, write_content
from labs.services import Service, nginx_config, wait_until_listening

GATE_OPEN_S = 15.0  # from the schedule's start until a server's gate has opened


def benchmark_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "labs.benchmarks.roaming", *map(str, args)]


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


def progress(message: str) -> None:
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


def serve_files_with_nginx(
    pool: RoamingLab, files: dict[str, bytes], port: int, connections: int = 4096
) -> None:
    """On every server of ``pool``: loopback up, ``files`` written to the host's own web root
    (the same bytes everywhere, as replicas serve them) and nginx serving them on ``port``,
    with room for ``connections`` (past it, nginx closes the connections it cannot hold)."""
    for host in pool.server_hosts:
        node = pool.lab[host]
        node.run(["ip", "link", "set", "lo", "up"], check=True)
        root = write_content(pool.lab.workdir / f"www-{host}", files)
        start_service_nginx(node, root, port, connections=connections)


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
) -> float:
    """Stop the running shims (only the server shims unless ``client``) and start them in
    ``mode``; return once every one has started and a gate is open. When they had all
    started (wall clock)."""
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
    ready_at = time.time()
    # A gate opens when the schedule begins, which may still be ahead (the start delay).
    deadline = time.monotonic() + max(0.0, pool.start_time - time.time()) + GATE_OPEN_S
    while not any(
        e["event"] == "gate" and e.get("open")
        for shim in pool.servers.values()
        for e in shim.events()
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no server gate opened within {GATE_OPEN_S:g} s of the start")
        time.sleep(0.05)
    time.sleep(0.2)
    return ready_at


def deploy(
    pool: RoamingLab,
    *,
    mode: str,
    servers: Sequence[str],
    tick: float,
    first_switch_after: float = 0.0,
    first_server: str | None = None,
    extra: Sequence[str] = (),
    switches: tuple[int, float] | None = None,
) -> None:
    """A fresh deployment (new chain, new bundles) of ``servers`` in the same lab, its shims
    started in ``mode`` and ready, returning once its schedule has begun. ``first_server``:
    draw until that host serves the first epoch (with a long tick and ``first_switch_after``,
    the service then stays there for the whole benchmark). ``switches``, ``(n, seconds)``: draw
    until the service changes server at least ``n`` times in the schedule's first ``seconds``
    (the schedule is random: a run that must meet roams asks for enough of them)."""
    for shim in [*pool.clients.values(), *pool.servers.values()]:
        shim.stop()
    pool.clients.clear()
    pool.servers.clear()
    pool.server_hosts = list(servers)
    pool.tick = tick
    pool.migration = mode
    pool.first_switch_after = first_switch_after
    for attempt in range(START_ATTEMPTS):
        draw(pool, first_server, switches)
        ready_at = restart_shims(pool, mode, servers, extra)
        # The schedule's start was fixed at creation: shims that took longer to start (4.6 to 8
        # s on a busy two-core machine) would miss its first roams, and a run asking for
        # ``switches`` would meet fewer. Drawn again with room (learnt for later deployments).
        late_by = ready_at + START_MARGIN_S - pool.start_time
        if late_by <= 0 or attempt == START_ATTEMPTS - 1:
            break
        progress(f"shims up {late_by:.1f} s too late for the schedule: deploying again")
        for shim in [*pool.clients.values(), *pool.servers.values()]:
            shim.stop()
        pool.start_delay += late_by + 1.0
    pool.wait_for_schedule(0.3)


def draw(pool: RoamingLab, first_server: str | None, switches: tuple[int, float] | None) -> None:
    """Create deployments until one meets ``first_server`` and ``switches`` (50 draws)."""
    for _attempt in range(50):
        for host in pool.client_hosts:
            # ``roam subscribe`` refuses to overwrite a bundle, and the client shim refuses a
            # state file of another deployment.
            bundle = pool.bundle_path(host)
            bundle.unlink(missing_ok=True)
            bundle.with_name(bundle.name + ".state").unlink(missing_ok=True)
        pool.create()
        if (
            first_server is None or pool.schedule(1, 1)[0]["server"] == pool.listen_of(first_server)
        ) and (switches is None or pool.switches_within(switches[1]) >= switches[0]):
            return
    raise RuntimeError(
        f"no deployment starting on {first_server} with {switches} switches in 50 draws"
    )


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
