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
    dropped: int = 0  # segments of connections that did not follow, and pure ACKs

    def release(self, not_following: Collection[int]) -> tuple[int, int]:
        """After a switch: send on every held segment but those of ``not_following`` ports
        (and any this reader could not place) and pure ACKs, which are dropped. (sent on,
        dropped)

        Pure ACKs are dropped as the freeze used to drop them, harmlessly (TCP never sends
        them again, and the next segment acknowledges as much): sent on, a downloading
        client's acknowledgments from the freeze reached the new server before its GO and
        cost flat-out 256 MiB downloads a third of their goodput across roams (0.67x of no
        roam against 0.94x, docs/benchmarks.md)."""
        packets = self.holder.take()
        sent_on: list[int] = []
        drop: list[int] = []
        for packet in packets:
            following = packet.sport is not None and packet.sport not in not_following
            (sent_on if following and not packet.pure_ack else drop).append(packet.id)
        if packets:
            self.holder.verdicts(sent_on, drop)
        self.released += len(sent_on)
        self.dropped += len(drop)
        return len(sent_on), len(drop)

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
