"""What live migration reads of its server shim, and nothing more.

``LiveMode`` used to read sixteen attribute paths off the whole ``ServerShim``; this narrow
context names them, so that live mode can be built and driven in unit tests with plain values
and the daemon's other state stays its own.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from migrate.channel import CounterFloor, Sealer
from migrate.endpoints import Endpoint
from migrate.kernel.eventlog import EventLog
from migrate.kernel.instances import Instance
from migrate.pool import ServerPool
from migrate.registration import ClientRecord


@dataclass(frozen=True)
class LiveContext:
    listen: tuple[str, int]  # the server's address and service port (the VIP's port)
    vport: int
    deployment_id: bytes
    sender: int  # this server's index in the pool (the sender of its sealed messages)
    group_key: bytes  # the pool's secret: checkpoint keys derive from it
    chain_length: int
    pool: ServerPool  # clients, their records, blocks, the schedule
    log: EventLog
    counter_floor: CounterFloor  # nonces never repeat across restarts
    clock: Callable[[], float]
    epoch: Callable[[], int]  # the running epoch (0 before the first)
    gate_open: Callable[[], bool]
    leaving_at: Callable[[], float | None]  # when this server stops serving, if it serves
    # A fresh connection to the service for a client (from its address when transparent).
    connect_service: Callable[[str], Awaitable[socket.socket]]
    codec: str = "http"
    stream_hash: str = "sha256"  # new connections' running hash: "sha256" or keyed "blake3"
    live_relay: str = "copy"  # how live connections' bytes are forwarded (proxy.live_relays)
    # Range-capable bodies: hashed whole ("hash") or only a window ("window"); StreamState's
    # range_bodies (migrate.checkpoint.RANGE_BODIES).
    range_bodies: str = "hash"
    checkpoint_period: float = 0.5
    migration_port: int = 47476
    max_pending_per_client: int = 1024
    max_replay: int = 64 * 1024 * 1024  # --max-replay (migrate.replaystream.DEFAULT_MAX_REPLAY)
    # The shim's instance record (temporary tables are recorded in it); None in unit tests.
    instance: Instance | None = None
    # k of N (PROTOCOL.md section 4), None with k = 1: when a client's connections leave this
    # server (its server changes; this one may stay open), and a client's server in an epoch.
    client_leaving_at: Callable[[int], float | None] | None = None
    assigned: Callable[[int, int], Endpoint] | None = None

    def sealer(
        self,
        cache: dict[int, Sealer],
        make: Callable[[bytes, bytes, int, int], Sealer],
        record: ClientRecord,
    ) -> Sealer:
        """One sealer per client and purpose, kept in ``cache``: nonces are (sender, counter)
        under the client's key, so two sealers of the same client and purpose could repeat a
        nonce; its counters start above the floor persisted across restarts."""
        sealer = cache.get(record.client_id)
        if sealer is None:
            sealer = make(record.channel_key, self.deployment_id, record.client_id, self.sender)
            cache[record.client_id] = sealer.keep_counters(self.counter_floor)
        return cache[record.client_id]
