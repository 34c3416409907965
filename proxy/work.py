"""The work of a re-incarnation on the server: connect the service and replay (PREPARE),
regenerate further (a refreshed PREPARE), restore the socket (COMMIT). ``Workshop`` runs one
piece of work within the client's and the server's slots and feeds its end (a position, or a
failure with its status) back to the re-incarnation's machine; ``proxy.live`` executes what the
machine decides next."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from migrate.admission import PREPARING_PER_CLIENT, MigrationMeter
from migrate.checkpoint import Checkpoint
from migrate.handover import Prepare, Regenerate, Restore, ServerHandover, ServerState
from migrate.registration import ClientRecord
from migrate.reincarnation import Admitted, Status
from proxy.checkpoints import log_internal_error
from proxy.livecontext import LiveContext
from proxy.migration_port import MigrationPort
from proxy.replay import Replayer, failure_of

# Re-incarnations prepared at once. A legacy service may have a short accept queue (python's
# http.server listens with a backlog of 5): a burst of connects beyond it waits for SYN
# retransmissions, seconds, instead of a few milliseconds here.
PREPARE_CONCURRENCY = 8

Key = tuple[str, int]
Work = Prepare | Regenerate | Restore


@dataclass
class Pending:
    """A re-incarnation between PREPARE and GO: its machine and what executes it."""

    machine: ServerHandover
    admitted: Admitted
    replayer: Replayer
    record: ClientRecord
    reply_to: tuple[str, int]
    task: asyncio.Task[None] | None = None
    started: float = field(default=0.0)
    # The COMMIT's own checkpoint (authenticated with it): the replay may start again from it.
    commit_checkpoint: Checkpoint | None = None


class Workshop:
    def __init__(
        self,
        context: LiveContext,
        meter: MigrationMeter,
        port: MigrationPort,
        counts: dict[str, int],
        evict: Callable[[Key, int], bool] = lambda _key, _client: False,
    ) -> None:
        """``evict``: drop this server's own live connection on a 4-tuple about to be
        restored, for the given client id (``CheckpointPusher.evict``)."""
        self.context = context
        self.evict = evict
        self.meter = meter
        self.port = port
        self.counts = counts
        # Preparations of one client running at once: never every slot, so that another
        # client's hand-over always finds slots (acquired before ``prepare_slots``).
        self.client_slots: dict[int, asyncio.Semaphore] = {}
        self.prepare_slots = asyncio.Semaphore(PREPARE_CONCURRENCY)

    async def run(self, key: Key, pending: Pending, work: Work) -> bool:
        """Do ``work`` and tell the machine how it ended; False if the machine had ended
        meanwhile (released or failed: nothing told)."""
        context = self.context
        replayer = pending.replayer
        machine = pending.machine
        try:
            if isinstance(work, Prepare):
                position = await self._prepare(key, pending, work.until)
            elif isinstance(work, Regenerate):
                position = await replayer.regenerate(work.until)
            else:
                if machine.commit_received_at is not None:
                    replayer.queued(context.clock() - machine.commit_received_at)
                # An earlier incarnation still relayed here holds the 4-tuple the restore needs.
                self.evict(key, machine.client_id)
                position = await replayer.commit(
                    work.request, context.listen, context.clock(), pending.commit_checkpoint
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            status_detail = failure_of(error)
            if status_detail is None:
                log_internal_error(context, "re-incarnation", error)
                status_detail = (Status.FAILED, f"internal error: {error!r}")
            if isinstance(error, OSError) and error.errno == errno.EADDRNOTAVAIL:
                status_detail = (status_detail[0], status_detail[1] + self.port.describe_clash(key))
            if machine.state in (ServerState.RELEASED, ServerState.FAILED):
                return False
            status, detail = status_detail
            self.counts["diverged" if status is Status.DIVERGED else "failed"] += 1
            machine.work_failed(status, detail, context.clock())
            return True
        if machine.state in (ServerState.RELEASED, ServerState.FAILED):
            return False
        was = machine.state
        machine.work_done(position, context.clock())
        if was is ServerState.PREPARING and machine.state is ServerState.PREPARED:
            context.log.event(
                "prepared",
                client=f"{key[0]}:{key[1]}",
                regenerated=position - pending.admitted.checkpoint.s2c_fresh,
                seconds=round(context.clock() - machine.created, 4),
            )
        if machine.state is ServerState.RESTORED:
            self.counts["ready"] += 1
            if replayer.half_open_cleared:
                # Someone sent a SYN with this connection's 4-tuple: worth an operator's eye.
                context.log.event(
                    "half_open_cleared",
                    client=f"{key[0]}:{key[1]}",
                    count=replayer.half_open_cleared,
                )
        return True

    async def _prepare(self, key: Key, pending: Pending, until: int) -> int:
        """The first work of a re-incarnation, within the client's and the server's slots."""
        client_id = pending.machine.client_id
        mine = self.client_slots.get(client_id)
        if mine is None:
            mine = self.client_slots[client_id] = asyncio.Semaphore(PREPARING_PER_CLIENT)
        clock = self.context.clock
        async with mine, self.prepare_slots:
            held_from = clock()
            try:
                return await pending.replayer.start(
                    lambda: self.context.connect_service(key[0]), until
                )
            finally:
                self.meter.used_service(client_id, clock() - held_from, clock())
