"""Range hand-overs with real nginx and curl (issue 14): a new server regenerates a download
from the client's position with Range + If-Range, and a replica that differs is refused.

Three server hosts in live mode in front of nginx, ``roam client`` on c1, curl as the
application. The evidence is the server shims' ``reincarnated`` and ``reincarnation_failed``
events, the client's hand-over outcomes, curl's result and the bytes it received.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from labs.faults import handoffs, unfinished
from labs.roaming import LISTEN_PORT, RoamingLab
from tests.system.test_live_migration import diagnostics, download, live_pool, resets, started

pytestmark = [pytest.mark.system, pytest.mark.slow]

MIB = 1024 * 1024


def server_events(pool: RoamingLab, name: str) -> list[dict[str, Any]]:
    return [e for shim in pool.servers.values() for e in shim.events() if e["event"] == name]


@pytest.mark.parametrize(
    ("live_relay", "range_bodies"),
    [("copy", "hash"), ("splice-thread", "hash"), ("splice-thread", "window")],
)
def test_a_256_mib_download_repeated_on_one_connection_moves_by_range_intact(
    live_relay: str, range_bodies: str
) -> None:
    """No rate limit: curl fetches the file eight times on one keep-alive connection while the
    service roams every half second or so. Each hand-over deep into a copy reads a window
    and the bytes since the last checkpoint from the new nginx, not the copy up to there.
    The same with the servers' zero-copy relay, its stream state fed by a thread; and with
    checkpoints committing to windows of the body only, whose other bytes the relay drops in
    the kernel (``--range-bodies window``)."""
    data = os.urandom(256 * MIB)
    copies = 8
    expected = hashlib.sha256()
    for _ in range(copies):
        expected.update(data)
    with live_pool(
        tick=0.5,
        m=1,
        service="nginx",
        content={"big": data},
        min_switches=10,
        switch_window=12.0,
        server_extra=("--live-relay", live_relay, "--range-bodies", range_bodies),
    ) as pool:
        started(pool)
        for shim in pool.servers.values():
            [start] = [e for e in shim.events() if e["event"] == "start"]
            assert (start["live_relay"], start["range_bodies"]) == (live_relay, range_bodies)
        url = pool.url("/big")
        capture = pool.workdir / "range.pcap"
        with pool.lab["c1"].capture(
            "eth0", capture, bpf_filter=["tcp", "port", str(LISTEN_PORT)], snaplen_bytes=96
        ):
            urls = " ".join([url] * copies)
            script = f"set -o pipefail; curl -sS --fail-early {urls} | sha256sum"
            result = pool.lab["c1"].run(["bash", "-c", script], timeout=300)
        rsts = resets(capture)
        assert result.returncode == 0, f"{result.stderr}\n{diagnostics(pool)}"
        assert result.stdout.split()[0] == expected.hexdigest(), diagnostics(pool)
        assert rsts == [], f"{rsts}\n{diagnostics(pool)}"
        assert unfinished(handoffs(pool)) == [], diagnostics(pool)
        moved = server_events(pool, "reincarnated")
        by_range = [e for e in moved if e["regeneration"] == "range"]
        # Most roams fall inside a copy's body; those moved by range.
        assert len(by_range) >= 3, f"{moved}\n{diagnostics(pool)}"
        deep = [e for e in by_range if e["body_offset"] > 128 * MIB]
        assert deep, f"no range hand-over past 128 MiB into a copy: {by_range}"
        # Deep into a copy, the new server read from a window near the client's position
        # (plus what the client received while the hand-over was prepared), not the copy
        # from its start.
        summary = [(e["body_offset"], e["regenerated"]) for e in by_range]
        print("range hand-overs (body offset, bytes read):", summary)
        assert any(e["regenerated"] < e["body_offset"] / 2 for e in deep), summary


def replicas_differing_after(pool: RoamingLab, size: int, common: int) -> dict[str, bytes]:
    """One file per server host, the same first ``common`` bytes, different after; written
    before the services start, so the lab gives them all the same modification time (and
    nginx the same ETag: size and mtime)."""
    head = os.urandom(common)
    files = {}
    for host in pool.server_hosts:
        files[host] = head + os.urandom(size - common)
        directory = pool.workdir / f"www-{host}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "big").write_bytes(files[host])
    return files


def the_one_replica_that_received_bytes_come_from(
    received: bytes, replicas: dict[str, bytes]
) -> list[str]:
    return [host for host, data in replicas.items() if data.startswith(received)]


def test_a_replica_whose_file_differs_inside_the_window_is_reset_never_spliced() -> None:
    """Same size, same mtime, so the same ETag: only the window's hash tells the replicas
    apart. The connection is reset with the reason; the client's bytes are a prefix of the
    file of the server it downloaded from."""
    size = 64 * MIB
    with live_pool(
        tick=1.0,
        m=1,
        service="nginx",
        content={"big": b"placeholder"},  # replaced below, same mtime on every replica
        min_switches=2,
        switch_window=12.0,
        first_switch_after=3.0,
    ) as pool:
        replicas = replicas_differing_after(pool, size, 1 * MIB)
        started(pool)
        out = pool.workdir / "big.out"
        status, detail, _ = download(pool, "big", "4M", out)
        assert status != 0, f"the download should have been reset at the first roam\n{detail}"
        received = out.read_bytes()
        assert len(received) > 2 * MIB, diagnostics(pool)
        assert len(the_one_replica_that_received_bytes_come_from(received, replicas)) == 1
        failed = server_events(pool, "reincarnation_failed")
        assert any(
            e["status"] == "diverged" and "body differs from the client's" in e["reason"]
            for e in failed
        ), f"{failed}\n{diagnostics(pool)}"
        assert "diverged" in [h["outcome"] for h in handoffs(pool)], diagnostics(pool)
        # Nothing was spliced: no connection went live after a refused range.
        assert not [e for e in server_events(pool, "reincarnated") if e["regeneration"] == "range"]


def test_a_replica_with_another_etag_falls_back_to_200_and_is_refused_cleanly() -> None:
    """Another mtime on every replica: If-Range falls back to the whole file, whose head names
    another ETag than the one the client already holds, so no continuation can be right. The
    new server refuses at once (it does not read the file to find out), the connection is
    reset with the reason, and the client's bytes are a prefix of the file."""
    data = os.urandom(64 * MIB)
    with live_pool(
        tick=1.0,
        m=1,
        service="nginx",
        content={"big": data},
        min_switches=2,
        switch_window=12.0,
        first_switch_after=3.0,
    ) as pool:
        started(pool)
        for index, host in enumerate(pool.server_hosts):
            path: Path = pool.workdir / f"www-{host}" / "big"
            stat = path.stat()
            os.utime(path, (stat.st_atime, stat.st_mtime + 1000 * (index + 1)))
        out = pool.workdir / "big.out"
        status, detail, _ = download(pool, "big", "4M", out)
        assert status != 0, f"the download should have been reset at the first roam\n{detail}"
        received = out.read_bytes()
        assert len(received) > 2 * MIB, diagnostics(pool)
        assert data.startswith(received)
        failed = server_events(pool, "reincarnation_failed")
        assert any(
            e["status"] == "diverged" and "If-Range fell back to 200" in e["reason"] for e in failed
        ), f"{failed}\n{diagnostics(pool)}"
