"""The kernel's view of the client's connections to the VIP, joined with what was captured.

sock_diag lists the client's sockets (their positions: bytes sent, acknowledged, received);
``client_shim.capture`` holds each connection's newest checkpoint and replay bytes. Together
they give the requests a hand-over sends.
"""

from __future__ import annotations

from collections.abc import Collection

from client_shim.capture import Capture
from migrate.connstore import TrackedConnection
from migrate.errors import RoamError
from migrate.handover import (
    MAX_PREPARE_LEAD_S,
    PREPARE_SECONDS_PER_CONNECTION,
    REGENERATE_BYTES_PER_S,
    REPLAY_BYTES_PER_S,
)
from migrate.kernel import sockdiag
from migrate.kernel.eventlog import EventLog
from migrate.rangeplan import expected_regeneration
from migrate.reincarnation import Phase, Request
from migrate.replaystream import MAX_INLINE_REPLAY_BYTES

Sockets = dict[int, sockdiag.TcpSocketInfo]

EXACT_LOOKUPS_MAX = 16  # ports looked up one by one rather than by a dump (sockets_of)
# Client socket states after the server's FIN: the client's own FIN is still to come (or to be
# acknowledged), and the server that closed is the only one with a socket for it.
SERVER_CLOSED_STATES = frozenset({"CLOSE_WAIT", "LAST_ACK", "CLOSING"})
# What the client's dumps of its VIP's sockets ask the kernel for: every state but TIME_WAIT.
# A connection in TIME_WAIT has ended on both sides, and a client that closes first (most
# HTTP clients) keeps every one of them for a minute: thousands at a few hundred connections
# a second, each parsed in Python at every dump (several a roam) when they were listed
# (docs/benchmarks.md, new connections through roams).
DUMPED_STATES = sockdiag.TCPF_ALL & ~sockdiag.TCPF_TIME_WAIT


def acked_bytes(info: sockdiag.TcpSocketInfo) -> int:
    """Client bytes the server acknowledged (a connecting socket's count includes its SYN)."""
    return max(0, info.bytes_acked - 1)


def verifiable(conn: TrackedConnection, info: sockdiag.TcpSocketInfo) -> bool:
    """Whether ``conn`` holds a checkpoint a new server can verify a replay against: one that
    commits to some of the service's output, unless the client has received none yet. (The
    server pushes one as soon as the service's first bytes pass.)"""
    carrier = conn.carrier
    return carrier is not None and (carrier.s2c_pos > 0 or info.bytes_received == 0)


