"""When a server last took or answered each client's COMMITs of a roam: the wait for GO
starts there.

A client switches its rewrite, and sends its GOs, only once every COMMIT of the roam is
answered. On a busy server the answers to a thousand COMMITs span a second or more, so a
connection restored early used to wait ``GO_TIMEOUT_S`` from its own restore and start before
the client had switched: every restored connection of such a roam logged ``go_timeout``, and
what it sent then was dropped at the frozen client (docs/benchmarks.md, 2026-12-05).

Bounded per sender: one entry per client (its newest roam's epoch and time), so an
authentic client naming any epochs it likes costs one entry, and delays only its own
connections, by at most ``GO_WAIT_MAX_S``; entries older than that are pruned at most once a
second (and at once after a clock step back). Pure: time comes in as ``now``.
"""

from __future__ import annotations

from migrate.handover import GO_WAIT_MAX_S, ServerHandover, ServerState

PRUNE_PERIOD_S = 1.0


class CommitAnswers:
    def __init__(self) -> None:
        self.last: dict[int, tuple[int, float]] = {}  # client id: (epoch, when)
        self._pruned_at = float("-inf")

    def note(self, client_id: int, epoch: int, now: float) -> None:
        """A COMMIT of ``client_id`` for ``epoch`` came, or was answered, at ``now``: the
        client waits for its answer (READY, LATE, REFUSED or FAILED) before it switches."""
        previous = self.last.get(client_id)
        if previous is not None and previous[0] == epoch:
            now = max(now, previous[1])
        self.last[client_id] = (epoch, now)

    def saw(self, machine: ServerHandover) -> None:
        """Note ``machine``'s restore: its client was answered READY to its COMMIT then."""
        if machine.state is ServerState.RESTORED and machine.restored_at is not None:
            self.note(machine.client_id, machine.prepare.epoch, machine.restored_at)

    def postpone(self, machine: ServerHandover, now: float) -> bool:
        """Whether ``machine``'s wait for GO, due at ``now``, goes on: its client was answered
        another COMMIT of the roam since, and will switch after its last answer."""
        self._prune(now)
        if machine.state is not ServerState.RESTORED:
            return False
        newest = self.last.get(machine.client_id)
        if newest is None or newest[0] != machine.prepare.epoch:
            return False
        machine.client_still_committing(newest[1])
        timer = machine.get_timer()
        return timer is not None and now < timer

    def _prune(self, now: float) -> None:
        if 0 <= now - self._pruned_at < PRUNE_PERIOD_S:
            return
        self._pruned_at = now
        self.last = {
            client: (epoch, at)
            for client, (epoch, at) in self.last.items()
            if 0 <= now - at <= GO_WAIT_MAX_S
        }
