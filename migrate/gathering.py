"""Answers to a packed cell of PREPAREs or of COMMITs, gathered into one answer cell.

Theory of operation: a client with cover on (``migrate.cover``) packs its PREPAREs, and its
COMMITs, several to a cell (four of a 1024-byte cell). A roam of 1000 connections then sends a
quarter of the cells it sent one request per cell, and so does every other server of the pool,
which cover gives as many cells: each cell is a datagram to seal, send, open and answer, and
they were most of a roam's cost on a loaded pool (docs/benchmarks.md).

The server works on each request of such a cell as if it had come alone. Its answer may be
known at once (a repeat, a refusal with a status) or only when its work ends (READY after the
replay, or after the restore). The answers of one cell are gathered here and leave together in
one answer cell when the last is in (``Gathering.complete``): the cell is answered once, as
cover promises, and with no more bytes than it had (``fit_answers``). A request refused
without an answer (``RoamError``: answering it would let an outsider's replayed copy fail the
client's real one) is simply not waited for. If no member has anything to say, a member that
answered "nothing new" makes it a cover answer; a cell wholly refused gets nothing, as a
refused request alone gets nothing.

A member whose answer does not come within ``GATHER_MAX_S`` (a regeneration that takes long,
or work that ended without a word) would hold its neighbours' READYs past the client's
boundary: the cell is then answered with what it has (with its next answer, if it has none
yet: ``Gathering.overdue``), and a later answer goes in a cell of its own, as every answer did
before cells were packed. A cell nothing more comes for is forgotten after
``GATHER_GIVE_UP_S``.

Pure: time comes in as ``now``; nothing here sends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from migrate.cover import ANSWER_CELL_BYTES, ENVELOPE_BYTES, MIN_CELL_BYTES, packed_bytes
from migrate.reincarnation import Answer, Phase

# A member's answer may wait this long for its neighbours'. Members of a cell are consecutive in
# the client's queue and prepared one after the other (a few ms apart); the wait stays well
# under the client's PREPARE_RETRY_S and its boundary margins.
GATHER_MAX_S = 0.1
# A cell still waiting this long gets nothing more (the server forgets a re-incarnation whose
# client never came back after a similar time, migrate.handover.PENDING_TTL_S).
GATHER_GIVE_UP_S = 30.0
# Cells gathering at once, all clients together (bounds memory; the meter bounds each client's
# pending requests far below it): beyond it, the oldest is answered with what it has.
MAX_GATHERINGS = 4096

T = TypeVar("T")  # what the caller needs to send the answer (the client's record, its address)


@dataclass(eq=False)
class Gathering(Generic[T]):
    """One packed cell's answers, until it is answered."""

    client_id: int
    phase: Phase
    to: T
    budget: int  # bytes the answer cell may take on the wire: the request cell's
    created: float
    waiting: set[int]  # client ports whose answer is still owed
    answers: list[Answer] = field(default_factory=list)
    said_nothing: bool = False  # a member had nothing new to say: a cover answer at least
    overdue: bool = False  # waited GATHER_MAX_S with nothing to say: goes with its next answer

    @property
    def complete(self) -> bool:
        return not self.waiting

    @property
    def answerable(self) -> bool:
        """Whether to send it now: every answer is in, or it is overdue and has one."""
        return self.complete or (self.overdue and bool(self.answers or self.said_nothing))


