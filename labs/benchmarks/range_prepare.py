"""What a new server's PREPARE costs for a client deep into a download: regeneration from the
response's start (no range record: read and hash everything up to the client) against a Range
hand-over (read a window and what follows), with the same Replayer against a real nginx on
loopback.

    sudo env PYTHONPATH=. python -m labs.benchmarks.range_prepare [--size-mib 256]
        [--at-mib 200] [--rounds 3]

Prints, per plan, the seconds the PREPARE's work took (median and range over the rounds) and
the service bytes read. Traffic stays on 127.0.0.1; nginx runs from a temporary directory and
is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

from labs.services import nginx_config
from migrate.checkpoint import Checkpoint, TcpSnapshot, seal_checkpoint
from migrate.reincarnation import Phase, Request
from migrate.streamstate import StreamState
from proxy.replay import Replayer

MIB = 1024 * 1024
REQUEST = b"GET /big HTTP/1.1\r\nHost: bench\r\nAccept: */*\r\n\r\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_nginx(workdir: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    config = nginx_config(workdir, root, IPv4Address("127.0.0.1"), port)
    (workdir / "nginx.conf").write_text(config)
    process = subprocess.Popen(
        ["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e",
         str(workdir / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise SystemExit("nginx did not start listening within 10 s")


def original_checkpoint(port: int, at: int) -> Checkpoint:
    """The old server's checkpoint ``at`` bytes into nginx's answer (fed as a relay would)."""
    state = StreamState("http")
    state.feed_c2s(REQUEST)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(REQUEST)
        buffer = bytearray(256 * 1024)
        while state.s2c_pos < at:
            view = memoryview(buffer)[: min(len(buffer), at - state.s2c_pos)]
            received = sock.recv_into(view)
            if not received:
                raise SystemExit("nginx closed early")
            state.feed_s2c(view[:received])
    return state.checkpoint(
        conn_id=bytes(16),
        client=("127.0.0.1", 40000),
        vport=80,
        epoch=1,
        counter=1,
        now=time.time(),
        tcp=TcpSnapshot(1, 2, 1460, 7, 7, True, True, 0),
        s2c_acked=0,
    )


async def prepare_once(checkpoint: Checkpoint, port: int, received: int) -> tuple[float, int]:
    sealed = seal_checkpoint(checkpoint, bytes(32), bytes(16), os.urandom)
    request = Request(Phase.PREPARE, 1, 40000, 80, len(REQUEST), received, 0, sealed, REQUEST)
    replayer = Replayer(checkpoint, request)

    async def connect() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return sock

    started = time.perf_counter()
    try:
        await replayer.start(connect, received)
    finally:
        replayer.close()
    return time.perf_counter() - started, replayer.regenerated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--at-mib", type=int, default=200, help="the client's position")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 0 < args.at_mib < args.size_mib:
        parser.error("--at-mib must lie inside the file (0 < at < size)")
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not installed")
    with tempfile.TemporaryDirectory(prefix="range-prepare-") as temp:
        workdir, root = Path(temp) / "nginx", Path(temp) / "www"
        workdir.mkdir()
        root.mkdir()
        with open(root / "big", "wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(MIB))
        port = free_port()
        nginx = start_nginx(workdir, root, port)
        try:
            at = args.at_mib * MIB
            checkpoint = original_checkpoint(port, at)
            assert checkpoint.range is not None, "nginx's answer should be Range-capable"
            received = at + 4 * MIB  # the client got a little more since the checkpoint
            plans = {
                "from the response's start (before)": replace(checkpoint, range=None),
                "Range + If-Range (after)": checkpoint,
            }
            print(f"PREPARE for a client {received / MIB:.0f} MiB into a {args.size_mib} MiB "
                  f"response from nginx on loopback, {args.rounds} rounds")  # fmt: skip
            for name, presented in plans.items():
                runs = [
                    asyncio.run(prepare_once(presented, port, received)) for _ in range(args.rounds)
                ]
                seconds = [s for s, _ in runs]
                print(f"  {name:36} {statistics.median(seconds):8.4f} s median "
                      f"({min(seconds):.4f}..{max(seconds):.4f}), "
                      f"{runs[0][1] / MIB:8.1f} MiB read from the service")  # fmt: skip
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)


if __name__ == "__main__":
    main()
