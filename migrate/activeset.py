"""k of N active servers (PROTOCOL.md section 4): the active set of an epoch, each client's
server in it, and the windows in which each member's gate is open.

Theory of operation: with ``k`` servers active at once, epoch ``E_i``'s *active set* ``A_i`` is an
ordered list of ``k`` distinct indices into ``servers``. Its first member is section 1's
``S_i = MSB_64(H''(K_i)) mod N``; further members are drawn from ``H3(K_i, j)`` for
``j = 0, 1, 2, ...``, skipping repeats. A client with id ``c`` uses ``A_i[MSB_64(H4(K_i, c)) mod
k]``: everyone holding ``K_i`` computes the same assignment, so no message assigns clients, and
the assignment is re-drawn every epoch (a leaked schedule points at the leaker's server only,
which is what ``migrate.suspects`` exploits). With ``k = 1`` the set is ``[S_i]`` and every
client's server is ``S_i``: section 1 exactly.

Windows: a server that joins the set at ``T_i`` opens at ``T_i - delta``; one that leaves it
closes at ``T_i + delta + gamma``; one in both sets stays open. So a server's window covers
each *run* of consecutive epochs it is a member of, from ``T_first - delta`` to
``T_after_last + delta + gamma`` (section 1's window, merged over the run).

Pure: no clock, no sockets. The hashing costs at most a few digests per member on average (a
coupon collector: ``k = N`` takes about ``N ln N`` draws); draws are bounded by the ``u32``
counter of ``H3``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from migrate.endpoints import Endpoint
from migrate.errors import ConfigError, ScheduleError
from migrate.hashchain import KeyChain, chain_step, msb, server_digest
from migrate.schedule import EpochSchedule

_MEMBER = b"\x03"
_CLIENT = b"\x04"
MAX_DRAWS = 1 << 32  # j is encoded as u32be
MAX_CLIENT_ID = 0xFFFF_FFFE
MAX_SPAN = (
    1 << 16
)  # epochs of one ``assignments`` call  # 1 <= c < 2^32 - 1 (PROTOCOL.md section 4)


class ActiveSetError(ConfigError):
    """A k outside ``1..N``, or a client id outside ``1..2^32-2``."""


def check_active(k: int, server_count: int) -> int:
    """``k`` if ``1 <= k <= N``; else ``ActiveSetError`` with a one-line message."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise ActiveSetError(f"the number of active servers must be an integer, got {k!r}")
    if not 1 <= k <= server_count:
        raise ActiveSetError(
            f"the number of active servers must be in 1..{server_count} "
            f"(the number of servers), got {k}"
        )
    return k


def check_client_id(client_id: int) -> int:
    if not isinstance(client_id, int) or not 1 <= client_id <= MAX_CLIENT_ID:
        raise ActiveSetError(f"client id must be in 1..{MAX_CLIENT_ID}, got {client_id!r}")
    return client_id


def member_digest(key: bytes, j: int) -> bytes:
    """``H3(x, j) = SHA256(0x03 || x || u32be(j))``: further members of the active set."""
    return hashlib.sha256(_MEMBER + key + struct.pack("!I", j)).digest()


def client_digest(key: bytes, client_id: int) -> bytes:
    """``H4(x, c) = SHA256(0x04 || x || u32be(c))``: a client's server in the set."""
    return hashlib.sha256(_CLIENT + key + struct.pack("!I", client_id)).digest()


def active_indices(key: bytes, server_count: int, k: int) -> tuple[int, ...]:
    """``A_i`` for the epoch key ``K_i``: ``k`` distinct indices into ``servers``, in order."""
    check_active(k, server_count)
    members = [msb(server_digest(key), 64) % server_count]
    seen = set(members)
    j = 0
    while len(members) < k:
        if j >= MAX_DRAWS:  # unreachable in practice: 2^32 draws over at most 2^32 servers
            raise ActiveSetError(f"no {k} distinct servers in {MAX_DRAWS} draws")
        candidate = msb(member_digest(key, j), 64) % server_count
        j += 1
        if candidate not in seen:
            seen.add(candidate)
            members.append(candidate)
    return tuple(members)


def assigned_index(key: bytes, active: Sequence[int], client_id: int) -> int:
    """The server index of client ``client_id`` in the epoch of ``key`` with set ``active``."""
    check_client_id(client_id)
    if not active:
        raise ActiveSetError("the active set is empty")
    return active[msb(client_digest(key, client_id), 64) % len(active)]


@dataclass(frozen=True, slots=True)
class EpochAssignment:
    """One epoch's active set (server indices, set order) and the key that assigns clients."""

    key: bytes
    active: tuple[int, ...]

    def server_of(self, client_id: int) -> int:
        return assigned_index(self.key, self.active, client_id)