class Gatherer(Generic[T]):
    """The cells being gathered, and which cell each outstanding answer belongs to.

    Use: ``begin`` a cell; for each of its requests, ``enter`` it, work on it (every answer the
    server would send goes through ``absorb``), then ``leave`` it (or ``refused`` if it raised);
    answer the cell if it is ``complete``. Later answers go through ``absorb`` too; answer a
    cell once ``absorb`` returns it complete, or when ``expired`` returns it."""

    def __init__(self) -> None:
        self._cells: dict[int, Gathering[T]] = {}  # by id, oldest first
        self._members: dict[tuple[int, Phase, int], Gathering[T]] = {}
        self._current: tuple[Gathering[T], int] | None = None

    def __len__(self) -> int:
        return len(self._cells)

    def begin(
        self, client_id: int, phase: Phase, ports: Iterable[int], to: T, budget: int, now: float
    ) -> Gathering[T]:
        cell = Gathering(client_id, phase, to, budget, now, set(ports))
        self._cells[id(cell)] = cell
        return cell

    @property
    def working(self) -> bool:
        """Whether a request is entered: its cell is answered after the last one, not now."""
        return self._current is not None

    def enter(self, cell: Gathering[T], port: int) -> None:
        """``port``'s request is being worked on: what it answers now is the cell's."""
        self._current = (cell, port)

    def leave(self) -> None:
        """The request entered last went as far as it goes now: if it still owes an answer,
        its later answer is the cell's (in place of an earlier cell still waiting for one)."""
        if self._current is None:
            return
        cell, port = self._current
        self._current = None
        if port not in cell.waiting:
            return
        member = (cell.client_id, cell.phase, port)
        earlier = self._members.get(member)
        if earlier is not None and earlier is not cell:
            earlier.waiting.discard(port)  # answered with this cell's
        self._members[member] = cell

    def refused(self, cell: Gathering[T], port: int) -> None:
        """``port``'s request was refused without an answer: nothing is waited for."""
        cell.waiting.discard(port)

    def absorb(self, client_id: int, answer: Answer | None) -> Gathering[T] | None:
        """The cell that takes ``answer`` (None: nothing new to say), or None if no cell waits
        for it (it is sent alone, as before packing)."""
        if self._current is not None:
            cell, port = self._current
            if answer is None:
                cell.said_nothing = True
            else:
                cell.answers.append(answer)
            cell.waiting.discard(port)
            return cell
        if answer is None:
            return None
        owner = self._members.pop((client_id, answer.phase, answer.client_port), None)
        if owner is None or answer.client_port not in owner.waiting:
            return None
        owner.answers.append(answer)
        owner.waiting.discard(answer.client_port)
        return owner

    def done(self, cell: Gathering[T]) -> bool:
        """``cell`` is answered (or given up): forget it and what it waited for. False if it
        was done already (it must not be answered twice)."""
        if self._cells.pop(id(cell), None) is None:
            return False
        for port in cell.waiting:
            member = (cell.client_id, cell.phase, port)
            if self._members.get(member) is cell:
                del self._members[member]
        cell.waiting.clear()
        return True

    def due(self, now: float) -> list[Gathering[T]]:
        """Cells to answer now with what they have (then ``done``): those that waited
        ``GATHER_MAX_S`` and have something to say (one that has nothing yet becomes
        ``overdue``: answered with its next answer), those that waited ``GATHER_GIVE_UP_S``,
        and the oldest beyond ``MAX_GATHERINGS``. After a clock step back, a cell from the
        future counts as made now."""
        due: list[Gathering[T]] = []
        for cell in self._cells.values():
            cell.created = min(cell.created, now)
            age = now - cell.created
            if age >= GATHER_GIVE_UP_S:
                due.append(cell)
            elif age >= GATHER_MAX_S:
                cell.overdue = True
                if cell.answerable:
                    due.append(cell)
        excess = len(self._cells) - len(due) - MAX_GATHERINGS
        if excess > 0:
            chosen = {id(cell) for cell in due}
            due += [cell for cell in self._cells.values() if id(cell) not in chosen][:excess]
        return due


def fit_answers(answers: list[Answer], budget: int) -> list[bytes]:
    """The answers' encodings for one answer cell of at most ``budget`` bytes on the wire, a
    whole number of ``ANSWER_CELL_BYTES``: details are shortened, evenly, until they fit (they
    name the reason for a log; the status is what the client acts on)."""
    cell = max(MIN_CELL_BYTES, budget) // ANSWER_CELL_BYTES * ANSWER_CELL_BYTES
    room = cell - ENVELOPE_BYTES
    bare = sum(packed_bytes(len(replace(a, detail="").encode())) for a in answers)
    encoded = [answer.encode() for answer in answers]
    if sum(packed_bytes(len(body)) for body in encoded) <= room:
        return encoded
    share = max(0, (room - bare) // max(1, len(answers)))
    return [
        replace(a, detail=a.detail.encode()[:share].decode(errors="ignore")).encode()
        for a in answers
    ]
