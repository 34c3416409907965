"""Real services inside lab hosts: python's http.server, nginx, redis-server, memcached,
iperf3 -s.

Each ``start_*`` helper starts the program in a host (tracked by the lab, so it is stopped at
the lab's close at the latest), waits until it listens on the requested address and port, and
returns a ``Service``. Readiness is read from ``/proc/<pid>/net/tcp`` (the sockets of the
service's namespace) and the file descriptors of the service and its descendants (the
listening socket must be theirs, not another server's on the same port): no probe connection
is made, so a service that counts or logs connections (iperf3 in particular) sees none. The
wait is bounded; a service that exits or does not listen in time raises ``ServiceStartError``
with the last line of its log.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from types import TracebackType
from typing import Any

from labs.errors import ServiceStartError
from labs.naming import NETNS_DIR
from labs.node import Node
from migrate.errors import ConfigError
from migrate.kernel.processes import DEFAULT_GRACE_S, namespace_inode, stop_children

READY_TIMEOUT_S = 10.0
_POLL_S = 0.02
_TCP_LISTEN = "0A"
_MAX_TREE = 256  # processes looked at for a service's listening socket


@dataclass
class Service:
    """A program serving TCP on ``address:port`` inside ``node``."""

    kind: str
    node: Node
    address: IPv4Address
    port: int
    process: subprocess.Popen[Any]
    workdir: Path
    log_path: Path

    def url(self, path: str = "/") -> str:
        return f"http://{self.address}:{self.port}{path}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, *, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop the service (SIGTERM, SIGKILL after ``grace_s``); safe to call twice."""
        stop_children([self.process], grace_s=grace_s)

    def kill(self) -> None:
        """SIGKILL the service at once, with the processes it forked (nginx's workers would
        otherwise keep its port): the whole process group, which is ours because every
        program a node starts leads a session of its own. Reaped before returning."""
        # The group outlives its leader while forked workers remain; the kernel does not reuse
        # the id of a live group, so this cannot hit a stranger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"invalid port {port!r}: must be an integer in [1, 65535]")
    return port


def _listen_address(node: Node, address: str | IPv4Address | None) -> IPv4Address:
    if address is None:
        return node.address
    try:
        parsed = ip_address(str(address))
    except ValueError as error:
        raise ConfigError(f"invalid service address {address!r}: {error}") from None
    if not isinstance(parsed, IPv4Address):
        raise ConfigError(f"invalid service address {address!r}: only IPv4 is supported")
    return parsed


def _service_dir(node: Node, kind: str, port: int) -> Path:
    path = node.lab.workdir / f"{node.name}-{kind}-{port}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a service may be a wrapper whose child listens)."""
    tree = [pid]
    for parent in tree:
        if len(tree) >= _MAX_TREE:
            break
        try:
            tasks = list(os.scandir(f"/proc/{parent}/task"))
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(task.path, "children").read_text().split()
            except OSError:
                continue
            tree += [int(child) for child in children if int(child) not in tree]
    return tree[:_MAX_TREE]


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets held open by ``pid`` and its descendants."""
    inodes = set()
    for member in _process_tree(pid):
        try:
            entries = list(os.scandir(f"/proc/{member}/fd"))
        except OSError:
            continue
        for entry in entries:
            try:
                target = os.readlink(entry.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _listening(pid: int, address: IPv4Address, port: int) -> bool:
    """Whether ``pid`` (or a descendant) holds a TCP socket listening on ``address:port``;
    another process listening there (a second start on a taken port) does not count."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    owned: set[str] | None = None
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _TCP_LISTEN:
            continue
        local_hex, port_hex = fields[1].split(":")
        local = IPv4Address(int.from_bytes(bytes.fromhex(local_hex), "little"))
        if int(port_hex, 16) != port or local not in (address, IPv4Address("0.0.0.0")):
            continue
        if owned is None:
            owned = _socket_inodes(pid)
        if fields[9] in owned:
            return True
    return False


