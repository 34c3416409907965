"""A local user who binds a shim's UDP port first: the shim refuses to start, says which port,
and leaves nothing behind (no nft table, no status file, no process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labs import Lab, PoolTopo
from labs.roaming import RoamingLab, roam_argv
from migrate.kernel.udp import PortTakenError, bind_exclusive, datagram_socket

pytestmark = pytest.mark.system

NOBODY = 65534
CONTROL_PORT = 47475  # proxy.daemon.DEFAULT_CONTROL_PORT
# A local user's socket: SO_REUSEADDR set (it would let a careless second bind share the port),
# bound to every address, waiting until the test closes its stdin.
SQUATTER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("bound", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def pool() -> Iterator[RoamingLab]:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    lab = Lab(PoolTopo(servers=1, clients=1, outsiders=0)).start()
    try:
        roaming = RoamingLab(lab, tick=0.25, m=2, update_period=0.5, start_delay=2.0)
        roaming.create()
        yield roaming
    finally:
        lab.close()


def squat(pool: RoamingLab, host: str, port: int) -> Any:
    """A process of uid nobody holding UDP ``port`` in ``host``'s namespace."""
    process = pool.lab[host].popen(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            SQUATTER,
            str(port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "bound"
    return process


def nft_tables(pool: RoamingLab, host: str) -> str:
    return pool.lab[host].run(["nft", "list", "tables"], check=True).stdout


def assert_refused(pool: RoamingLab, host: str, argv: list[str], port: int, what: str) -> None:
    status = pool.workdir / f"refused-{host}.status.json"
    log = pool.workdir / f"refused-{host}.jsonl"
    tables_before = nft_tables(pool, host)
    result = pool.lab[host].run(
        roam_argv(*argv, "--status", str(status), "--log-json", str(log)), timeout=60
    )
    print(result.stderr.strip())
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"UDP port {port} ({what}) is already taken by a socket of uid {NOBODY}" in lines[0]
    assert nft_tables(pool, host) == tables_before  # no table of ours left
    assert not status.exists()
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert not [e for e in events if e["event"] == "start"], events


def test_a_client_shim_refuses_a_roaming_port_a_local_user_holds(pool: RoamingLab) -> None:
    squatter = squat(pool, "c1", 47474)
    try:
        bundle = pool.bundle_path("c1")
        argv = ["client", "--bundle", str(bundle), "--migration", pool.migration]
        assert_refused(pool, "c1", argv, 47474, "roaming updates")
    finally:
        squatter.stdin.close()
        squatter.wait(timeout=10)


def test_a_server_shim_refuses_a_control_port_a_local_user_holds(pool: RoamingLab) -> None:
    squatter = squat(pool, "s1", CONTROL_PORT)
    try:
        argv = [
            "server",
            "--deployment",
            str(pool.deployment_dir),
            "--listen",
            pool.listen_of("s1"),
            "--service",
            "127.0.0.1:8080",
            "--migration",
            pool.migration,
        ]
        assert_refused(pool, "s1", argv, CONTROL_PORT, "group control")
    finally:
        squatter.stdin.close()
        squatter.wait(timeout=10)


def test_bind_exclusive_shares_the_port_with_no_one() -> None:
    """On loopback: a socket with SO_REUSEADDR (and SO_REUSEPORT) cannot share our port, in
    either order."""
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    ours = datagram_socket()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        bind_exclusive(ours, ("127.0.0.1", 0), "test")
        port = ours.getsockname()[1]
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="Address already in use"):
            other.bind(("0.0.0.0", port))
    finally:
        ours.close()
        other.close()
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    late = datagram_socket()
    try:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(PortTakenError, match=f"UDP port {port} \\(test\\) is already taken"):
            bind_exclusive(late, ("0.0.0.0", port), "test")
    finally:
        taken.close()
        late.close()


def test_udp_sockets_are_read_from_proc_with_their_addresses(tmp_path: Path) -> None:
    from migrate.kernel.udp import _udp_sockets

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        [(address, uid, inode)] = _udp_sockets(port)
        assert (str(address), uid, inode) == (
            "127.0.0.1",
            os.geteuid(),
            os.fstat(sock.fileno()).st_ino,
        )
    finally:
        sock.close()
