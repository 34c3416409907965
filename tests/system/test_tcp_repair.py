"""TCP_REPAIR on real sockets: a live connection moves to another network namespace.

Topology (namespaces ``roamtr<pid>{c,a,b}``, removed by the fixture whatever happens; stale
ones of dead test runs are swept first):

    client ns (10.241.0.2) --veth roamca/roamsa-- server ns A (10.241.0.1, the old server)
                           --veth roamcb/roamsb-- server ns B (10.241.0.1, the new server)

The client routes the server address through A. A roam cuts A's link (in production: A's
firewall drops the service once its epoch ends), moves the connection to B and repoints the
client's route, as the client shim's map swap would. Sockets are created inside a namespace
by switching the calling thread with setns(2); a socket stays in the namespace it was made in.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import pytest

from migrate.kernel import sockopts
from migrate.kernel.tcp_repair import (
    TcpRepairError,
    TcpRepairState,
    read_queues,
    read_repair_state,
    read_tcp_info,
    restore_socket,
    seq_add,
    silent_close,
    state_from_positions,
    supported,
    take_peer_window,
)

pytestmark = pytest.mark.system

SERVER_IP = "10.241.0.1"
CLIENT_IP = "10.241.0.2"
PORT = 5000
PREFIX = "roamtr"
CLONE_NEWNET = 0x40000000
IO_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 1.0
NEARLY_FULL_WINDOW = 12 * 1024
TSOPT_BYTES = 12  # RFC 7323 timestamp option, padded: advmss is the announced MSS minus this

_libc = ctypes.CDLL(None, use_errno=True)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and TCP_REPAIR need CAP_SYS_ADMIN/NET_ADMIN")


# --- namespaces ---------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread in network namespace ``name``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
    finally:
        os.close(home)


def tcp_counters(ns: str) -> dict[str, int]:
    """The ``Tcp:`` MIB of namespace ``ns`` (/proc/net/snmp), e.g. EstabResets, OutRsts."""
    with in_netns(ns), open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return {key: int(value) for key, value in zip(rows[0][1:], rows[1][1:], strict=True)}


def tcp_ext_counters(ns: str) -> dict[str, int]:
    """The ``TcpExt:`` MIB of namespace ``ns`` (/proc/net/netstat), e.g. TCPLossProbes."""
    with in_netns(ns), open("/proc/thread-self/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return {key: int(value) for key, value in zip(rows[0][1:], rows[1][1:], strict=True)}


def _sweep_stale_namespaces() -> None:
    """Remove namespaces left by a test run that was killed before its finalizers ran."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        match = re.fullmatch(rf"{PREFIX}(\d+)[cab]", name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            subprocess.run(
                ["ip", "netns", "del", name], check=False, capture_output=True, timeout=10
            )
        except PermissionError:
            pass  # alive, someone else's


@dataclass
class Topology:
    client: str
    server_a: str
    server_b: str

    def route_client_to_a(self) -> None:
        _ip("-n", self.client, "route", "replace", f"{SERVER_IP}/32", "dev", "roamca")

    def route_client_to_b(self) -> None:
        _ip("-n", self.client, "route", "replace", f"{SERVER_IP}/32", "dev", "roamcb")

    def cut_server_a(self) -> None:
        _ip("-n", self.server_a, "link", "set", "roamsa", "down")


