"""A roaming deployment inside a lab: servers, shims, services and clients, ready to measure.

``RoamingLab`` turns a running ``PoolTopo`` lab into a working deployment: ``roam init`` with the
lab's server addresses, a bundle per client host, a legacy service on loopback of every server
host, a server shim in front of each and a client shim on each client host. Everything runs as
real processes (the ``roam`` command) inside the lab's namespaces and is stopped when the lab
closes; logs are JSON files in the lab's work directory.

Used by the system tests, the demo and the benchmarks::

    with Lab(PoolTopo(servers=3, clients=1)) as lab:
        deployment = RoamingLab(lab, tick=0.25, m=2)
        deployment.start()
        lab["c1"].run(["curl", deployment.url("/file")])
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs.errors import LabError
from labs.lab import Lab
from labs.node import Node

SERVICE_PORT = 8000
LISTEN_PORT = 80
READY_TIMEOUT_S = 15.0
CONTENT_MTIME = 1_700_000_000


def write_content(directory: Path, files: dict[str, bytes]) -> Path:
    """Identical replicas: the same bytes and modification times (ETag, Last-Modified)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = directory / name
        if not target.exists():
            target.write_bytes(data)
        # Replicas must serve identical bytes: the same content and the same modification
        # time (Last-Modified, and nginx's ETag, derive from it), as rsync -t would give.
        os.utime(target, (CONTENT_MTIME, CONTENT_MTIME))
    return directory


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete records of a JSON-lines log that a running process may be appending to:
    a last line without its newline is still being written (a reader can see part of a
    write), and is left for the next read."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def roam_argv(*args: str) -> list[str]:
    """The ``roam`` command, run with this interpreter (no reliance on PATH in namespaces)."""
    return [sys.executable, "-m", "roam_cli.main", *args]


# Stores the same text values in a memcached on 127.0.0.1 (JSON object on stdin, port argv[1]).
MEMCACHED_SEED = r"""
import json, socket, sys
values = json.load(sys.stdin)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
for key, value in values.items():
    data = value.encode()
    s.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(data), data))
    answer = b""
    while not answer.endswith(b"\r\n"):
        answer += s.recv(100)
    assert answer == b"STORED\r\n", answer
"""


@dataclass
class ShimProcess:
    host: str
    kind: str  # "server" | "client"
    process: subprocess.Popen[Any]
    log_json: Path
    stderr_path: Path
    status_path: Path

    def events(self) -> list[dict[str, Any]]:
        return read_json_lines(self.log_json)

    def stderr_tail(self, lines: int = 10) -> str:
        if not self.stderr_path.exists():
            return ""
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=5)


START_ATTEMPTS = 3
START_MARGIN_S = 0.5


