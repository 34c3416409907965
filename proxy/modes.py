"""How a server shim treats its connections when the service roams: one interface, two modes.

Like sshuttle's firewall methods: the daemon holds one ``MigrationMode`` and never asks which
it is. ``reconnect`` is the paper's prototype (connections are dropped at a roam; the client
reconnects); ``live`` (proxy.live) checkpoints connections and re-incarnates them at the next
server.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from proxy.relay import Relay, RelayFactory, splice_both_ways


class MigrationMode(Protocol):
    name: str
    leave_event: str  # the event logged when ``leave`` ended connections

    def relay_factory(self) -> RelayFactory:
        """How an accepted connection is relayed."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def leave(self) -> int:
        """The gate closed behind the service: end this server's part of every connection;
        returns how many."""
        ...

    def status(self) -> dict[str, object] | None: ...


class ReconnectMode:
    """The paper's prototype: a roam drops the connections; clients reconnect."""

    name = "reconnect"
    leave_event = "connections_dropped"

    def __init__(self, relays: Callable[[], Collection[Relay]]) -> None:
        self._relays = relays

    def relay_factory(self) -> RelayFactory:
        return splice_both_ways

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def leave(self) -> int:
        relays = list(self._relays())
        for relay in relays:
            relay.abort()
        return len(relays)

    def leave_clients(self, addresses: Collection[str]) -> int:
        """k of N: these clients' server is another one now (this one stays open)."""
        ended = 0
        for relay in list(self._relays()):
            try:
                peer = relay.client.getpeername()[0]
            except OSError:
                continue
            if peer in addresses:
                relay.abort()
                ended += 1
        return ended

    def status(self) -> dict[str, object] | None:
        return None