@pytest.fixture
def topo() -> Iterator[Topology]:
    _require_root()
    _sweep_stale_namespaces()
    names = [f"{PREFIX}{os.getpid()}{suffix}" for suffix in "cab"]
    created: list[str] = []

    # A SIGTERM (CI timeout, `timeout`) would otherwise end the process without finalizers.
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for name in names:
            _ip("netns", "add", name)
            created.append(name)
        client, server_a, server_b = names
        # Interfaces are created inside the namespaces, so their names never meet the host's.
        for client_dev, server_ns, server_dev in (
            ("roamca", server_a, "roamsa"),
            ("roamcb", server_b, "roamsb"),
        ):
            _ip("link", "add", client_dev, "netns", client, "type", "veth",
                "peer", "name", server_dev, "netns", server_ns)  # fmt: skip
            _ip("-n", client, "link", "set", client_dev, "up")
            _ip("-n", server_ns, "link", "set", "lo", "up")
            _ip("-n", server_ns, "link", "set", server_dev, "up")
            _ip("-n", server_ns, "addr", "add", f"{SERVER_IP}/32", "dev", server_dev)
            _ip("-n", server_ns, "route", "add", f"{CLIENT_IP}/32", "dev", server_dev)
        _ip("-n", client, "link", "set", "lo", "up")
        _ip("-n", client, "addr", "add", f"{CLIENT_IP}/32", "dev", "lo")
        topology = Topology(client, server_a, server_b)
        topology.route_client_to_a()
        yield topology
    finally:
        for name in created:
            subprocess.run(
                ["ip", "netns", "del", name], check=False, capture_output=True, timeout=10
            )
        signal.signal(signal.SIGTERM, previous)


# --- a connection -------------------------------------------------------------------------


