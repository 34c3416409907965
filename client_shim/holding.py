"""Frozen segments held in an NFQUEUE during a hand-over, released to the new server after it.

An nft drop of the client's own segment is a local send failure to its TCP, which keeps the
bytes unsent until its probe timer (200 ms or more): a request written during the freeze
waited that long (docs/benchmarks.md). Held in a queue instead, the segment is sent as far as
TCP knows; after the switch each one goes on (to the rewrite that now names the new server) or,
for a connection that does not follow, is dropped. ``migrate.kernel.nfqueue`` holds them,
``migrate.kernel.xtqueue`` is the rule that queues them, ``client_shim.rules`` marks them.

Where iptables or the queue is missing, ``open_hold`` says why and the freeze drops segments as
before (``FrozenHold`` is then not used at all).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from migrate.errors import LocalError
from migrate.kernel.eventlog import EventLog
from migrate.kernel.instances import Instance
from migrate.kernel.nfqueue import NfqueueError, PacketHolder
from migrate.kernel.xtqueue import XtQueueError, hold_mark


@dataclass
class FrozenHold:
    holder: PacketHolder
    mark: int
    released: int = 0  # segments sent on after a switch
    dropped: int = 0  # segments of connections that did not follow

    def release(self, not_following: Collection[int]) -> tuple[int, int]:
        """After a switch: send on every held segment but those of ``not_following`` ports
        (and any this reader could not place), which are dropped. (sent on, dropped)"""
        packets = self.holder.take()
        accept = [p.id for p in packets if p.sport is not None and p.sport not in not_following]
        drop = [p.id for p in packets if p.sport is None or p.sport in not_following]
        if packets:
            self.holder.verdicts(accept, drop)
        self.released += len(accept)
        self.dropped += len(drop)
        return len(accept), len(drop)

    def status(self) -> dict[str, int]:
        return {
            "queue": self.holder.queue,
            "released": self.released,
            "dropped": self.dropped,
            "overflowed": self.holder.overflowed,
        }

    def close(self) -> None:
        self.holder.close()


def open_hold(instance: Instance, family: str, queue: int, log: EventLog) -> FrozenHold | None:
    """Bind ``queue`` and add the rule that fills it; None (logged, one line) if this host
    cannot: the freeze then drops segments."""
    try:
        holder = PacketHolder.open(queue)
    except NfqueueError as error:
        log.event("freeze_drops", level="warning", reason=str(error))
        return None
    try:
        instance.add_xt_queue(family, queue)
    except (XtQueueError, LocalError) as error:
        holder.close()
        log.event("freeze_drops", level="warning", reason=str(error))
        return None
    return FrozenHold(holder, hold_mark(queue))
