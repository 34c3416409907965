"""The client's rule changes of a hand-over (``client_shim.rules``), applied to its table:
each one transaction, sent over netlink (``nft.apply_changes``), inside the pause."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from client_shim.rules import freeze_changes, hold_changes, switch_changes, table_family
from migrate.endpoints import Endpoint, IPAddress
from migrate.kernel import nft


@dataclass(frozen=True)
class Switching:
    table: str
    vip: IPAddress
    vport: int

    @property
    def family(self) -> str:
        return table_family(self.vip)

    def hold(self) -> None:
        """New connections' SYNs held (or dropped) until the freeze or the switch."""
        nft.apply_changes(self.family, self.table, hold_changes(self.vport), what="holding SYNs")

    def freeze(self, ports: Sequence[int], target: Endpoint) -> None:
        changes = freeze_changes(self.vip, self.vport, list(ports), target)
        nft.apply_changes(self.family, self.table, changes, what="freezing connections")

    def switch(
        self, target: Endpoint, finished: Sequence[int] = (), held: Sequence[int] = ()
    ) -> None:
        changes = switch_changes(self.vip, self.vport, target, finished, held)
        nft.apply_changes(self.family, self.table, changes, what=f"switching to {target}")