def assignments(
    chain: KeyChain, first: int, last: int, server_count: int, k: int
) -> dict[int, EpochAssignment]:
    """``EpochAssignment`` of epochs ``first .. last`` (at most ``MAX_SPAN``): one random access
    for ``K_last``, then one hash down per epoch (``K_{i-1} = H(K_i)``)."""
    check_active(k, server_count)
    if not 1 <= first <= last or last - first >= MAX_SPAN:
        raise ActiveSetError(f"epochs {first}..{last}: not a span of 1..{MAX_SPAN} epochs")
    key = chain.key(last)  # raises KeyNotHeldError past the key held
    found = {}
    for epoch in range(last, first - 1, -1):
        found[epoch] = EpochAssignment(key, active_indices(key, server_count, k))
        key = chain_step(key)
    return found


@dataclass(frozen=True, slots=True)
class Boundary:
    """What happens to the gates at ``T_i`` when the set changes from ``before`` to ``after``."""

    opens: dict[int, float]  # joining server -> when it opens (T_i - delta)
    closes: dict[int, float]  # leaving server -> when it closes (T_i + delta + gamma)
    stays: frozenset[int]  # in both sets: open throughout


def boundary(
    before: Sequence[int], after: Sequence[int], start: float, delta: float, gamma: float
) -> Boundary:
    """The windows rule of section 4 at one epoch boundary ``start = T_i``."""
    old, new = set(before), set(after)
    return Boundary(
        opens={server: start - delta for server in after if server not in old},
        closes={server: start + delta + gamma for server in before if server not in new},
        stays=frozenset(old & new),
    )


@dataclass(frozen=True, slots=True)
class SetWindow:
    """Server ``server``'s gate is open from ``opens`` to ``closes`` for its run of epochs
    ``first .. last`` in the active set."""

    server: int
    first: int
    last: int
    opens: float
    closes: float

    def contains(self, now: float) -> bool:
        return self.opens <= now < self.closes


@dataclass(frozen=True, slots=True)
class EpochSet:
    """One epoch as the windows rule needs it: its index, start, end and active set."""

    index: int
    start: float
    end: float
    active: tuple[int, ...]


def set_windows(epochs: Sequence[EpochSet], delta: float, gamma: float) -> list[SetWindow]:
    """Every member's window over consecutive ``epochs`` (sorted by start, no gaps).

    A run that begins at the first epoch given, or ends at the last, is cut there: its true
    opening or closing depends on epochs not given. Sorted by (opens, server).
    """
    windows: list[SetWindow] = []
    running: dict[int, tuple[int, float]] = {}  # server -> (first epoch, opens)
    previous: EpochSet | None = None
    for epoch in epochs:
        if previous is not None and (
            epoch.index != previous.index + 1 or epoch.start != previous.end
        ):
            raise ValueError(f"epoch {epoch.index} does not follow epoch {previous.index}")
        before = () if previous is None else previous.active
        change = boundary(before, epoch.active, epoch.start, delta, gamma)
        for server, closes in change.closes.items():
            first, opens = running.pop(server)
            assert previous is not None
            windows.append(SetWindow(server, first, previous.index, opens, closes))
        for server, opens in change.opens.items():
            running[server] = (epoch.index, opens)
        previous = epoch
    if previous is not None:
        closes = previous.end + delta + gamma
        for server, (first, opens) in running.items():
            windows.append(SetWindow(server, first, previous.index, opens, closes))
    return sorted(windows, key=lambda window: (window.opens, window.server))