@dataclass
class Connection:
    client: socket.socket
    server: socket.socket
    listener: socket.socket
    client_isn: int
    server_isn: int
    sockets: list[socket.socket]

    def track(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock


@contextlib.contextmanager
def open_connection(topo: Topology) -> Iterator[Connection]:
    """A connection from the client to server A; the client has recorded both ISNs."""
    sockets: list[socket.socket] = []
    try:
        with in_netns(topo.server_a):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(listener)
            listener.bind((SERVER_IP, PORT))
            listener.listen(1)
        with in_netns(topo.client):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(client)
            client.bind((CLIENT_IP, 0))
        client.settimeout(IO_TIMEOUT_S)
        client.connect((SERVER_IP, PORT))
        # The client shim learns the ISNs from the SYN and SYN-ACK it sees on NFQUEUE; here
        # the client reads its own socket before any data has moved: ISN + 1 on both queues.
        isns = read_repair_state(client)
        listener.settimeout(IO_TIMEOUT_S)
        server, _ = listener.accept()
        sockets.append(server)
        server.settimeout(IO_TIMEOUT_S)
        yield Connection(
            client=client,
            server=server,
            listener=listener,
            client_isn=seq_add(isns.send_seq, -1),
            server_isn=seq_add(isns.recv_seq, -1),
            sockets=sockets,
        )
    finally:
        # Close everything in repair mode: no FIN/RST noise while the namespaces go away.
        for sock in sockets:
            if sock.fileno() >= 0:
                with contextlib.suppress(OSError):
                    silent_close(sock)
            sock.close()


@pytest.fixture
def conn(topo: Topology) -> Iterator[Connection]:
    with open_connection(topo) as connection:
        yield connection


# --- traffic helpers ----------------------------------------------------------------------


def pattern(tag: bytes, size: int) -> bytes:
    """Deterministic bytes without repeats, so a shifted or truncated stream fails to match."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(tag + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(1 << 20, size - len(buf)))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def recv_available(sock: socket.socket, wait_s: float) -> bytes:
    """Whatever arrives within ``wait_s`` (stops at the first quiet period)."""
    sock.settimeout(wait_s)
    buf = bytearray()
    with contextlib.suppress(TimeoutError):
        while chunk := sock.recv(1 << 16):
            buf += chunk
    return bytes(buf)


def run_parallel(*jobs: Callable[[], object]) -> list[object]:
    """Run jobs in threads; re-raise the first failure."""
    results: list[object] = [None] * len(jobs)
    errors: list[BaseException] = []

    def wrap(index: int, job: Callable[[], object]) -> None:
        try:
            results[index] = job()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=wrap, args=(i, job), daemon=True) for i, job in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(IO_TIMEOUT_S * 3)
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), "transfer thread hung"
    return results


def exchange(a: socket.socket, b: socket.socket, a_to_b: bytes, b_to_a: bytes) -> None:
    """Send both ways at once; check what arrived by SHA-256."""
    _, _, got_b, got_a = run_parallel(
        lambda: a.sendall(a_to_b),
        lambda: b.sendall(b_to_a),
        lambda: recv_exactly(b, len(a_to_b)),
        lambda: recv_exactly(a, len(b_to_a)),
    )
    assert isinstance(got_b, bytes)
    assert isinstance(got_a, bytes)
    assert hashlib.sha256(got_b).hexdigest() == hashlib.sha256(a_to_b).hexdigest()
    assert hashlib.sha256(got_a).hexdigest() == hashlib.sha256(b_to_a).hexdigest()


def unacked(sock: socket.socket) -> int:
    """Bytes in the send queue not yet acknowledged (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, sockopts.S32.pack(0))
    value: int = sockopts.S32.unpack(raw)[0]
    return value


def wait_settled(*socks: socket.socket) -> None:
    """Wait until every byte sent on ``socks`` has been acknowledged."""
    deadline = time.monotonic() + IO_TIMEOUT_S
    while any(unacked(sock) for sock in socks):
        assert time.monotonic() < deadline, "send queues did not drain"
        time.sleep(0.005)


def reset_counters(topo: Topology, server_ns: str) -> dict[str, int]:
    client, server = tcp_counters(topo.client), tcp_counters(server_ns)
    # EstabResets counts ESTABLISHED -> CLOSE transitions, which a silent close also is, so it
    # is watched on the client only; OutRsts (RSTs sent) on both sides.
    return {
        "client EstabResets": client["EstabResets"],
        "client OutRsts": client["OutRsts"],
        "server OutRsts": server["OutRsts"],
    }


def server_tsval(server: socket.socket) -> tuple[int, float]:
    """The server's TSval now, and when: what a server checkpoint carries (no repair needed)."""
    raw = server.getsockopt(socket.SOL_TCP, sockopts.TCP_TIMESTAMP, 4)
    value: int = sockopts.U32.unpack(raw)[0]
    return value, time.monotonic()


def client_view_state(
    conn: Connection, checkpoint_ts: tuple[int, float], *, known_window: bool = True
) -> TcpRepairState:
    """The server's state from the client's knowledge only (plus the checkpoint's TSval);
    without ``known_window``, the client's receive window is left to the restore's guess, as
    a new server's is until the client's GO says it (``take_peer_window``).

    ``tcpi_bytes_acked`` on the side that connected counts its SYN, hence the ``- 1``;
    ``tcpi_bytes_received`` does not count the peer's SYN. The client's windows are the
    server's, mirrored.
    """
    info = read_tcp_info(conn.client)
    timestamps = bool(info.options & sockopts.TCPI_OPT_TIMESTAMPS)
    tsval = None
    if timestamps:
        # Continue the server's clock from the checkpoint: never below what the client saw.
        value, taken = checkpoint_ts
        tsval = seq_add(value, int((time.monotonic() - taken) * 1000) + 1)
    assert info.snd_wnd is not None
    assert info.rcv_wnd is not None
    local = conn.client.getsockname()
    return state_from_positions(
        local=(SERVER_IP, PORT),
        remote=(local[0], local[1]),
        server_isn=conn.server_isn,
        client_isn=conn.client_isn,
        bytes_to_client=info.bytes_received,
        bytes_from_client=info.bytes_acked - 1,
        mss=info.advmss + (TSOPT_BYTES if timestamps else 0),
        snd_wscale=info.rcv_wscale,
        rcv_wscale=info.snd_wscale,
        sack=bool(info.options & sockopts.TCPI_OPT_SACK),
        tsval=tsval,
        snd_wnd=info.rcv_wnd if known_window else None,
        rcv_wnd=info.snd_wnd,
    )


def restore_in_b(
    topo: Topology,
    conn: Connection,
    state: TcpRepairState,
    *,
    send_queue: bytes = b"",
    recv_queue: bytes = b"",
) -> socket.socket:
    with in_netns(topo.server_b):
        sock = conn.track(restore_socket(state, send_queue=send_queue, recv_queue=recv_queue))
    sock.settimeout(IO_TIMEOUT_S)
    topo.route_client_to_b()  # the client shim's map swap, after the new server is ready
    return sock


# --- tests --------------------------------------------------------------------------------


def test_supported_here() -> None:
    _require_root()
    assert supported() is None


def test_roam_to_second_namespace_with_data_in_flight(topo: Topology, conn: Connection) -> None:
    client, server = conn.client, conn.server
    exchange(client, server, pattern(b"c1", 1 << 20), pattern(b"s1", 1 << 20))
    wait_settled(client, server)

    # Cut the old server off first, so nothing the client sends from now on can meet a closed
    # socket and draw a RST. Bytes written now are in flight both ways and must survive.
    topo.cut_server_a()
    client_tail, server_tail = pattern(b"c2", 64 * 1024), pattern(b"s2", 48 * 1024)
    client.sendall(client_tail)
    server.sendall(server_tail)
    before = reset_counters(topo, topo.server_b)

    state = read_repair_state(server, keep_repair=True)
    queues = read_queues(server)
    assert queues.send == server_tail
    assert queues.recv == b""
    silent_close(server)
    new_server = restore_in_b(topo, conn, state, send_queue=queues.send, recv_queue=queues.recv)

    restored = read_repair_state(new_server)
    assert (restored.send_seq, restored.recv_seq) == (state.send_seq, state.recv_seq)
    assert (restored.mss, restored.snd_wscale, restored.rcv_wscale) == (
        state.mss,
        state.snd_wscale,
        state.rcv_wscale,
    )
    assert (restored.sack, restored.timestamps) == (state.sack, state.timestamps)
    assert read_tcp_info(new_server).snd_mss == read_tcp_info(client).rcv_mss > 536

    # The client retransmits its tail to B at once; B's restored send queue goes out by
    # retransmission timer (about 1 s tail probe, then RTO: see docs/tcp_repair.md).
    assert recv_exactly(new_server, len(client_tail)) == client_tail
    assert recv_exactly(client, len(server_tail)) == server_tail
    exchange(client, new_server, pattern(b"c3", 10 << 20), pattern(b"s3", 10 << 20))
    wait_settled(client, new_server)
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert reset_counters(topo, topo.server_b) == before


@pytest.mark.parametrize("timestamps", [True, False], ids=["timestamps", "no-timestamps"])
def test_restore_from_client_positions(timestamps: bool, topo: Topology) -> None:
    # The client decides whether timestamps are offered (its SYN); set it before connecting.
    with in_netns(topo.client), open("/proc/sys/net/ipv4/tcp_timestamps", "w") as f:
        f.write("1" if timestamps else "0")
    with open_connection(topo) as conn:
        client, server = conn.client, conn.server
        exchange(client, server, pattern(b"c1", 256 * 1024), pattern(b"s1", 256 * 1024))
        wait_settled(client, server)
        checkpoint_ts = server_tsval(server) if timestamps else (0, 0.0)
        topo.cut_server_a()
        client_tail = pattern(b"c2", 20000)
        client.sendall(client_tail)  # never acknowledged by A: the client will retransmit it
        before = reset_counters(topo, topo.server_b)

        state = client_view_state(conn, checkpoint_ts)
        # Cross-check only: the old server's kernel agrees with the client's view.
        kernel = read_repair_state(server, keep_repair=True)
        assert (state.send_seq, state.recv_seq) == (kernel.send_seq, kernel.recv_seq)
        assert (state.mss, state.snd_wscale, state.rcv_wscale, state.sack, state.timestamps) == (
            kernel.mss,
            kernel.snd_wscale,
            kernel.rcv_wscale,
            kernel.sack,
            kernel.timestamps,
        )
        # The client's tail went out after the cut, each segment advertising the client's
        # window as it is now: grown by autotuning since A last heard of it (the client read
        # every byte), never smaller. The client's view is the newer one.
        assert kernel.snd_wnd <= state.snd_wnd
        assert state.rcv_wnd == kernel.rcv_wnd
        silent_close(server)

        new_server = restore_in_b(topo, conn, state)
        assert recv_exactly(new_server, len(client_tail)) == client_tail
        exchange(client, new_server, pattern(b"c3", 1 << 20), pattern(b"s3", 1 << 20))
        wait_settled(client, new_server)
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert reset_counters(topo, topo.server_b) == before


def test_a_restored_socket_sends_nothing_past_a_nearly_full_client_window(
    topo: Topology, conn: Connection
) -> None:
    """The new server does not know the client's receive window. A client whose application
    has not read what it received (its window down to a few segments): the restored socket's
    first sends fit in it, and no segment is dropped and sent again, which cost 200 ms to 1 s
    of pause after a roam when the guess was 64 KiB."""
    client, server = conn.client, conn.server
    # A small receive buffer, as an application reading at its own pace sets (the migration
    # benchmark's paced client): the kernel then has little room past the window it advertises.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    received = bytearray()
    # The client reads nothing: each chunk, acknowledged, narrows the window it advertises.
    for index in range(400):
        chunk = pattern(b"a%d" % index, 1024)
        server.sendall(chunk)
        received += chunk
        wait_settled(server)
        window = read_tcp_info(client).rcv_wnd
        assert window is not None
        if window < NEARLY_FULL_WINDOW:
            break
    mss = read_tcp_info(client).rcv_mss
    assert 2 * mss <= window < NEARLY_FULL_WINDOW, (window, mss)
    topo.cut_server_a()
    state = client_view_state(conn, server_tsval(server), known_window=False)
    silent_close(server)

    def resent() -> tuple[int, int]:
        """Segments B sent again, but for tail loss probes (sent when an ACK is slow, dropped
        or not: the client delays its ACKs), and B's retransmission timeouts."""
        ext = tcp_ext_counters(topo.server_b)
        again = tcp_counters(topo.server_b)["RetransSegs"] - ext["TCPLossProbes"]
        return again, ext["TCPTimeouts"]

    before = resent()
    new_server = restore_in_b(topo, conn, state)
    tail = pattern(b"b", 1 << 20)
    # The client's application reads again only after the new server has sent what it could.
    _, got = run_parallel(
        lambda: new_server.sendall(tail),
        lambda: (time.sleep(0.2), recv_exactly(client, len(received) + len(tail)))[1],
    )
    assert got == bytes(received) + tail
    wait_settled(new_server)
    assert resent() == before


def test_a_restored_socket_told_a_closed_client_window_waits_for_its_update(
    topo: Topology, conn: Connection
) -> None:
    """The client's window is closed at the roam (its application busy elsewhere, as the
    flat-out benchmark's client hashing each file). Told that window after the switch, as the
    client's GO tells it, the new server sends nothing into it: the client's window update, once
    its application reads, reaches the new server and the rest follows at once. No segment
    is dropped beyond the window, none sent again, no window probe needed. (With the
    two-segment guess both segments are dropped, and a loss probe sends them again 200 ms
    later.)"""
    client, server = conn.client, conn.server
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    data = pattern(b"w", 4 << 20)
    server.setblocking(False)
    sent = server.send(data[: 1 << 20])  # more than the client's buffer takes
    deadline = time.monotonic() + IO_TIMEOUT_S
    while read_tcp_info(client).rcv_wnd != 0:
        assert time.monotonic() < deadline, "the client's window did not close"
        time.sleep(0.005)
    assert sent > read_tcp_info(client).bytes_received
    topo.cut_server_a()
    state = client_view_state(conn, server_tsval(server), known_window=False)
    silent_close(server)  # what the client has not received goes with it

    def counters() -> tuple[int, int, int, int]:
        """The client's segments dropped beyond its window; B's segments sent again but for
        loss probes, its loss probes and its window probes."""
        ext, b_ext = tcp_ext_counters(topo.client), tcp_ext_counters(topo.server_b)
        again = tcp_counters(topo.server_b)["RetransSegs"] - b_ext["TCPLossProbes"]
        return ext["BeyondWindow"], again, b_ext["TCPLossProbes"], b_ext["TCPWinProbe"]

    before = counters()
    new_server = restore_in_b(topo, conn, state)  # then the client's switch
    window = read_tcp_info(client).rcv_wnd
    assert window == 0
    assert take_peer_window(new_server, window, assumed=state.snd_wnd) == 0
    received = read_tcp_info(client).bytes_received
    # The client's application reads again only after the new server has had time to send.
    _, got = run_parallel(
        lambda: new_server.sendall(data[received:]),
        lambda: (time.sleep(0.2), recv_exactly(client, len(data)))[1],
    )
    assert got == data
    wait_settled(new_server)
    assert counters() == before


def _roam_with_shifted_state(
    topo: Topology, conn: Connection, *, recv_shift: int = 0, send_shift: int = 0
) -> socket.socket:
    client, server = conn.client, conn.server
    exchange(client, server, pattern(b"c1", 64 * 1024), pattern(b"s1", 64 * 1024))
    wait_settled(client, server)
    checkpoint_ts = server_tsval(server)
    topo.cut_server_a()
    silent_close(server)
    good = client_view_state(conn, checkpoint_ts)
    return restore_in_b(
        topo,
        conn,
        state_from_positions(
            local=good.local,
            remote=good.remote,
            server_isn=conn.server_isn,
            client_isn=conn.client_isn,
            bytes_to_client=read_tcp_info(client).bytes_received + send_shift,
            bytes_from_client=read_tcp_info(client).bytes_acked - 1 + recv_shift,
            mss=good.mss,
            snd_wscale=good.snd_wscale,
            rcv_wscale=good.rcv_wscale,
            sack=good.sack,
            tsval=good.tsval,
            snd_wnd=good.snd_wnd,
            rcv_wnd=good.rcv_wnd,
        ),
    )


def test_recv_seq_behind_stalls_client_data(topo: Topology, conn: Connection) -> None:
    """The new server expects bytes the client already had acknowledged: the client's data
    lands beyond a hole that will never fill, so nothing reaches the application."""
    new_server = _roam_with_shifted_state(topo, conn, recv_shift=-1000)
    conn.client.sendall(pattern(b"c2", 5000))
    assert recv_available(new_server, STALL_TIMEOUT_S) == b""
    assert unacked(conn.client) == 5000  # never acknowledged: the client keeps retrying


def test_recv_seq_ahead_silently_drops_client_bytes(topo: Topology, conn: Connection) -> None:
    """The new server believes it already has 1000 client bytes it never got. TCP cannot tell:
    it trims them as duplicates, delivers the rest and acknowledges everything. The kernel
    does not protect against a wrong position; the positions must be exact (checked against
    the checkpoint and the running hash above this layer)."""
    new_server = _roam_with_shifted_state(topo, conn, recv_shift=1000)
    sent = pattern(b"c2", 5000)
    conn.client.sendall(sent)
    got = recv_exactly(new_server, 4000)
    assert got == sent[1000:]
    wait_settled(conn.client)


def test_send_seq_ahead_stalls_server_data(topo: Topology, conn: Connection) -> None:
    new_server = _roam_with_shifted_state(topo, conn, send_shift=1000)
    new_server.sendall(pattern(b"s2", 5000))
    assert recv_available(conn.client, STALL_TIMEOUT_S) == b""


def test_send_seq_behind_silently_shifts_server_bytes(topo: Topology, conn: Connection) -> None:
    """The mirror case: the client trims what it believes it has and takes the rest."""
    new_server = _roam_with_shifted_state(topo, conn, send_shift=-1000)
    sent = pattern(b"s2", 5000)
    new_server.sendall(sent)
    assert recv_exactly(conn.client, 4000) == sent[1000:]


def test_restore_in_same_namespace_with_listener_bound(topo: Topology, conn: Connection) -> None:
    """Same host: the listener still holds the port; repair mode's forced reuse lets the new
    socket bind anyway, and a restore over a still-open socket fails cleanly."""
    client, server = conn.client, conn.server
    exchange(client, server, pattern(b"c1", 256 * 1024), pattern(b"s1", 256 * 1024))
    wait_settled(client, server)
    before = reset_counters(topo, topo.server_a)
    state = read_repair_state(server, keep_repair=True)
    with in_netns(topo.server_a):
        with pytest.raises(TcpRepairError, match="connect to"):
            restore_socket(state)  # the 4-tuple is still taken by the old socket
        silent_close(server)
        new_server = conn.track(restore_socket(state))
    new_server.settimeout(IO_TIMEOUT_S)
    exchange(client, new_server, pattern(b"c2", 1 << 20), pattern(b"s2", 1 << 20))
    wait_settled(client, new_server)
    assert reset_counters(topo, topo.server_a) == before


def test_invalid_state_is_rejected_before_any_syscall() -> None:
    good = state_from_positions(
        local=(SERVER_IP, PORT),
        remote=(CLIENT_IP, 40000),
        server_isn=2**32 - 1,
        client_isn=5,
        bytes_to_client=10,
        bytes_from_client=0,
        mss=1460,
        snd_wscale=7,
        rcv_wscale=7,
        sack=True,
        tsval=123,
    )
    assert good.send_seq == 10  # wraps: ISN + SYN + 10 bytes
    assert good.snd_wl1 == 5
    with pytest.raises(ValueError, match="rcv_wscale"):
        state_from_positions(
            local=(SERVER_IP, PORT),
            remote=(CLIENT_IP, 40000),
            server_isn=1,
            client_isn=1,
            bytes_to_client=0,
            bytes_from_client=0,
            mss=1460,
            rcv_wscale=15,
        )
    with pytest.raises(ValueError, match="families"):
        state_from_positions(
            local=("::1", PORT),
            remote=(CLIENT_IP, 40000),
            server_isn=1,
            client_isn=1,
            bytes_to_client=0,
            bytes_from_client=0,
            mss=1460,
        )


def test_restored_timestamp_clock_stays_in_milliseconds(topo: Topology, conn: Connection) -> None:
    # Linux >= 6.7 takes the low bit of a TCP_TIMESTAMP setting as "microsecond timestamps":
    # an odd TSval restored as is would make the new server's clock run 1000 times too fast,
    # and the next server (in milliseconds again) fall behind the client's TS.Recent.
    exchange(conn.client, conn.server, pattern(b"c1", 4096), pattern(b"s1", 4096))
    wait_settled(conn.client, conn.server)
    value, taken = server_tsval(conn.server)
    topo.cut_server_a()
    state = client_view_state(conn, (value | 1, taken))
    assert state.tsval is not None
    silent_close(conn.server)
    new_server = restore_in_b(topo, conn, state)
    first, started = server_tsval(new_server)
    time.sleep(0.3)
    second, ended = server_tsval(new_server)
    assert first >= state.tsval
    elapsed_ms = (ended - started) * 1000
    # Milliseconds: about 300 ticks (not about 300,000).
    assert elapsed_ms - 50 <= (second - first) % 2**32 <= elapsed_ms + 50
    exchange(conn.client, new_server, pattern(b"c2", 65536), pattern(b"s2", 65536))


@pytest.mark.parametrize("reader", ["accept_facts", "read_snapshot"])
def test_snapshot_is_consistent_while_the_peer_keeps_sending(
    topo: Topology, conn: Connection, reader: str
) -> None:
    # The shim reads a just-accepted socket while the client's first request may be landing
    # (a burst of connects). Nobody reads the server socket here, so the receive queue holds
    # every byte since the handshake: each read's client ISN (receive sequence minus queue)
    # must be the real one, however the reads and the arrivals interleave. A read that saw the
    # queue change on every attempt says so (EAGAIN, the relay then refuses the connection):
    # a clear refusal, never a wrong answer. ``accept_facts`` is what the relay runs on every
    # accept; ``read_snapshot`` also copies the queues, so a queue that keeps growing while
    # it is copied refuses more often (a CI run saw 8 refusals in a row on its 512 KiB queue).
    from migrate.kernel.tcp_repair import TcpRepairError, leave_repair, read_snapshot
    from proxy.checkpoints import accept_facts

    def client_isn() -> int:
        if reader == "accept_facts":
            return accept_facts(conn.server).client_isn
        try:
            state, queues = read_snapshot(conn.server)
        finally:
            leave_repair(conn.server)
        return seq_add(state.recv_seq, -1 - len(queues.recv))

    stop = threading.Event()
    sent = [0]

    def keep_sending() -> None:
        deadline = time.monotonic() + 5.0  # bounded, whatever happens to the reader
        chunk = b"x" * 64
        while not stop.is_set() and time.monotonic() < deadline and sent[0] < 512 * 1024:
            conn.client.sendall(chunk)
            sent[0] += len(chunk)
            time.sleep(0.0002)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    wrong: list[int] = []
    refused = 0
    try:
        for _ in range(300):
            try:
                isn = client_isn()
            except TcpRepairError as error:
                if error.errno != errno.EAGAIN:
                    raise
                refused += 1
                continue
            if isn != conn.client_isn:
                wrong.append(isn)
    finally:
        stop.set()
        sender.join(timeout=10)
    assert sent[0] > 0
    assert wrong == [], f"{len(wrong)} of 300 reads were inconsistent: {wrong[:3]}"
    assert refused < 300, "every read refused: the reader never saw the queue stand still"


def test_restore_over_a_spoofed_half_open_entry(topo: Topology, conn: Connection) -> None:
    """A SYN spoofed with the connection's 4-tuple, sent to the new server before the move,
    leaves a half-open request socket there that makes the restore's connect fail; dropping
    exactly that entry (never a connection) lets the restore go through, bytes intact."""
    from migrate.kernel import rawtcp, sockdiag

    client, server = conn.client, conn.server
    exchange(client, server, pattern(b"c1", 64 * 1024), pattern(b"s1", 64 * 1024))
    wait_settled(client, server)
    topo.cut_server_a()
    client_address = client.getsockname()
    local, remote = (SERVER_IP, PORT), (client_address[0], client_address[1])
    with in_netns(topo.server_b):
        listener = conn.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind(local)
        listener.listen(8)
        sender = rawtcp.RawTcpSender()
        try:
            # Locally generated, so no reverse-path check: the kernel takes it as the client's.
            sender.send(
                rawtcp.build_ipv4_tcp(
                    CLIENT_IP, SERVER_IP, remote[1], PORT, 12345, 0, rawtcp.SYN, 64240, [], b"",
                    ip_id=7,
                )
            )  # fmt: skip
        finally:
            sender.close()
        deadline = time.monotonic() + IO_TIMEOUT_S
        while (found := sockdiag.lookup(local, remote)) is None:
            assert time.monotonic() < deadline, "the spoofed SYN left no half-open entry"
            time.sleep(0.005)
        assert found.state == "SYN_RECV"
        state = read_repair_state(server, keep_repair=True)
        silent_close(server)
        with pytest.raises(TcpRepairError, match="connect to") as failed:
            restore_socket(state)
        assert failed.value.errno == errno.EADDRNOTAVAIL
        assert sockdiag.clear_half_open(local, remote)
        assert not sockdiag.clear_half_open(local, remote)  # nothing left to drop
        new_server = conn.track(restore_socket(state))
        # A connection is never taken for a half-open entry.
        assert not sockdiag.clear_half_open(local, remote)
    new_server.settimeout(IO_TIMEOUT_S)
    topo.route_client_to_b()
    exchange(client, new_server, pattern(b"c2", 1 << 20), pattern(b"s2", 1 << 20))
    wait_settled(client, new_server)
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # the spoofed SYN never became a connection