def wait_until_listening(service: Service, *, timeout_s: float = READY_TIMEOUT_S) -> Service:
    """Return ``service`` once it listens; stop it and raise ``ServiceStartError`` if it exits
    or does not listen within ``timeout_s``."""
    netns_path = NETNS_DIR / service.node.netns
    wanted = namespace_inode(netns_path)
    deadline = time.monotonic() + timeout_s
    what = f"{service.kind} on {service.node.name} ({service.address}:{service.port})"
    while True:
        pid = service.process.pid
        if service.process.poll() is not None:
            tail = service.log_tail(1) or "no log output"
            raise ServiceStartError(
                f"{what} exited with status {service.process.returncode}: {tail}"
            )
        # until `ip netns exec` has entered the namespace, /proc/<pid>/net is the root's
        in_namespace = namespace_inode(Path(f"/proc/{pid}/ns/net")) == wanted
        if in_namespace and _listening(pid, service.address, service.port):
            return service
        if time.monotonic() >= deadline:
            service.stop()
            tail = service.log_tail(1) or "no log output"
            raise ServiceStartError(f"{what} did not listen within {timeout_s:g} s: {tail}")
        time.sleep(_POLL_S)


def _start(
    node: Node,
    kind: str,
    argv: Sequence[str],
    address: IPv4Address,
    port: int,
    workdir: Path,
    timeout_s: float,
) -> Service:
    log_path = workdir / f"{kind}.log"
    with open(log_path, "ab") as log:
        process = node.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir))
    service = Service(kind, node, address, port, process, workdir, log_path)
    return wait_until_listening(service, timeout_s=timeout_s)


def start_http_server(
    node: Node,
    directory: str | Path,
    *,
    port: int = 8000,
    address: str | IPv4Address | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Service:
    """Serve ``directory`` with ``python -m http.server`` (HTTP/1.0, one thread per request)."""
    port = _check_port(port)
    listen = _listen_address(node, address)
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"http server directory {root} does not exist")
    argv = [
        sys.executable,
        "-m",
        "http.server",
        "--bind",
        str(listen),
        "--directory",
        str(root),
        str(port),
    ]
    workdir = _service_dir(node, "http", port)
    return _start(node, "http.server", argv, listen, port, workdir, ready_timeout_s)