@dataclass
class RoamingLab:
    lab: Lab
    tick: float = 0.25
    m: int = 2
    delta: float = 0.05
    gamma: float = 0.05
    chain_length: int = 100_000
    start_delay: float = 2.0
    active: int = 1  # k of N: servers active per epoch (``roam init --active``)
    migration: str = "reconnect"
    update_period: float = 1.0
    min_switches: int = 0
    switch_window: float = 0.0
    # ... and comes back to the server it left one epoch before (A, B, A) this often in it.
    min_returns: int = 0
    first_switch_after: float = 0.0  # no switch in the first seconds (time to set things up)
    subscribe_options: dict[str, str] = field(default_factory=dict)  # e.g. {"rate-kbit": "800"}
    service: str = "http"  # "http" | "nginx" | "redis" | "memcached" | "tls" | "none"
    content: dict[str, bytes] = field(default_factory=dict)
    # nginx only: directives added to its server block (e.g. WebDAV PUT, labs.services.DAV_PUT)
    service_config: str = ""
    server_extra: Sequence[str] = ()
    # Each server host holds its own copy of the deployment directory, taken when the
    # deployment is created, as on separate machines: the operator's later changes (``roam
    # revoke``) reach a server only through the network, not through a shared file.
    server_dirs: bool = False
    client_extra: Sequence[str] = ()  # e.g. ("--cover-rate", "0")
    # More options for one host's shim, after the others (e.g. a hidden ``--clock-offset``):
    # ``start`` then starts it so, and draws again if the shims come up late.
    host_extra: dict[str, Sequence[str]] = field(default_factory=dict)
    servers: dict[str, ShimProcess] = field(default_factory=dict)
    clients: dict[str, ShimProcess] = field(default_factory=dict)
    services: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._runs = 0
        self.workdir = self.lab.workdir / "roaming"
        # 0700: it holds the shims' status files, JSON logs and bundles (the whole schedule).
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.deployment_dir = self.workdir / "deployment"
        topo = self.lab.topo
        self.server_hosts: list[str] = list(topo.servers)  # type: ignore[attr-defined]
        self.client_hosts: list[str] = list(topo.clients)  # type: ignore[attr-defined]
        subnet = topo.subnet()  # type: ignore[attr-defined]
        taken = {self.lab[name].address for name in self.server_hosts + self.client_hosts}
        self.vip = next(
            address for address in reversed(list(subnet.hosts())) if address not in taken
        )

    # -- deployment --------------------------------------------------------------------------

    def listen_of(self, host: str) -> str:
        return f"{self.lab[host].address}:{LISTEN_PORT}"

    @property
    def server_list(self) -> str:
        return ",".join(self.listen_of(host) for host in self.server_hosts)

    def bundle_path(self, host: str) -> Path:
        return self.workdir / f"{host}.bundle"

    def roam(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``roam`` on the lab's host side (offline commands)."""
        result = subprocess.run(
            roam_argv(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise LabError(f"roam {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def operate(
        self, *args: str, host: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run an operator command that talks to the servers (``threat``, ``trigger``,
        ``revoke``) from a host on the lab's network (default: the first client host)."""
        node = self.lab[host or self.client_hosts[0]]
        result = node.run(roam_argv(*args), timeout=timeout)
        if result.returncode != 0:
            raise LabError(f"roam {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def create(self) -> None:
        """``roam init`` the deployment (and subscribe the client hosts).

        With ``min_switches``, keep drawing new deployments until the schedule changes server
        at least that often within ``switch_window`` seconds of the start, and not within
        ``first_switch_after``: a test that needs ten roams in a transfer then gets them,
        whatever the random chain key."""
        for _attempt in range(100):
            self.start_time = round(time.time() + self.start_delay, 3)
            if self.deployment_dir.exists():
                shutil.rmtree(self.deployment_dir)
            self.roam(
                "init",
                str(self.deployment_dir),
                "--servers",
                self.server_list,
                "--vip",
                f"{self.vip}:{LISTEN_PORT}",
                "--chain-length",
                str(self.chain_length),
                "--m",
                str(self.m),
                "--tick",
                str(self.tick),
                "--start",
                str(self.start_time),
                "--delta",
                str(self.delta),
                "--gamma",
                str(self.gamma),
                *(("--active", str(self.active)) if self.active > 1 else ()),
            )
            if (
                self.switches_within(self.switch_window) >= self.min_switches
                and self.returns_within(self.switch_window) >= self.min_returns
                and self.switches_within(self.first_switch_after) == 0
            ):
                break
        else:
            raise LabError(f"no schedule with {self.min_switches} switches found in 100 draws")
        for host in self.client_hosts:
            # A bundle of an earlier draw (a restarted lab) belongs to another deployment.
            for stale in (self.bundle_path(host), Path(f"{self.bundle_path(host)}.state")):
                stale.unlink(missing_ok=True)
            self.subscribe(host, **self.subscribe_options)
        if self.server_dirs:
            for host in self.server_hosts:
                copy = self.server_dir(host)
                if copy.exists():
                    shutil.rmtree(copy)
                shutil.copytree(self.deployment_dir, copy)

    def server_dir(self, host: str) -> Path:
        """The deployment directory the server on ``host`` runs from."""
        if not self.server_dirs:
            return self.deployment_dir
        return self.workdir / f"deployment-{host}"

    def subscribe(self, host: str, name: str | None = None, **options: str) -> Path:
        name = name or host
        path = self.workdir / f"{name}.bundle"
        extra = [item for key, value in options.items() for item in (f"--{key}", value)]
        self.roam(
            "subscribe",
            str(self.deployment_dir),
            name,
            "--address",
            str(self.lab[host].address),
            "--until-epoch",
            str(self.chain_length),
            "--out",
            str(path),
            *extra,
        )
        return path

    # -- processes ---------------------------------------------------------------------------

    def _content_dir(self, host: str) -> Path:
        directory = write_content(self.workdir / f"www-{host}", self.content)
        (directory / "whoami").write_text(host)
        return directory

    def start_service(self, host: str) -> None:
        from labs.services import (
            start_http_server,
            start_memcached,
            start_nginx,
            start_redis,
            start_tls_echo,
        )

        node = self.lab[host]
        node.run(["ip", "link", "set", "lo", "up"], check=True)
        if self.service == "http":
            self.services[host] = start_http_server(
                node, self._content_dir(host), port=SERVICE_PORT, address="127.0.0.1"
            )
        elif self.service == "nginx":
            self.services[host] = start_nginx(
                node,
                self._content_dir(host),
                port=SERVICE_PORT,
                address="127.0.0.1",
                server_config=self.service_config,
            )
        elif self.service == "tls":
            self.services[host] = start_tls_echo(node, port=SERVICE_PORT, address="127.0.0.1")
        elif self.service == "memcached":
            self.services[host] = start_memcached(node, port=SERVICE_PORT, address="127.0.0.1")
            node.run(
                [sys.executable, "-c", MEMCACHED_SEED, str(SERVICE_PORT)],
                input=json.dumps({k: v.decode() for k, v in self.content.items()}),
                check=True,
            )
        elif self.service == "redis":
            # The same keys on every replica (the content, in database 0 and 3): a read-only
            # workload sees one service wherever it runs.
            self.services[host] = start_redis(node, port=SERVICE_PORT, address="127.0.0.1")
            for database in ("0", "3"):
                for key, value in self.content.items():
                    node.run(
                        ["redis-cli", "-p", str(SERVICE_PORT), "-n", database, "-x", "SET", key],
                        input=value.decode(),  # text values (redis-cli -x reads stdin)
                        check=True,
                    )

    def _spawn(self, host: str, kind: str, args: list[str]) -> ShimProcess:
        # Every run gets its own files, so a restarted shim's log starts empty.
        self._runs += 1
        stem = f"{kind}-{host}-{self._runs}"
        log_json = self.workdir / f"{stem}.jsonl"
        stderr_path = self.workdir / f"{stem}.stderr"
        status_path = self.workdir / f"{stem}.status.json"
        # 0600 like the shims' own files: their stderr lines name the active server too.
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with open(fd, "ab") as stderr:
            process = self.lab[host].popen(
                roam_argv(kind, *args, "--log-json", str(log_json), "--status", str(status_path)),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return ShimProcess(host, kind, process, log_json, stderr_path, status_path)

    def start_server(self, host: str, *extra: str) -> ShimProcess:
        shim = self._spawn(
            host,
            "server",
            [
                "--deployment",
                str(self.server_dir(host)),
                "--listen",
                self.listen_of(host),
                "--service",
                f"127.0.0.1:{SERVICE_PORT}",
                "--migration",
                self.migration,
                "--update-period",
                str(self.update_period),
                *self.server_extra,
                *extra,
                *self.host_extra.get(host, ()),
            ],
        )
        self.servers[host] = shim
        return shim

    def start_client(self, host: str, bundle: Path | None = None) -> ShimProcess:
        shim = self._spawn(
            host,
            "client",
            [
                "--bundle",
                str(bundle or self.bundle_path(host)),
                "--migration",
                self.migration,
                *self.client_extra,
                *self.host_extra.get(host, ()),
            ],
        )
        self.clients[host] = shim
        return shim

    def start(self) -> None:
        """Start the services, create the deployment, then start server and client shims.

        The schedule's start is fixed when the deployment is created; if the shims are not all
        up ``START_MARGIN_S`` before it (a busy machine), they are stopped and the deployment
        is drawn again with twice the delay: a test that asked for quiet first seconds
        (``first_switch_after``) gets them, counted from when everything runs."""
        if self.service != "none":
            for host in self.server_hosts:
                self.start_service(host)
        for attempt in range(START_ATTEMPTS):
            self.create()
            for host in self.server_hosts:
                self.start_server(host)
            for host in self.client_hosts:
                self.start_client(host)
            self.wait_ready()
            late_by = time.time() + START_MARGIN_S - self.start_time
            if late_by <= 0 or attempt == START_ATTEMPTS - 1:
                return
            for shim in [*self.clients.values(), *self.servers.values()]:
                shim.stop()
            self.start_delay = 2 * self.start_delay + late_by

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        for shim in [*self.servers.values(), *self.clients.values()]:
            while not any(event["event"] == "start" for event in shim.events()):
                if not shim.running():
                    raise LabError(
                        f"{shim.kind} shim on {shim.host} exited with {shim.process.returncode}: "
                        f"{shim.stderr_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{shim.kind} shim on {shim.host} did not start: {shim.stderr_tail()}"
                    )
                time.sleep(0.05)

    def wait_for_schedule(self, margin_s: float = 0.3) -> None:
        """Sleep until the schedule's first epoch has begun, and ``margin_s`` more."""
        time.sleep(max(0.0, self.start_time - time.time()) + margin_s)

    def stop(self) -> dict[str, int]:
        codes = {}
        for name, shim in [*self.clients.items(), *self.servers.items()]:
            codes[f"{shim.kind}-{name}"] = shim.stop()
        for service in self.services.values():
            service.stop()
        return codes

    # -- schedule ----------------------------------------------------------------------------

    def schedule(self, first: int = 1, count: int = 1000, *extra: str) -> list[dict[str, Any]]:
        """``roam schedule --json`` of the deployment, one dict per epoch (``extra``: more
        options, e.g. ``--clients``)."""
        result = self.roam(
            "schedule",
            "--deployment",
            str(self.deployment_dir),
            "--from",
            str(first),
            "--count",
            str(count),
            "--json",
            *extra,
        )
        return [json.loads(line) for line in result.stdout.splitlines()]

    def assignments(self, first: int = 1, count: int = 1000) -> list[dict[str, Any]]:
        """k of N: each epoch's active set and every client host's server (``roam schedule
        --clients``), the client hosts keyed by name."""
        names = {self.client_id(host): host for host in self.client_hosts}
        epochs = self.schedule(
            first, count, "--clients", ",".join(str(client) for client in sorted(names))
        )
        for epoch in epochs:
            epoch["assigned"] = {names[int(c)]: s for c, s in epoch["assigned"].items()}
        return epochs

    def client_id(self, host: str) -> int:
        """The client id in ``host``'s bundle."""
        from migrate.kernel.deployment import load_bundle

        return load_bundle(self.bundle_path(host)).client_id

    def _servers_within(self, seconds: float) -> list[str]:
        """The servers of the epochs that begin in the first ``seconds`` of the schedule."""
        if seconds <= 0:
            return []
        epochs = self.schedule(1, max(2, int(seconds / self.tick) + 2))
        end = self.start_time + seconds
        return [e["server"] for e in epochs if e["start"] < end]

    def switches_within(self, seconds: float) -> int:
        """How often the server changes in the first ``seconds`` of the schedule."""
        servers = self._servers_within(seconds)
        return sum(1 for a, b in itertools.pairwise(servers) if a != b)

    def returns_within(self, seconds: float) -> int:
        """How often, in the first ``seconds`` of the schedule, the service comes back to the
        server it left one epoch before (A, B, A)."""
        servers = self._servers_within(seconds)
        triples = zip(servers, servers[1:], servers[2:], strict=False)
        return sum(1 for a, b, c in triples if a != b and c == a)

    def switch_times(self, until_s: float) -> list[float]:
        """Unix times of the server changes from now to ``until_s`` seconds from now."""
        now = time.time()
        epochs = self.schedule(1, max(2, int((now + until_s - self.start_time) / self.tick) + 2))
        return [
            b["start"]
            for a, b in itertools.pairwise(epochs)
            if a["server"] != b["server"] and now <= b["start"] <= now + until_s
        ]

    def wait_for_switch_between(self, low_s: float, high_s: float, timeout_s: float = 60) -> float:
        """Sleep until the next server change is between ``low_s`` and ``high_s`` seconds away
        (so that something started then meets a roam, and not too late); returns its Unix
        time. ``LabError`` if the schedule offers no such moment within ``timeout_s``."""
        assert 0 <= low_s < high_s
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            ahead = self.switch_times(timeout_s + high_s)
            if not ahead:
                break
            wait = ahead[0] - time.time()
            if low_s <= wait <= high_s:
                return ahead[0]
            # Too close: let it pass. Too far: come back when it is ``high_s`` away.
            time.sleep(max(0.0, wait + 0.01 if wait < low_s else wait - high_s))
        raise LabError(f"no server change {low_s}-{high_s} s ahead within {timeout_s} s")

    def url(self, path: str = "/") -> str:
        return f"http://{self.vip}:{LISTEN_PORT}{path}"

    def host_of(self, listen: str) -> str:
        for host in self.server_hosts:
            if self.listen_of(host) == listen:
                return host
        raise LabError(f"{listen} is not a server of this lab")

    def node(self, host: str) -> Node:
        return self.lab[host]