class ClientConnections:
    def __init__(self, capture: Capture, vport: int, log: EventLog) -> None:
        self.capture = capture
        self.store = capture.store
        self.client_address = capture.client_address
        self.vip = capture.vip
        self.vport = vport
        self.log = log
        # Ports of connections the server had closed at the last dump (``live_sockets``).
        self.closing: set[int] = set()

    def sockets_and_capture(self) -> Sockets:
        """The live sockets, then every copy captured until now. In this order: the kernel
        logs a segment's copy before it sends it, so each socket listed has its SYN and every
        byte it counts as sent in the capture by then."""
        sockets = self.live_sockets()
        self.capture.drain()
        return sockets

    def sockets_of(self, ports: Collection[int]) -> Sockets:
        """``sockets_and_capture`` for ``ports`` only (the established ones among them). Inside
        the freeze, where the application waits: a dump costs a walk of the host's whole TCP
        hash table, whatever the count of sockets (3 ms per address family here, two
        families), an exact lookup 0.2 ms; for more than ``EXACT_LOOKUPS_MAX`` ports the dump
        is the cheaper."""
        found = self.established(ports)
        self.capture.drain()
        return found

    def tracked_sockets(self) -> Sockets:
        """``sockets_and_capture`` by exact lookups of the connections the capture tracks (no
        more than ``EXACT_LOOKUPS_MAX``; else the dump): at the boundary, where each
        millisecond before the freeze is more for the new server to regenerate during it, a
        dump's walk of the whole TCP hash table (6 ms here) is not worth it. The capture has
        every connection's SYN (drained first); one whose copy came later is found in the
        freeze, as a late newcomer. ``closing`` gains those the server has closed."""
        self.capture.drain()
        ports = list(self.store.connections)
        if len(ports) > EXACT_LOOKUPS_MAX:
            return self.sockets_and_capture()
        found = self.established(ports, note_closing=True)
        self.capture.drain()
        return found

    def established(self, ports: Collection[int], *, note_closing: bool = False) -> Sockets:
        """Which of ``ports`` are still established connections to the VIP (the capture left
        as it is: a retry timer needs to know only whether its connection still lives).
        ``note_closing``: those the server has closed join ``closing`` (a dump, for more than
        ``EXACT_LOOKUPS_MAX`` ports, notes them all)."""
        if len(ports) > EXACT_LOOKUPS_MAX:
            return self.live_sockets()
        found = {}
        for port in ports:
            info = sockdiag.lookup((self.client_address, port), self.vip)
            if info is not None and info.state == "ESTABLISHED":
                found[port] = info
            elif note_closing and info is not None and info.state in SERVER_CLOSED_STATES:
                self.closing.add(port)
        return found

    def live_sockets(self) -> Sockets:
        """The established connections to the VIP; also notes in ``closing`` the ones the
        server has closed (the client has its FIN), whose last segments must not reach the
        next server."""
        found, present, closing = {}, set(), set()
        for info in sockdiag.tcp_sockets(dst=self.vip, states=DUMPED_STATES):
            if info.src[0] != self.client_address:
                continue
            present.add(info.src[1])
            if info.state == "ESTABLISHED":
                found[info.src[1]] = info
            elif info.state in SERVER_CLOSED_STATES:
                closing.add(info.src[1])
        self.closing = closing
        # A dump is not a snapshot: sockets created or moved meanwhile can be missed.
        # Forgetting a live connection here would reset it at the next roam, so each tracked
        # connection the dump did not show is asked for exactly before it is believed gone;
        # but one whose FIN the client sent is in TIME_WAIT or gone (the dump lists every
        # other state), over either way: at a thousand closed a second, a lookup each would
        # cost more than the dump saved.
        missing = [p for p, c in self.store.connections.items() if p not in present and not c.fin]
        for port in missing:
            exact = sockdiag.lookup((self.client_address, port), self.vip)
            if exact is None or exact.state == "TIME_WAIT":
                continue
            present.add(port)
            if exact.state == "ESTABLISHED":
                found[port] = exact
        # Forget connections the kernel no longer has at all (a handshake in progress is kept).
        gone = self.store.expire(present)
        if gone:
            self.log.event("connections_ended", ports=gone[:50], count=len(gone))
        return found

    def unverifiable(self, port: int, info: sockdiag.TcpSocketInfo) -> bool:
        """Whether the connection on ``port`` has received service bytes none of its
        checkpoints covers yet (``verifiable``, read with the freeze's positions)."""
        conn = self.store.connections.get(port)
        return conn is not None and conn.carrier is not None and not verifiable(conn, info)

    def request(
        self, phase: Phase, epoch: int, info: sockdiag.TcpSocketInfo, start: int | None
    ) -> Request | None:
        """A request with the connection's latest checkpoint and its replay bytes from
        ``start`` (the checkpoint's fresh point when None); None if they are incomplete."""
        port = info.src[1]
        conn = self.store.connections.get(port)
        if conn is None or conn.carrier is None or conn.unmigratable is not None:
            return None
        # A COMMIT's positions were read in the freeze, which takes nothing more from the old
        # server: they are final, and a checkpoint ahead of them (the old server counts bytes
        # still in flight; its carriers still pass) stays ahead. Reading them again only
        # lengthened the pause, by three lookups and drains (0.3-0.4 ms a busy connection).
        for _ in range(0 if phase is Phase.COMMIT else 3):
            if conn.carrier is None or conn.carrier.s2c_pos <= info.bytes_received:
                break
            # The checkpoint may be newer than the socket's positions: the capture is drained
            # after the sockets are listed, and a request/response protocol (redis) moves the
            # fresh point at every exchange. Positions older than the checkpoint's fresh point
            # are refused by the server: read them again, exactly, then what was captured up
            # to then (in this order, as in ``sockets_and_capture``).
            fresher = sockdiag.lookup((self.client_address, port), self.vip)
            if fresher is None or fresher.state != "ESTABLISHED":
                break
            info = fresher
            self.capture.drain()
        if conn.carrier is None or conn.unmigratable is not None:
            return None
        if start is None:
            start = conn.carrier.c2s_fresh
        replay = self.store.replay_bytes(port, start)
        if replay is None or start + len(replay) < acked_bytes(info):
            return None
        return Request(
            phase,
            epoch,
            port,
            self.vport,
            start + len(replay),
            info.bytes_received,
            start,
            conn.carrier.sealed,
            replay,
            # More than a datagram carries: all of it on the replay stream (migrate.replaystream).
            streamed=len(replay) if len(replay) > MAX_INLINE_REPLAY_BYTES else 0,
        )

    def suggested_lead(self, base: float) -> float:
        """How early to prepare: the base lead plus the time the new server needs to
        regenerate every connection up to the client's position (all of them: it serves them
        all), at a conservative replay speed, and to take every connection's replay bytes
        (an unanswered upload's, streamed and replayed into the service). A connection whose
        checkpoint has a range record costs a window and the bytes since that checkpoint,
        whatever its position (``migrate.rangeplan.expected_regeneration``)."""
        try:
            sockets = self.live_sockets()
        except (RoamError, OSError):
            return base
        total = replayed = 0
        for port, info in sockets.items():
            conn = self.store.connections.get(port)
            carrier = conn.carrier if conn is not None else None
            if conn is not None:
                replayed += len(conn.replay)
            total += expected_regeneration(
                info.bytes_received,
                carrier.sealed if carrier is not None else None,
                carrier.s2c_pos if carrier is not None else 0,
            )
        work = (
            total / REGENERATE_BYTES_PER_S
            + replayed / REPLAY_BYTES_PER_S
            + len(sockets) * PREPARE_SECONDS_PER_CONNECTION
        )
        return min(MAX_PREPARE_LEAD_S, base + work)

    def receive_windows(self, ports: Collection[int]) -> dict[int, int | None]:
        """Each of ``ports``' receive window now (``tcpi_rcv_wnd``, bytes; None on kernels
        before 6.12), read right after the switch for its GO: a new server whose restored
        socket guessed more lowers it (protocol.md 8.3). A failed read leaves the guess
        (logged)."""
        if not ports:
            return {}
        try:
            return {port: info.rcv_wnd for port, info in self.established(ports).items()}
        except (RoamError, OSError) as error:
            self.log.event("sockets_unreadable", level="warning", reason=str(error))
            return {}

    def closed_by_application(self, ports: Collection[int]) -> set[int]:
        """Those of ``ports`` the application has closed: the socket is gone, or orphaned (no
        file refers to it, inode 0) past the established state. Nothing of such a connection
        can reach the application any more, so one that could not move is finished quietly
        (its segments kept from the next server) rather than reset: a reset's RST reaches a
        server, and a connection that ends at a roam is a normal end, not a failure. A failed
        read finds none closed (logged): they are reset."""
        if not ports:
            return set()
        try:
            if len(ports) > EXACT_LOOKUPS_MAX:
                listed = {
                    info.src[1]: info
                    for info in sockdiag.tcp_sockets(dst=self.vip, states=DUMPED_STATES)
                    if info.src[0] == self.client_address
                }
                found: dict[int, sockdiag.TcpSocketInfo | None] = {p: listed.get(p) for p in ports}
            else:
                found = {p: sockdiag.lookup((self.client_address, p), self.vip) for p in ports}
        except (RoamError, OSError) as error:
            self.log.event("sockets_unreadable", level="warning", reason=str(error))
            return set()
        return {
            port
            for port, info in found.items()
            if info is None or (info.state != "ESTABLISHED" and info.inode == 0)
        }

    def reset(self, port: int) -> None:
        """Destroy the client's socket (the application gets ECONNABORTED) and forget it."""
        try:
            sockdiag.destroy((self.client_address, port), self.vip)
        except (RoamError, OSError) as error:
            self.log.event("reset_failed", level="warning", port=port, reason=str(error))
        self.store.forget(port)