class ActiveSchedule:
    """An ``EpochSchedule`` with ``k`` active servers: sets, assignments and open gates."""

    def __init__(self, schedule: EpochSchedule, k: int) -> None:
        self.schedule = schedule
        self.k = check_active(k, len(schedule.params.servers))

    @property
    def servers(self) -> tuple[Endpoint, ...]:
        return self.schedule.params.servers

    def indices(self, epoch: int) -> tuple[int, ...]:
        return active_indices(
            self.schedule.key_of(epoch), len(self.schedule.params.servers), self.k
        )

    def active(self, epoch: int) -> tuple[Endpoint, ...]:
        """``A_epoch`` as endpoints, in set order (``[0]`` is ``S_epoch``)."""
        return tuple(self.servers[index] for index in self.indices(epoch))

    def assigned(self, epoch: int, client_id: int) -> Endpoint:
        """Client ``client_id``'s server in ``epoch``."""
        return self.servers[self.assignment(epoch).server_of(client_id)]

    def assignment(self, epoch: int) -> EpochAssignment:
        """``epoch``'s set and the key that assigns its clients (one key, many clients)."""
        key = self.schedule.key_of(epoch)
        return EpochAssignment(key, active_indices(key, len(self.servers), self.k))

    def epoch_set(self, epoch: int) -> EpochSet:
        info = self.schedule.epoch(epoch)
        return EpochSet(info.index, info.start, info.end, self.indices(epoch))

    def admits(self, server: Endpoint, client_id: int, now: float) -> bool:
        """Whether ``server`` lets client ``client_id`` in at ``now``: it is the client's server
        in an epoch whose window (``T_j - delta .. T_{j+1} + delta + gamma``) contains ``now``.
        Near a boundary both the old and the new server admit it (its live connections move
        between them). For the gate's restriction by source, a later step."""
        check_client_id(client_id)
        current = self.schedule.epoch_at(now).index
        params = self.schedule.params
        for index in range(
            max(1, current - 1), min(self.schedule.chain.held_index, current + 1) + 1
        ):
            info = self.schedule.epoch(index)
            opens, closes = info.start - params.delta, info.end + params.delta + params.gamma
            if opens <= now < closes and self.assigned(index, client_id) == server:
                return True
        return False

    def open_servers(self, now: float) -> frozenset[Endpoint]:
        """The servers whose gate is open at ``now`` (windows of the current epoch and its
        neighbours, as ``EpochSchedule.open_windows`` looks at)."""
        current = self.schedule.epoch_at(now).index
        held = self.schedule.chain.held_index
        first, last = max(1, current - 1), min(held, current + 1)
        epochs = [self.epoch_set(index) for index in range(first, last + 1)]
        params = self.schedule.params
        open_now = set()
        for window in set_windows(epochs, params.delta, params.gamma):
            if window.contains(now):
                open_now.add(self.servers[window.server])
        return frozenset(open_now)

    # -- what the shims ask (k > 1; with k = 1 they keep migrate.gating's section 1 answers) --

    def client_epoch(self, client_id: int, epoch: int) -> Endpoint:
        """Client ``client_id``'s server in ``epoch`` (the client shim's target)."""
        return self.assigned(epoch, client_id)

    def client_switch(
        self, client_id: int, now: float, scan_limit: int = 4096
    ) -> tuple[int, float, Endpoint] | None:
        """The next epoch after the one running at ``now`` whose server for ``client_id``
        differs from the current one: ``(epoch, start, server)``, or None within
        ``scan_limit`` epochs or the keys held (a hand-over happens only there)."""
        check_client_id(client_id)
        current = self.schedule.epoch_at(now).index
        mine = self.assigned(current, client_id)
        held = self.schedule.chain.held_index
        for index in range(current + 1, min(held, current + scan_limit) + 1):
            server = self.assigned(index, client_id)
            if server != mine:
                return index, self.schedule.start_of(index), server
        return None

    def client_leaving(
        self, server: Endpoint, client_id: int, now: float, scan_limit: int = 4096
    ) -> float | None:
        """When client ``client_id`` leaves ``server`` (the start of its next epoch on another
        server), if ``server`` is its server in the epoch running at ``now``; else None."""
        current = self.schedule.epoch_at(now).index
        if self.assigned(current, client_id) != server:
            return None
        switch = self.client_switch(client_id, now, scan_limit)
        return None if switch is None else switch[1]

    def admitted(self, server: Endpoint, client_ids: Sequence[int], now: float) -> frozenset[int]:
        """The clients of ``client_ids`` that ``server`` admits at ``now`` (``admits`` for
        many clients, one assignment per epoch)."""
        params = self.schedule.params
        try:
            current = self.schedule.epoch_at(now).index
        except ScheduleError:
            current = 1  # before the schedule starts: epoch 1's window opens delta early
        found: set[int] = set()
        for index in range(
            max(1, current - 1), min(self.schedule.chain.held_index, current + 1) + 1
        ):
            info = self.schedule.epoch(index)
            if not info.start - params.delta <= now < info.end + params.delta + params.gamma:
                continue
            assignment = self.assignment(index)
            target = self.servers.index(server) if server in self.servers else -1
            if target not in assignment.active:
                continue
            found.update(c for c in client_ids if assignment.server_of(c) == target)
        return frozenset(found)

    def gate_at(self, server: Endpoint, now: float) -> tuple[bool, int, bool, float]:
        """``server``'s gate at ``now`` under the windows rule: ``(open, epoch, active, until)``
        as ``migrate.gating.GateState`` has them (``active``: a member of the running epoch's
        set). ``until`` is the next window edge of *any* epoch near ``now``: which clients a
        member admits changes there too."""
        params = self.schedule.params
        me = self.servers.index(server) if server in self.servers else -1
        held = self.schedule.chain.held_index
        try:
            current = self.schedule.epoch_at(now).index
        except ScheduleError:
            one = self.schedule.epoch(1)
            opens = one.start - params.delta
            if now >= opens:
                return me in self.indices(1), 1, False, one.end + params.delta + params.gamma
            return False, 1, False, opens
        first, last = max(1, current - 1), min(held, current + 1)
        epochs = [self.epoch_set(index) for index in range(first, last + 1)]
        is_open = any(
            window.server == me and window.contains(now)
            for window in set_windows(epochs, params.delta, params.gamma)
        )
        # A run cut at the last epoch given closes at that epoch's end + delta + gamma: the
        # real close may be later, so that edge is looked at again (a wake-up, nothing else).
        edges: list[float] = []
        for index in range(first, min(held, current + 2) + 1):
            info = self.schedule.epoch(index)
            edges.extend(
                edge
                for edge in (info.start - params.delta, info.end + params.delta + params.gamma)
                if edge > now
            )
        return is_open, current, me in self.indices(current), min(edges)
