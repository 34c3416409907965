"""The client's urgent requests (a freeze's COMMITs, the GOs after the switch) leave when the
migrator says its burst is queued (``RequestChannel.flush_urgent``), not at the event loop's
next turn behind whatever else it has ready: real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket

from client_shim.requests import RequestChannel
from migrate.cover import CoverConfig
from migrate.endpoints import parse_server_list
from migrate.kernel.eventlog import EventLog
from migrate.registration import Bundle, ClientRecord, Deployment, DeploymentSecret
from migrate.reincarnation import Phase, Request
from migrate.schedule import MSchedule

SERVERS = parse_server_list("127.0.0.2:80,127.0.0.3:80,127.0.0.4:80")
DEPLOYMENT = Deployment(
    deployment_id=bytes(range(16)),
    servers=SERVERS,
    vip=ipaddress.ip_address("10.99.0.1"),
    service_port=80,
    chain_length=100,
    m=MSchedule(1),
    tick=1.0,
    start=1_000_000.0,
    delta=0.05,
    gamma=0.05,
)
SECRET = DeploymentSecret(DEPLOYMENT.deployment_id, bytes(range(32)), bytes(range(32, 64)))
ALICE = ClientRecord("alice", 1, ipaddress.ip_address("127.0.0.1"), 47474, bytes(32), 100)


def go(port: int) -> Request:
    return Request(Phase.GO, 3, port, 80, 100, 2000, 100, b"", b"", window=65535)


def test_flushed_gos_leave_before_the_loop_turns_and_only_once() -> None:
    # One migration port on every server, as deployed: the first bound picks it.
    receivers: list[socket.socket] = []
    port = 0
    for server in SERVERS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        receivers.append(sock)
        sock.bind((str(server.address), port))
        port = sock.getsockname()[1]

    def arrived() -> list[int]:
        """Datagrams each server has received since the last look."""
        counts = []
        for sock in receivers:
            count = 0
            with contextlib.suppress(BlockingIOError):
                while sock.recv(65536):
                    count += 1
            counts.append(count)
        return counts

    async def run() -> tuple[list[int], list[int]]:
        bundle = Bundle.issue(DEPLOYMENT, SECRET, ALICE, os.urandom)
        channel = RequestChannel(
            bundle,
            EventLog("client", stream=None),
            clock=lambda: 0.5,
            clock_offset=lambda: 0.0,
            on_answer=lambda answer, now: None,
            migration_port=port,
            cover_config=CoverConfig(rate=0.1),  # the grid: a slot at the start, the next in 10 s
        )
        await channel.start()
        try:
            await asyncio.sleep(0.01)
            arrived()  # the cover grid's first slot, if it went
            for client_port in (40001, 40002, 40003):
                channel.send(SERVERS[1], go(client_port))
            channel.flush_urgent()
            at_once = arrived()  # no await since the sends: the loop has not turned
            await asyncio.sleep(0.01)
            return at_once, arrived()
        finally:
            channel.close()

    try:
        at_once, later = asyncio.run(run())
    finally:
        for sock in receivers:
            sock.close()
    # One urgent slot: a cell to every server (the GOs packed into the target's, cover to
    # the others: the wire does not tell which server is next), sent before the loop turned,
    # and not again at its next turn.
    assert at_once == [1, 1, 1]
    assert later == [0, 0, 0]