@functools.cache
def _nginx_modules_missing() -> frozenset[str]:
    """The upstream modules this nginx was built without (their temp paths must not be set)."""
    try:
        completed = subprocess.run(
            ["nginx", "-V"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(
        name
        for name in ("fastcgi", "uwsgi", "scgi")
        if f"--without-http_{name}_module" in completed.stderr
    )


def nginx_config(
    workdir: Path,
    root: Path,
    address: IPv4Address,
    port: int,
    *,
    http_config: str = "",
    server_config: str = "",
) -> str:
    """A private nginx configuration: pid file, logs and temp files all inside ``workdir``,
    in the foreground, as root (it reads whatever the test wrote)."""
    temp_paths = [
        f"    client_body_temp_path {workdir}/client_body;",
        f"    proxy_temp_path {workdir}/proxy;",
    ]
    temp_paths += [
        f"    {name}_temp_path {workdir}/{name};"
        for name in ("fastcgi", "uwsgi", "scgi")
        if name not in _nginx_modules_missing()
    ]
    mime = "    include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").exists() else ""
    return "\n".join(
        [
            "daemon off;",
            "master_process on;",
            "worker_processes 1;",
            "user root;",
            f"pid {workdir}/nginx.pid;",
            f"error_log {workdir}/error.log warn;",
            # Room for the benchmarks' 10,000 keep-alive connections (and the shim's own).
            "worker_rlimit_nofile 40000;",
            "events { worker_connections 20000; }",
            "http {",
            mime,
            "    default_type application/octet-stream;",
            f"    access_log {workdir}/access.log;",
            *temp_paths,
            "    sendfile on;",
            "    keepalive_timeout 65;",
            http_config,
            "    server {",
            f"        listen {address}:{port};",
            f"        root {root};",
            server_config,
            "    }",
            "}",
            "",
        ]
    )


DAV_PUT = """\
        dav_methods PUT;
        create_full_put_path on;
        client_max_body_size 0;
        client_body_timeout 60s;
"""
"""nginx's own WebDAV module (built into Debian's nginx): PUT stores the request body as a file
under the root, bodies of any size (``start_nginx(..., server_config=DAV_PUT)``)."""


def start_nginx(
    node: Node,
    root: str | Path,
    *,
    port: int = 80,
    address: str | IPv4Address | None = None,
    http_config: str = "",
    server_config: str = "",
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Service:
    """Serve ``root`` with nginx; ``http_config`` and ``server_config`` add directives."""
    port = _check_port(port)
    listen = _listen_address(node, address)
    root_path = Path(root)
    if not root_path.is_dir():
        raise ConfigError(f"nginx root {root_path} does not exist")
    workdir = _service_dir(node, "nginx", port)
    config = workdir / "nginx.conf"
    config.write_text(
        nginx_config(
            workdir,
            root_path.resolve(),
            listen,
            port,
            http_config=http_config,
            server_config=server_config,
        )
    )
    # -e: nginx opens its compiled-in error log before reading the config; point it here too
    argv = ["nginx", "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")]
    service = _start(node, "nginx", argv, listen, port, workdir, ready_timeout_s)
    service.log_path = workdir / "error.log"
    return service


def start_redis(
    node: Node,
    *,
    port: int = 6379,
    address: str | IPv4Address | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Service:
    """Start redis-server without persistence, in the foreground, listening on one address."""
    port = _check_port(port)
    listen = _listen_address(node, address)
    workdir = _service_dir(node, "redis", port)
    argv = [
        "redis-server",
        "--bind",
        str(listen),
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(workdir),
        *extra_args,
    ]
    return _start(node, "redis-server", argv, listen, port, workdir, ready_timeout_s)


def start_memcached(
    node: Node,
    *,
    port: int = 11211,
    address: str | IPv4Address | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Service:
    """Start memcached in the foreground, TCP only, listening on one address."""
    port = _check_port(port)
    listen = _listen_address(node, address)
    workdir = _service_dir(node, "memcached", port)
    argv = ["memcached", "-l", str(listen), "-p", str(port), "-U", "0", "-u", "root", "-m", "64"]
    return _start(node, "memcached", argv, listen, port, workdir, ready_timeout_s)


def start_tls_echo(
    node: Node,
    *,
    port: int = 4433,
    address: str | IPv4Address | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Service:
    """A TLS service: ``openssl s_server -rev`` (each line sent back reversed), with a
    throwaway self-signed certificate made for it. TLS end to end is what live migration
    cannot replay (the server's key share and records differ at every replica)."""
    port = _check_port(port)
    listen = _listen_address(node, address)
    workdir = _service_dir(node, "tls", port)
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=roam-lab", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    argv = ["openssl", "s_server", "-quiet", "-rev", "-accept", f"{listen}:{port}",
            "-cert", str(cert), "-key", str(key)]  # fmt: skip
    return _start(node, "openssl", argv, listen, port, workdir, ready_timeout_s)


def start_iperf3_server(
    node: Node,
    *,
    port: int = 5201,
    address: str | IPv4Address | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Service:
    """Start ``iperf3 -s`` (it serves one test at a time, any number of tests in a row)."""
    port = _check_port(port)
    listen = _listen_address(node, address)
    workdir = _service_dir(node, "iperf3", port)
    argv = ["iperf3", "-s", "-B", str(listen), "-p", str(port)]
    return _start(node, "iperf3", argv, listen, port, workdir, ready_timeout_s)
