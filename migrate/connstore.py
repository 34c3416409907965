"""The client's store of live connections: latest checkpoint and the bytes needed to replay.

Theory of operation: for each connection to the VIP the client shim keeps

* the client's initial sequence number, seen in its SYN, to turn sequence numbers into byte
  positions;
* the newest checkpoint carrier the server pushed (highest counter wins: late or replayed
  carriers are ignored);
* the client-to-server bytes from the carrier's fresh point on, copied from the client's own
  outgoing segments. A new carrier with a later fresh point trims them.

Segments may be seen out of order or twice (retransmissions); positions are 64-bit offsets
from the connection's start, recovered from 32-bit sequence numbers by taking the candidate
nearest to what is already known. Bytes behind a gap wait in ``pending`` until the gap fills.

Losses are counted per connection (``losses``). The client's own segments leave its host in
sequence order (a retransmission repeats bytes before the newest), and their copies reach the
store in that order, so a copy that lands beyond ``sent`` means the copy of the bytes between
was lost (an NFLOG overflow) or never made: that connection has a *hole*, counted once. The
client's TCP does not send those bytes again once the server acknowledged them, so the hole
stays until a carrier's fresh point passes it (the bytes before it are then no longer needed
and the store goes on from there), and a hand-over in the meantime finds the replay bytes
short of what the server acknowledged (``replay_bytes`` stops at the hole) and resets only
that connection. A lost carrier costs nothing: the previous one stays valid, with the replay
bytes from its fresh point. A lost SYN leaves its connection untracked (reset at the next
roam, "not captured"), or, on a port still tracked for an earlier connection, lets the new
connection's carriers arrive on the old entry: the carrier segment's acknowledgment number
(the client's ISN + 1 + the checkpoint's client position) then does not fit the entry's ISN,
and the entry is marked (``on_carrier`` with ``ack``). So a loss costs at most the
connections it touched, each counted and marked with its reason.

Memory is bounded: a connection whose replay bytes exceed ``per_connection_limit`` stops
storing and is marked *unmigratable* with the reason (at the next roam it is reset cleanly
and counted, never migrated with a hole); when the store's total exceeds ``total_limit`` the
largest connection is marked the same way. A connection whose client sends FIN is also
unmigratable (half-closed connections are not re-created). So is a connection whose first
client bytes are a protocol no replica can replay (a TLS ClientHello, an SSH banner:
``migrate.autodetect``): the client knows at once, without the server's word, stores nothing
more for it, and its reset at the roam names the reason.

The capture sees every packet the client's host sends to the VIP, including any a local
process with raw sockets forges. A FIN or SYN that does not fit the connection's stream is
not taken for the client's (see ``on_segment`` and ``on_syn``); forged bytes *inside* the
stream's window cannot be told from the client's own, and are out of reach of this design
(such a process could end the connections anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migrate.autodetect import DETECT_BYTES, detect
from migrate.checkpoint import Carrier
from migrate.replaystream import DEFAULT_MAX_REPLAY

SEQ_MOD = 2**32
MAX_NEW_LOSSES = 256  # losses kept for the caller's log between two takes (all are counted)
# How far past the bytes stored a client's segment can start: more than the receive window a
# Linux server advertises by default (tcp_rmem's 6 MiB, half of it window). A copy further
# ahead is not the client's (forged on its host) and is ignored, not taken for a hole. Not the
# replay bound (``per_connection_limit``, --max-replay, 64 MiB by default): a forged segment
# that far ahead made a hole of a connection that had none.
MAX_AHEAD_BYTES = 4 * 1024 * 1024
# Why a connection whose client sent its FIN cannot move: most often the connection's normal
# end (the server closes right after), so the shim logs it as information, not as a warning.
CLIENT_FIN = "the client half-closed the connection (FIN)"


def unwrap(seq: int, isn: int, near: int) -> int:
    """The byte position (0 = first byte after the SYN) of ``seq`` nearest to ``near``."""
    low = (seq - isn - 1) % SEQ_MOD
    base = near - (near % SEQ_MOD)
    candidates = (base - SEQ_MOD + low, base + low, base + SEQ_MOD + low)
    return min((c for c in candidates if c >= 0), key=lambda c: abs(c - near))


@dataclass(slots=True)
class TrackedConnection:
    client_port: int
    client_isn: int
    opened_at: float
    carrier: Carrier | None = None
    replay_start: int = 0  # position of replay[0]
    replay: bytearray = field(default_factory=bytearray)
    pending: dict[int, bytes] = field(default_factory=dict)
    unmigratable: str | None = None
    fin: bool = False
    last_seen: float = 0.0
    pinned: int | None = None  # replay bytes from here on are in use by a hand-over
    successor: tuple[int, float] | None = None  # (ISN, time) of an unconfirmed SYN on the port
    losses: int = 0  # captured copies missing from this connection's stream (holes, foreign SYN)
    detecting: bool = True  # its first client bytes not yet looked at for an unreplayable protocol
    syns: int = 1  # copies of its SYN seen: more than one, its TCP sent the SYN again

    @property
    def sent(self) -> int:
        """Contiguous bytes sent by the client, as far as captured."""
        return self.replay_start + len(self.replay)

    @property
    def stored_bytes(self) -> int:
        return len(self.replay) + sum(len(chunk) for chunk in self.pending.values())


@dataclass
class ConnectionStore:
    per_connection_limit: int = DEFAULT_MAX_REPLAY  # --max-replay
    total_limit: int = 4 * DEFAULT_MAX_REPLAY
    unmigratable: int = 0  # connections marked unmigratable (each counted once)
    # Marked since the caller last took them (``take_unmigratable``), to log: (port, reason).
    new_unmigratable: list[tuple[int, str]] = field(default_factory=list)
    connections: dict[int, TrackedConnection] = field(default_factory=dict)
    carriers_stored: int = 0
    carriers_ignored: int = 0
    # Why carriers were ignored: "unknown" connection, "other" connection on the same port,
    # "older" than the one held.
    ignored_by_reason: dict[str, int] = field(
        default_factory=lambda: {"unknown": 0, "other": 0, "older": 0, "foreign": 0}
    )
    losses: int = 0  # every connection's losses, including connections since forgotten
    # Losses noticed since the caller last took them (``take_losses``), to log: (port, reason).
    new_losses: list[tuple[int, str]] = field(default_factory=list)
    # An upper bound of the bytes stored: the last count plus every byte stored since (trims
    # only lower the truth). Counting all connections at every segment cost the client shim
    # half its CPU with 1000 busy connections; now they are counted only when the bound
    # passes ``total_limit``.
    stored_bound: int = 0

    def on_syn(self, client_port: int, isn: int, now: float) -> None:
        """A SYN from the client: a new connection (a retransmitted SYN is only counted).

        On the port of a connection that has not ended, the new one is only noted: the port
        may have been reused after an end the capture did not show, or the SYN may not be the
        client's at all (forged on its host). The ACK that completes its handshake decides."""
        known = self.connections.get(client_port)
        if known is not None and known.client_isn == isn:
            known.syns += 1
            return
        if known is not None and not known.fin:
            known.successor = (isn, now)
            return
        self.connections[client_port] = TrackedConnection(client_port, isn, now, last_seen=now)

    def on_segment(self, client_port: int, seq: int, payload: bytes, fin: bool, now: float) -> None:
        conn = self.connections.get(client_port)
        if conn is None:
            return  # a connection opened before the shim started: never migratable
        if conn.successor is not None and seq == (conn.successor[0] + 1) % SEQ_MOD:
            # The handshake of the noted SYN completed: the port has a new connection.
            isn, opened = conn.successor
            conn = TrackedConnection(client_port, isn, opened)
            self.connections[client_port] = conn
        conn.last_seen = now
        if conn.unmigratable is None and payload:
            self._store(conn, seq, payload)
        # Only a FIN at the end of what the client has sent is the client's: one elsewhere is
        # forged (or reordered), and must not cost the connection its hand-over.
        if (
            fin
            and conn.unmigratable is None
            and unwrap(seq, conn.client_isn, conn.sent) + len(payload) == conn.sent
        ):
            conn.fin = True
            self._give_up(conn, CLIENT_FIN)

    def _store(self, conn: TrackedConnection, seq: int, payload: bytes) -> None:
        self.stored_bound += len(payload)
        position = unwrap(seq, conn.client_isn, conn.sent)
        end = position + len(payload)
        if end <= conn.sent:
            return  # a retransmission of bytes we have
        if position - conn.sent > min(MAX_AHEAD_BYTES, self.per_connection_limit):
            # Beyond any window the client could have: not the client's bytes. (Past a
            # smaller replay bound, they could not be kept anyway.)
            return
        if position < conn.replay_start:
            payload = payload[conn.replay_start - position :]
            position = conn.replay_start
        if position > conn.sent:
            if not conn.pending:
                # The copies of the bytes in between were lost: they never come again once the
                # server acknowledged them (see the module's docstring).
                self._lost(conn, f"capture hole: bytes {conn.sent} to {position} not captured")
            conn.pending[position] = payload
        else:
            conn.replay += payload[conn.sent - position :]
            self._drain_pending(conn)
            if conn.detecting:
                self._detect(conn)
        self._enforce_limits(conn)

    def _detect(self, conn: TrackedConnection) -> None:
        """Look at the connection's first client bytes once: TLS or SSH cannot be replayed."""
        if conn.replay_start != 0:
            conn.detecting = False  # trimmed by a checkpoint already: the server looked
            return
        found = detect(bytes(conn.replay[:DETECT_BYTES]))
        if found is None:
            return  # not sure yet: more bytes will tell
        conn.detecting = False
        if found.unreplayable is not None:
            self._give_up(conn, f"not replayable: {found.unreplayable}")

    def _drain_pending(self, conn: TrackedConnection) -> None:
        while conn.pending:
            ready = [p for p in conn.pending if p <= conn.sent]
            if not ready:
                return
            for position in sorted(ready):
                chunk = conn.pending.pop(position)
                if position + len(chunk) > conn.sent:
                    conn.replay += chunk[conn.sent - position :]

    def _lost(self, conn: TrackedConnection, reason: str) -> None:
        conn.losses += 1
        self.losses += 1
        if len(self.new_losses) < MAX_NEW_LOSSES:
            self.new_losses.append((conn.client_port, reason))

    def take_losses(self) -> list[tuple[int, str]]:
        """The losses noticed since the last call, (port, reason) each (at most
        ``MAX_NEW_LOSSES`` between two calls; ``losses`` counts them all)."""
        taken, self.new_losses = self.new_losses, []
        return taken

    def take_unmigratable(self) -> list[tuple[int, str]]:
        """The connections marked unmigratable since the last call, (port, reason) each."""
        taken, self.new_unmigratable = self.new_unmigratable, []
        return taken

    def losses_by_port(self, limit: int = 20) -> dict[int, int]:
        """The tracked connections with losses, most first (at most ``limit``)."""
        hit = sorted(
            (c for c in self.connections.values() if c.losses),
            key=lambda c: c.losses,
            reverse=True,
        )
        return {c.client_port: c.losses for c in hit[:limit]}

    def _give_up(self, conn: TrackedConnection, reason: str) -> None:
        if conn.unmigratable is None:
            conn.unmigratable = reason
            self.unmigratable += 1
            if len(self.new_unmigratable) < MAX_NEW_LOSSES:
                self.new_unmigratable.append((conn.client_port, reason))
        conn.replay = bytearray()
        conn.pending.clear()

    def _enforce_limits(self, conn: TrackedConnection) -> None:
        if conn.stored_bytes > self.per_connection_limit:
            self._give_up(
                conn, f"replay bytes exceed the per-connection bound ({self.per_connection_limit})"
            )
        if self.stored_bound <= self.total_limit:
            return
        total = sum(c.stored_bytes for c in self.connections.values())
        while total > self.total_limit:
            largest = max(self.connections.values(), key=lambda c: c.stored_bytes)
            total -= largest.stored_bytes
            self._give_up(largest, f"the store exceeds its total bound ({self.total_limit})")
        self.stored_bound = total

    def on_carrier(self, carrier: Carrier, now: float, ack: int | None = None) -> bool:
        """Keep ``carrier`` if it is the connection's newest; trim replay bytes to its fresh
        point. Returns whether it was kept.

        ``ack``, the carrier segment's acknowledgment number, is the client's ISN + 1 + the
        checkpoint's client position: one that does not fit the tracked connection's ISN
        belongs to another connection on the port, whose SYN the capture lost."""
        conn = self.connections.get(carrier.client_port)
        current = conn.carrier if conn is not None else None
        foreign = (
            conn is not None
            and ack is not None
            and (ack - conn.client_isn - 1 - carrier.c2s_pos) % SEQ_MOD != 0
        )
        reason = (
            "unknown"
            if conn is None
            else "foreign"
            if foreign
            else "other"
            if current is not None and carrier.conn_id != current.conn_id
            else "older"
            if current is not None and carrier.counter <= current.counter
            else None
        )
        if reason == "foreign" and conn is not None and conn.unmigratable is None:
            self._lost(conn, "a checkpoint of another connection on this port (its SYN copy lost)")
            self._give_up(conn, "the capture lost the SYN of the connection now on this port")
        if reason is not None:
            self.carriers_ignored += 1
            self.ignored_by_reason[reason] += 1
            return False
        assert conn is not None
        conn.carrier = carrier
        conn.last_seen = now
        self.carriers_stored += 1
        if conn.unmigratable is not None:
            return True
        keep_from = carrier.c2s_fresh
        if conn.pinned is not None:
            keep_from = min(keep_from, conn.pinned)
        if keep_from > conn.sent:
            # A hole before the fresh point: the bytes in it are no longer needed. Go on from
            # the fresh point, with what was captured beyond it.
            conn.replay = bytearray()
            conn.replay_start = keep_from
            self._drain_pending(conn)
        elif keep_from > conn.replay_start:
            drop = keep_from - conn.replay_start
            del conn.replay[:drop]
            conn.replay_start += drop
        return True

    def pin(self, client_port: int, position: int | None) -> None:
        """Keep replay bytes from ``position`` on, whatever newer carriers say, until unpinned
        (``None``): a hand-over in progress still needs them."""
        conn = self.connections.get(client_port)
        if conn is not None:
            conn.pinned = position

    def replay_bytes(self, client_port: int, start: int) -> bytes | None:
        """Client-to-server bytes from ``start`` to what was sent; None if not held."""
        conn = self.connections.get(client_port)
        if conn is None or conn.unmigratable is not None or start < conn.replay_start:
            return None
        return bytes(conn.replay[start - conn.replay_start :])

    def forget(self, client_port: int) -> None:
        self.connections.pop(client_port, None)

    def expire(self, live_ports: set[int]) -> list[int]:
        """Drop connections the kernel no longer has; returns the ports dropped."""
        gone = [port for port in self.connections if port not in live_ports]
        for port in gone:
            del self.connections[port]
        return gone
