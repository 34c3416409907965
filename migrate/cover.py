"""Cover traffic on the migration port: hand-overs hidden in a constant stream of cells.

Theory of operation: without cover, the only datagrams a client sends to a server's migration
port are its hand-overs' PREPAREs, COMMITs and GOs, 0.15 to 4 s before a roam, and only to the
next server; the only answers come from that server. An eavesdropper on the client's link
learns the next server and the roam time before the roam, which the periodic updates (sealed,
sent to everyone alike) do not tell it.

With cover on, the client sends to *every* server of the pool, on a fixed grid of slots
(``rate`` per second, the same instants for all servers), the same number of datagrams of the
same size (a *cell*). A real request waits for the next slot and takes the place of a cover
datagram to its server; the other servers get cover datagrams in that slot. A slot holds
``k`` cells per server, ``k`` being the longest queue (at least 1, at most ``max_burst``), so
a burst of hand-overs shows as a larger slot to every server at once, never as traffic to one.
Each server answers every framed cell with exactly one answer cell of ``ANSWER_CELL_BYTES`` (a
cover answer to cover, to GO and ABORT, and to a PREPARE repeated while it is worked on; a
packed cell's answers together, in a multiple of it no larger than the cell).

Urgent slots: the messages of a hand-over's freeze (COMMIT, GO, ABORT) go in a slot of their
own at once (``take_urgent``), off the grid, with the same cells to every server as any slot.
Waiting for the grid cost every roam up to two slots (50 ms each at the default rate) of the
application's pause, and hid nothing: they are sent at the switch, and the client's data
segments show the new server's address on the same link a few milliseconds later. The
PREPAREs, seconds before the roam, keep waiting for the grid: they are what cover hides.

Framing, inside the sealed envelope (``migrate.channel``; the header's kind stays
``REINCARNATE_REQUEST`` / ``REINCARNATE_READY``, so cover is indistinguishable on the wire)::

    cover:  0x00 | zeros                    the receiver drops it (a server answers with cover)
    framed: 0x80 | length u16 | body | zeros
    packed: 0x80 | length u16 | body | 0x80 | length u16 | body ... | zeros
    other:  the body itself (an unframed request or answer: its phase byte is 1 to 4)

A framed datagram is ``cell`` bytes, or the smallest multiple of it that holds the body (a
PREPARE with more replay bytes than a cell holds shows its size class).

Packed cells: neighbours in a server's queue share a cell while they fit, up to
``MAX_PACKED`` of them, if they are of one ``pack_group``: GOs and ABORTs (header only, about
24 in a 1024-byte cell), PREPAREs (3 or 4: each carries its sealed checkpoint), or COMMITs.
A roam of 1000 connections sends its 1000 GOs in some 42 cells per server instead of 1000,
and its PREPAREs and COMMITs in some 250 each: the client seals, and every server opens and
answers, that many fewer datagrams. Each cell is answered with one answer cell, as any cell
is, so packing shows nothing a cover cell does not: a cell of GOs and ABORTs with cover, a
cell of PREPAREs or of COMMITs with their answers packed alike (``packed`` framing, answers
gathered by ``migrate.gathering``), no larger than the cell. The schedule packs only what its
``packable`` rule says may share a cell; a server refuses a packed cell mixing groups.

Pure: time comes in as ``now``; nothing here sends.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from migrate.channel import HEADER_BYTES, MAX_MESSAGE_BYTES, TAG_BYTES
from migrate.errors import ConfigError, MalformedMessageError

DEFAULT_COVER_RATE = 20.0  # slots per second (each slot: a cell to every server)
DEFAULT_CELL_BYTES = 1024
MIN_CELL_BYTES = 512  # more than any answer cell: a framed request is never smaller than it
MAX_CELL_BYTES = 8192
MAX_COVER_RATE = 200.0
DEFAULT_MAX_BURST = 256  # cells per server in one slot (a burst of hand-overs: 1000 COMMITs)
MAX_QUEUED = 65536  # real messages waiting per server (the oldest give way: retried anyway)
MAX_PACKED = 64  # requests in one packed cell (a server's work per datagram stays bounded)
ANSWER_CELL_BYTES = 256  # every answer: the longest (4 + 200 detail bytes) framed and sealed
ENVELOPE_BYTES = HEADER_BYTES + TAG_BYTES
TAG_COVER = 0x00
TAG_FRAMED = 0x80
_FRAME = struct.Struct("!BH")

T = TypeVar("T")


def sealed_size(body_bytes: int, cell: int) -> int:
    """The size on the wire of a framed body of ``body_bytes``: the smallest multiple of
    ``cell`` that holds it (never past the channel's limit, where the body still fits)."""
    needed = ENVELOPE_BYTES + _FRAME.size + body_bytes
    rounded = -(-needed // cell) * cell
    return min(rounded, max(needed, MAX_MESSAGE_BYTES))


def frame(body: bytes, cell: int) -> bytes:
    """The plaintext that seals to ``sealed_size(len(body), cell)`` bytes."""
    return frame_many([body], cell)


def frame_many(bodies: Sequence[bytes], cell: int) -> bytes:
    """The plaintext of a cell packing ``bodies`` (one or more), padded as ``frame`` pads."""
    if not 1 <= len(bodies) <= MAX_PACKED:
        raise MalformedMessageError(f"a cell packs 1 to {MAX_PACKED} bodies, not {len(bodies)}")
    for body in bodies:
        if len(body) > 0xFFFF:
            raise MalformedMessageError(f"a framed body of {len(body)} bytes is too long")
    head = b"".join(_FRAME.pack(TAG_FRAMED, len(body)) + body for body in bodies)
    size = sealed_size(len(head) - _FRAME.size, cell) - ENVELOPE_BYTES
    return head + bytes(size - len(head))


def packed_bytes(body_bytes: int) -> int:
    """What a body of ``body_bytes`` takes of a packed cell (its frame included)."""
    return _FRAME.size + body_bytes


def cell_room(cell: int) -> int:
    """The plaintext bytes of one cell: what the packed bodies of a cell may take."""
    return cell - ENVELOPE_BYTES


def cover(cell: int) -> bytes:
    """The plaintext of a cover datagram of exactly ``cell`` bytes on the wire."""
    return bytes([TAG_COVER]) + bytes(cell - ENVELOPE_BYTES - 1)


def unframe(plaintext: bytes) -> bytes | None:
    """The body of an opened datagram; None for cover. An unframed body passes unchanged.
    Only the first body of a packed cell (``unframe_all`` reads them all)."""
    bodies = unframe_all(plaintext, limit=1)
    return bodies[0] if bodies else None


def unframe_all(plaintext: bytes, limit: int = MAX_PACKED) -> list[bytes]:
    """The bodies of an opened datagram, in order: none for cover, one for an unframed or a
    framed one, up to ``MAX_PACKED`` for a packed cell (reading stops after ``limit``)."""
    if not plaintext:
        raise MalformedMessageError("empty migration-port message")
    tag = plaintext[0]
    if tag == TAG_COVER:
        return []
    if tag != TAG_FRAMED:
        return [plaintext]
    bodies: list[bytes] = []
    at = 0
    while at < len(plaintext) and plaintext[at] == TAG_FRAMED:
        if len(bodies) == MAX_PACKED:
            raise MalformedMessageError(f"a cell packs more than {MAX_PACKED} bodies")
        if len(bodies) == limit:
            return bodies
        if at + _FRAME.size > len(plaintext):
            raise MalformedMessageError("framed message is truncated")
        _, length = _FRAME.unpack_from(plaintext, at)
        end = at + _FRAME.size + length
        if end > len(plaintext):
            raise MalformedMessageError(
                f"framed message claims {length} bytes, holds {len(plaintext) - at - _FRAME.size}"
            )
        bodies.append(plaintext[at + _FRAME.size : end])
        at = end
    if at < len(plaintext) and plaintext[at] != TAG_COVER:
        raise MalformedMessageError(f"byte {plaintext[at]:#04x} after a framed body")
    return bodies


def is_framed(plaintext: bytes) -> bool:
    """Whether the sender frames (and so expects framed answers)."""
    return bool(plaintext) and plaintext[0] in (TAG_COVER, TAG_FRAMED)


@dataclass(frozen=True, slots=True)
class CoverConfig:
    """``rate`` slots per second (0: no cover, requests go at once and unframed)."""

    rate: float = DEFAULT_COVER_RATE
    cell: int = DEFAULT_CELL_BYTES
    max_burst: int = DEFAULT_MAX_BURST

    def __post_init__(self) -> None:
        if not (self.rate == 0 or 0.1 <= self.rate <= MAX_COVER_RATE) or math.isnan(self.rate):
            raise ConfigError(f"cover rate must be 0 (off) or 0.1 to {MAX_COVER_RATE} per second")
        if not MIN_CELL_BYTES <= self.cell <= MAX_CELL_BYTES:
            raise ConfigError(f"cover cell must be {MIN_CELL_BYTES} to {MAX_CELL_BYTES} bytes")
        if not 1 <= self.max_burst <= 4096:
            raise ConfigError("cover burst must be 1 to 4096 cells")

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def period(self) -> float:
        return 1.0 / self.rate

    def bytes_per_second(self, servers: int) -> float:
        """What the client sends when idle: a cell per slot to each server (IP and UDP
        headers not counted)."""
        return self.rate * self.cell * servers


@dataclass(slots=True)
class _Queued(Generic[T]):
    item: T
    key: Hashable | None


class CoverSchedule(Generic[T]):
    """Which datagrams go where at each slot. ``put`` queues a real message for a server;
    ``take`` at or after ``next_slot`` returns the slot's datagrams, each the messages it
    packs (none: cover). ``packable`` says what a message takes of a packed cell
    (``packed_bytes``), or 0 if it goes alone in its cell; ``pack_group``, which messages may
    share a cell (equal groups; default: any)."""

    def __init__(
        self,
        servers: Sequence[str],
        config: CoverConfig,
        now: float,
        packable: Callable[[T], int] | None = None,
        pack_group: Callable[[T], Hashable] | None = None,
    ) -> None:
        if not config.enabled:
            raise ConfigError("a cover schedule needs a rate above 0")
        if not servers:
            raise ConfigError("a cover schedule needs at least one server")
        self.config = config
        self.packable = packable
        self.pack_group = pack_group
        self.servers = sorted(set(servers))
        self.queues: dict[str, deque[_Queued[T]]] = {server: deque() for server in self.servers}
        # Queued messages by (server, key): a newer message of the same key (a request sent
        # again) takes the older one's place in the queue instead of queuing behind it, so
        # retries never pile up behind a burst (1000 COMMITs, each retried every 0.5 s).
        self._keyed: dict[tuple[str, Hashable], _Queued[T]] = {}
        self.next_slot = now  # the first slot at once
        self.dropped = 0
        self.replaced = 0
        self.slots = 0
        self.urgent_slots = 0
        self.cells = 0
        self.packed = 0  # messages that shared a cell with the one before them

    def put(self, server: str, item: T, key: Hashable | None = None) -> None:
        """Queue ``item`` for ``server``; with a ``key``, in place of a queued item of the same
        key (it keeps that one's place), if there is one."""
        queue = self.queues.get(server)
        if queue is None:
            raise ConfigError(f"server {server} is not in the pool")
        if key is not None:
            queued = self._keyed.get((server, key))
            if queued is not None:
                queued.item = item
                self.replaced += 1
                return
        if len(queue) >= MAX_QUEUED:
            self._forget(server, queue.popleft())  # the oldest gives way; the protocol resends
            self.dropped += 1
        entry = _Queued(item, key)
        queue.append(entry)
        if key is not None:
            self._keyed[(server, key)] = entry

    def _forget(self, server: str, entry: _Queued[T]) -> None:
        if entry.key is not None:
            self._keyed.pop((server, entry.key), None)

    def _pop_entry(self, server: str) -> T:
        entry = self.queues[server].popleft()
        self._forget(server, entry)
        return entry.item

    def queued(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    def due_in(self, now: float) -> float:
        """Seconds until the next slot (0: take it now)."""
        return max(0.0, min(self.next_slot - now, self.config.period))

    def take(self, now: float) -> list[tuple[str, tuple[T, ...]]]:
        """The slot's datagrams, server by server, or nothing before the slot is due."""
        period = self.config.period
        if now < self.next_slot - period:
            # The clock stepped back: start the grid again from now.
            self.next_slot = now
        if now < self.next_slot:
            return []
        cells = self._cells()
        # The next grid point after now: slots missed while the caller was away (a suspended
        # process, a clock step forward) are skipped, not sent in a burst.
        missed = math.floor((now - self.next_slot) / period) + 1
        self.next_slot += missed * period
        if self.next_slot <= now:  # rounding after a long gap
            self.next_slot = now + period
        self.slots += 1
        self.cells += len(cells)
        return cells

    def take_urgent(self) -> list[tuple[str, tuple[T, ...]]]:
        """A slot at once, off the grid (which goes on unchanged), for what is queued: the
        same number of cells to every server as in any slot. Nothing if nothing is queued."""
        if not self.queued():
            return []
        cells = self._cells()
        self.urgent_slots += 1
        self.cells += len(cells)
        return cells

    def _cells(self) -> list[tuple[str, tuple[T, ...]]]:
        packed = {server: self._pack(server) for server in self.servers}
        width = max(1, *(len(cells) for cells in packed.values()))
        return [
            (server, packed[server][i] if i < len(packed[server]) else ())
            for i in range(width)
            for server in self.servers
        ]

    def _pack(self, server: str) -> list[tuple[T, ...]]:
        """Up to ``max_burst`` cells of ``server``'s queue, in order, packable neighbours of one
        ``pack_group`` sharing a cell while they fit."""
        queue = self.queues[server]
        packable = self.packable or _alone
        pack_group = self.pack_group or _one_group
        room_of_cell = cell_room(self.config.cell)
        cells: list[tuple[T, ...]] = []
        while queue and len(cells) < self.config.max_burst:
            first = self._pop_entry(server)
            size = packable(first)
            if not size or size > room_of_cell:
                cells.append((first,))
                continue
            kind = pack_group(first)
            group = [first]
            room = room_of_cell - size
            while queue and len(group) < MAX_PACKED:
                size = packable(queue[0].item)
                if not size or size > room or pack_group(queue[0].item) != kind:
                    break
                group.append(self._pop_entry(server))
                room -= size
            self.packed += len(group) - 1
            cells.append(tuple(group))
        return cells


def _alone(_message: object) -> int:
    """The packing rule of a schedule given none: every message goes alone in its cell."""
    return 0


def _one_group(_message: object) -> Hashable:
    """The grouping of a schedule given none: any packable messages may share a cell."""
    return None
