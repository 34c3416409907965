"""NFLOG reader on real traffic in a lab: carriers harvested and dropped before the client's
TCP sees them, outgoing data copied for a replay tail, SYNs seen, overflow detected; and the
client's rules without capture (reconnect mode) across a switch.

Topology: ``PoolTopo(servers=1, clients=1, outsiders=0)``: ``s1`` and ``c1`` on one bridge.
The nftables table ``roam_t_<pid>`` is created in ``c1`` (the client shim's side) and deleted
at the end of each test; readers are opened inside ``c1`` with ``call_in_netns``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from client_shim.rules import (
    BARRIER_MARK,
    BARRIER_PORT,
    freeze_script,
    hold_script,
    rewrite_table_body,
    switch_script,
)
from labs import Lab, PoolTopo
from labs.node import Node
from migrate.endpoints import Endpoint
from migrate.kernel import sockdiag
from migrate.kernel.instances import Instance, call_in_netns
from migrate.kernel.nflog import (
    NF_INET_LOCAL_OUT,
    NF_INET_PRE_ROUTING,
    NflogError,
    NflogPacket,
    NflogReader,
)
from migrate.kernel.rawtcp import (
    ACK,
    PSH,
    SYN,
    RawSocketError,
    RawTcpSender,
    TcpSegment,
    build_ipv4_tcp,
    carrier_option,
    is_carrier,
    parse_ipv4_tcp,
)
from migrate.kernel.routing import HostRoute
from proxy.relay import close_abortively

pytestmark = pytest.mark.system

TABLE = f"roam_t_{os.getpid()}"
TOPO = PoolTopo(servers=1, clients=1, outsiders=0)
PORT = 7100
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------


def in_ns(host: Node, function: Callable[[], T]) -> T:
    return call_in_netns(host.netns, function)


@contextlib.contextmanager
def nft_table(host: Node, chains: str) -> Iterator[None]:
    """Table ``ip roam_t_<pid>`` with ``chains`` in ``host``; deleted (and checked) at exit."""
    host.run(["nft", "-f", "-"], input=f"table ip {TABLE} {{\n{chains}\n}}\n", check=True)
    try:
        yield
    finally:
        host.run(["nft", "delete", "table", "ip", TABLE], timeout=10)
        assert TABLE not in host.run(["nft", "list", "tables"], check=True).stdout


def tcp_mib(host: Node) -> dict[str, int]:
    """The ``Tcp:`` counters of ``host``'s namespace (InSegs, OutRsts, InCsumErrors, ...)."""

    def read() -> dict[str, int]:
        with open("/proc/thread-self/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}

    return in_ns(host, read)


def wait_packets(
    reader: NflogReader, count: int, timeout_s: float = 3.0, *, settle_s: float = 0.0
) -> list[NflogPacket]:
    """Read until ``count`` packets came (or the timeout), then for ``settle_s`` more."""
    packets: list[NflogPacket] = []
    deadline = time.monotonic() + timeout_s
    while len(packets) < count and time.monotonic() < deadline:
        select.select([reader.fileno()], [], [], 0.05)
        packets += reader.read()
    if settle_s:
        time.sleep(settle_s)
        packets += reader.read()
    return packets


def segment_of(packet: NflogPacket) -> TcpSegment:
    segment = parse_ipv4_tcp(packet.payload)
    assert segment is not None
    return segment


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return bytes(data)


@contextlib.contextmanager
def connection(
    lab: Lab, port: int, to: str | None = None
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection from c1 to s1:port (through ``to``, a VIP, if given): (client socket,
    server socket)."""
    server_ip = str(lab["s1"].address)

    def listen() -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((server_ip, port))
        listener.listen()
        listener.settimeout(5)
        return listener

    listener = in_ns(lab["s1"], listen)
    with listener:
        client = in_ns(
            lab["c1"], lambda: socket.create_connection((to or server_ip, port), timeout=5)
        )
        server, _ = listener.accept()
    with client, server:
        server.settimeout(5)
        yield client, server


# --- carriers -------------------------------------------------------------------------------


def test_carrier_is_harvested_byte_identical_and_never_reaches_tcp(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    chains = """
    chain pre {
        type filter hook prerouting priority -300;
        tcp option @253,16,16 0x5352 log prefix "carrier" group 7 snaplen 65535 drop
        tcp flags & (syn | ack) == syn | ack log prefix "syn-ack" group 8 snaplen 65535
    }
    chain out {
        type filter hook output priority -300;
        tcp flags & (syn | ack) == syn log prefix "syn" group 8 snaplen 65535
    }
    """
    with (
        nft_table(c1, chains),
        in_ns(c1, lambda: NflogReader.open(7)) as carriers,
        in_ns(c1, lambda: NflogReader.open(8)) as syns,
        in_ns(s1, RawTcpSender) as sender,
        connection(lab, PORT) as (client, server),
    ):
        # (c) the client's SYN and the server's SYN-ACK give both ISNs
        handshake = {p.prefix: segment_of(p) for p in wait_packets(syns, 2)}
        assert set(handshake) == {"syn", "syn-ack"}
        client_isn, server_isn = handshake["syn"].seq, handshake["syn-ack"].seq
        assert handshake["syn-ack"].ack == (client_isn + 1) % 2**32
        client_port = client.getsockname()[1]
        assert handshake["syn"].sport == client_port
        assert handshake["syn"].mss is not None

        server.sendall(b"hi")
        assert recv_exact(client, 2) == b"hi"
        client.sendall(b"abc")
        assert recv_exact(server, 3) == b"abc"
        time.sleep(0.1)  # let the last ACKs settle

        def diag() -> sockdiag.TcpSocketInfo:
            info = sockdiag.lookup((str(c1.address), client_port), (str(s1.address), PORT))
            assert info is not None
            return info

        before_diag = in_ns(c1, diag)
        before_mib = tcp_mib(c1)

        # A carrier on the connection's own 5-tuple, in sequence: were it to reach the client's
        # TCP, the application would read its payload.
        in_window = {
            "src": str(s1.address), "dst": str(c1.address), "sport": PORT,
            "dport": client_port, "seq": (server_isn + 1 + 2) % 2**32,
            "ack": (client_isn + 1 + 3) % 2**32, "flags": ACK | PSH, "window": 502,
        }  # fmt: skip
        carrier = build_ipv4_tcp(
            **in_window, options=[carrier_option(b"\x01seal")], payload=b"sealed checkpoint",
            ip_id=0x1234,
        )  # fmt: skip
        # and one to a closed port, which would draw a RST
        stray = build_ipv4_tcp(
            str(s1.address), str(c1.address), PORT, 9, 1, 1, ACK, 100,
            [carrier_option()], b"x", ip_id=0x1235,
        )  # fmt: skip
        sender.send(carrier)
        sender.send(stray)

        got = wait_packets(carriers, 2, settle_s=0.2)
        assert [p.payload for p in got] == [carrier, stray]  # byte-identical, in order
        first = got[0]
        assert first.prefix == "carrier"
        assert first.hook == NF_INET_PRE_ROUTING
        assert first.timestamp is not None
        assert abs(first.timestamp - time.time()) < 60
        assert first.indev == in_ns(c1, lambda: socket.if_nametoindex("eth0"))
        assert first.outdev is None
        assert first.seq == 0
        assert is_carrier(segment_of(first))
        assert segment_of(first).payload == b"sealed checkpoint"

        # the client's TCP never saw them
        assert select.select([client], [], [], 0)[0] == []  # nothing to read
        after_diag = in_ns(c1, diag)
        assert after_diag.segs_in == before_diag.segs_in
        assert after_diag.bytes_received == before_diag.bytes_received == 2
        after_mib = tcp_mib(c1)
        assert after_mib["InSegs"] == before_mib["InSegs"]
        assert after_mib["OutRsts"] == before_mib["OutRsts"]
        assert carriers.overflowed == 0
        assert carriers.missed == 0

        # Control: the same segments with another experiment id are not carriers. They are
        # neither logged nor dropped: the application reads one, the closed port answers RST.
        other = (253, b"XXseal")
        sender.send(build_ipv4_tcp(**in_window, options=[other], payload=b"plain", ip_id=7))
        sender.send(
            build_ipv4_tcp(str(s1.address), str(c1.address), PORT, 9, 1, 1, ACK, 100, [other], b"x")
        )
        assert recv_exact(client, 5) == b"plain"
        time.sleep(0.1)
        assert tcp_mib(c1)["OutRsts"] >= after_mib["OutRsts"] + 1
        assert carriers.read() == []


# --- copies of outgoing data ------------------------------------------------------------------


def test_output_copies_reassemble_the_sent_stream(lab_factory) -> None:
    """(b) A ``log`` rule without verdict copies every outgoing segment; the copies,
    placed by sequence number, give back the bytes sent. Read from an asyncio loop."""
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    total = 1 << 20
    chunk = 16 * 1024
    sent = os.urandom(total)
    chains = f"""
    chain out {{
        type filter hook output priority -300;
        ip daddr {s1.address} tcp dport {PORT + 1} log prefix "out" group 9 snaplen 65535
    }}
    """
    received = bytearray()

    def serve(server: socket.socket) -> None:
        while len(received) < total:
            data = server.recv(1 << 16)
            if not data:
                break
            received.extend(data)

    async def run(reader: NflogReader) -> list[NflogPacket]:
        loop = asyncio.get_running_loop()
        packets: list[NflogPacket] = []
        loop.add_reader(reader.fileno(), lambda: packets.extend(reader.read()))
        try:
            with connection(lab, PORT + 1) as (client, server):
                drain = threading.Thread(target=serve, args=(server,))
                drain.start()

                def send() -> None:
                    for offset in range(0, total, chunk):  # about 16 MB/s at most
                        client.sendall(sent[offset : offset + chunk])
                        time.sleep(0.001)

                await asyncio.to_thread(send)
                await asyncio.to_thread(drain.join, 10)
                await asyncio.sleep(0.2)
        finally:
            loop.remove_reader(reader.fileno())
        return packets + reader.read()

    with nft_table(c1, chains), in_ns(c1, lambda: NflogReader.open(9)) as reader:
        packets = asyncio.run(run(reader))
        assert reader.overflowed == 0
        assert reader.missed == 0
        assert reader.received == len(packets)

    assert bytes(received) == sent
    segments = [segment_of(p) for p in packets]  # none truncated: every one parses
    assert all(p.hook == NF_INET_LOCAL_OUT for p in packets)
    assert all(p.timestamp is None and p.outdev is not None for p in packets)
    assert all(p.prefix == "out" for p in packets)
    syn = next(s for s in segments if s.syn)
    stream = bytearray(total)
    covered = bytearray(total)
    for segment in segments:
        if not segment.payload:
            continue
        offset = (segment.seq - syn.seq - 1) % 2**32
        assert offset + len(segment.payload) <= total
        stream[offset : offset + len(segment.payload)] = segment.payload
        covered[offset : offset + len(segment.payload)] = b"\x01" * len(segment.payload)
    assert covered.count(0) == 0
    assert bytes(stream) == sent


# --- overflow, binding ------------------------------------------------------------------------


def test_overflow_is_reported_and_lost_packets_counted(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    chains = """
    chain pre {
        type filter hook prerouting priority -300;
        tcp option @253,16,16 0x5352 log group 10 snaplen 65535 drop
    }
    """
    count = 400
    with (
        nft_table(c1, chains),
        in_ns(c1, lambda: NflogReader.open(10, rcvbuf=4096)) as reader,
        in_ns(s1, RawTcpSender) as sender,
    ):
        packet = build_ipv4_tcp(
            str(s1.address), str(c1.address), PORT, 9, 1, 1, ACK, 100,
            [carrier_option()], bytes(1000), ip_id=1,
        )  # fmt: skip
        for _ in range(count):
            sender.send(packet)
        first = wait_packets(reader, count, timeout_s=0.5, settle_s=0.1)
        assert reader.overflowed >= 1
        assert len(first) < count
        # the next packet's sequence number reveals how many were lost
        sender.send(packet)
        last = wait_packets(reader, 1)
        assert len(last) == 1
        assert last[0].seq == count
        assert len(first) + len(last) + reader.missed == count + 1


def test_a_group_has_one_reader_and_close_releases_it(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1 = lab["c1"]
    reader = in_ns(c1, lambda: NflogReader.open(11))
    with pytest.raises(NflogError, match="cannot bind NFLOG group 11: it is bound by another"):
        in_ns(c1, lambda: NflogReader.open(11))
    # another namespace has its own groups
    in_ns(lab["s1"], lambda: NflogReader.open(11)).close()
    reader.close()
    reader.close()  # idempotent
    assert reader.closed
    with pytest.raises(NflogError, match="closed"):
        reader.read()
    in_ns(c1, lambda: NflogReader.open(11)).close()
    with pytest.raises(NflogError, match="out of range"):
        NflogReader.open(70000)


def test_pf_bind_is_accepted(lab_factory) -> None:
    """The legacy PF_UNBIND/PF_BIND sequence works too (it only changes the namespace's
    default logger)."""
    lab = lab_factory(TOPO)
    in_ns(lab["c1"], lambda: NflogReader.open(12, bind_pf=True, nlbufsiz=65536)).close()


# --- the client shim's capture chains ---------------------------------------------------------


def test_the_client_shims_capture_copies_every_payload_and_no_pure_ack(lab_factory) -> None:
    """``client_shim.rules``' capture chain, in a real table: segments to the VIP with payload
    are copied whatever their flags and header length (a replay needs every byte), pure ACKs
    (a downloading client's bulk) are not."""
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    vip = ipaddress.ip_address(str(s1.address))
    server = Endpoint(vip, PORT + 5)
    body = rewrite_table_body(vip, PORT + 5, (server,), server, nflog_group=11)
    timestamps = (8, bytes(8))
    sack3 = (5, bytes(24))  # three SACK blocks: with timestamps, the longest pure ACK (80)
    cases = {
        # name: (flags, options, payload, copied)
        "pure ack, timestamps": (ACK, [timestamps], b"", False),
        "pure ack, no options": (ACK, [], b"", False),
        "pure ack, timestamps and 3 sack blocks": (ACK, [timestamps, sack3], b"", False),
        "10 bytes without psh, timestamps": (ACK, [timestamps], b"x" * 10, True),
        "1 byte without psh, no options": (ACK, [], b"y", True),
        "16 bytes without psh, sack": (ACK, [timestamps, sack3], b"z" * 16, True),
        "5 bytes with psh": (ACK | PSH, [timestamps], b"w" * 5, True),
        "1000 bytes": (ACK, [timestamps], bytes(1000), True),
    }
    c1.run(["nft", "-f", "-"], input=f"table ip {TABLE} {{\n{body}\n}}\n", check=True)
    try:
        with in_ns(c1, lambda: NflogReader.open(11)) as reader, in_ns(c1, RawTcpSender) as sender:
            for sport, (flags, options, payload, _copied) in enumerate(cases.values(), 40000):
                packet = build_ipv4_tcp(
                    str(c1.address), str(vip), sport, PORT + 5, 1000, 1, flags, 500,
                    options, payload, ip_id=sport,
                )  # fmt: skip
                sender.send(packet)
            # Copies come in sending order: once the last packet's is in, all are.
            last = 40000 + len(cases) - 1
            packets: list[NflogPacket] = []
            deadline = time.monotonic() + 5.0
            while last not in {segment_of(p).sport for p in packets}:
                assert time.monotonic() < deadline, "the last packet was not copied"
                packets += wait_packets(reader, 1, timeout_s=0.5)
    finally:
        c1.run(["nft", "delete", "table", "ip", TABLE], timeout=10)
    copied = {segment_of(p).sport for p in packets}
    for sport, (name, case) in enumerate(cases.items(), 40000):
        assert (sport in copied) == case[3], name


def test_a_barrier_sends_the_kernels_batch_of_copies_at_once(lab_factory) -> None:
    """``client_shim.capture`` lets the kernel batch its copies and flushes them with the
    rules' barrier before every decision: a copy held in a batch (here for up to a second) is
    in the reader's socket as soon as the barrier's ``sendto`` returns, and the barrier itself
    is dropped (EPERM), never sent."""
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    vip = ipaddress.ip_address(str(s1.address))
    server = Endpoint(vip, PORT + 6)
    body = rewrite_table_body(vip, PORT + 6, (server,), server, nflog_group=12)
    c1.run(["nft", "-f", "-"], input=f"table ip {TABLE} {{\n{body}\n}}\n", check=True)

    def open_batching() -> NflogReader:
        return NflogReader.open(12, qthreshold=64, flush_timeout_cs=100, nlbufsiz=65536)

    def barrier() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, BARRIER_MARK)
        return sock

    try:
        with (
            in_ns(c1, open_batching) as reader,
            in_ns(c1, RawTcpSender) as sender,
            in_ns(c1, barrier) as flusher,
        ):
            for sport in (41000, 41001, 41002):
                sender.send(
                    build_ipv4_tcp(
                        str(c1.address), str(vip), sport, PORT + 6, 1000, 1, ACK | PSH, 500,
                        [], b"request", ip_id=sport,
                    )
                )  # fmt: skip
            # Batched: nothing yet (the batch's time limit is a second).
            readable, _, _ = select.select([reader.fileno()], [], [], 0.2)
            assert not readable, "the kernel sent a copy before its batch was full or old"
            with pytest.raises(PermissionError):
                flusher.sendto(b"barrier", (str(vip), BARRIER_PORT))
            # No wait: the batch was sent inside the barrier's sendto.
            copies = [parse_ipv4_tcp(p.payload) for p in reader.read()]
    finally:
        c1.run(["nft", "delete", "table", "ip", TABLE], timeout=10)
    segments = [s for s in copies if s is not None]
    assert [s.sport for s in segments] == [41000, 41001, 41002]
    assert all(s.payload == b"request" for s in segments)
    assert len(copies) == 4  # and the barrier's own copy (UDP), last


def two_server_table(
    lab: Lab, port: int, group: int
) -> tuple[Node, Node, ipaddress.IPv4Address | ipaddress.IPv6Address, Endpoint]:
    """The client's rules in ``c1`` for two servers on s1's address, ``port`` (active) and
    ``port + 1``, copying to NFLOG ``group``: (c1, s1, the VIP, the second server)."""
    c1, s1 = lab["c1"], lab["s1"]
    vip = ipaddress.ip_address(str(s1.address))
    old, new = Endpoint(vip, port), Endpoint(vip, port + 1)
    body = rewrite_table_body(vip, port, (old, new), old, nflog_group=group)
    c1.run(["nft", "-f", "-"], input=f"table ip {TABLE} {{\n{body}\n}}\n", check=True)
    return c1, s1, vip, new


def test_a_held_syn_is_dropped_uncopied_and_the_freeze_lets_the_next_one_through(
    lab_factory,
) -> None:
    """``client_shim.rules``' SYN hold, in a real table: while a hand-over reads which
    connections the old server has, a new connection's SYN is dropped before it is copied
    (so every connection the capture knows talks to the old server); the freeze ends the hold
    and points new connections at the new server, where the SYN sent again arrives."""
    lab = lab_factory(TOPO)
    c1, s1, vip, new = two_server_table(lab, PORT + 7, 13)

    def syn(sport: int) -> bytes:
        return build_ipv4_tcp(
            str(c1.address), str(vip), sport, PORT + 7, 1000, 0, SYN, 500, [], b"", ip_id=sport
        )

    pcap = lab.workdir / "held.pcap"
    try:
        with (
            in_ns(c1, lambda: NflogReader.open(13)) as reader,
            in_ns(c1, RawTcpSender) as sender,
            s1.capture("any", pcap, bpf_filter=["tcp[13] == 2"]),
        ):
            c1.run(["nft", "-f", "-"], input=hold_script(TABLE, vip, PORT + 7), check=True)
            with pytest.raises(RawSocketError):  # held: dropped (EPERM), not copied
                sender.send(syn(42000))
            freeze = freeze_script(TABLE, vip, PORT + 7, [], new)
            c1.run(["nft", "-f", "-"], input=freeze, check=True)
            sender.send(syn(42001))  # after the freeze: copied, to the new server
            copies = wait_packets(reader, 1, timeout_s=5.0, settle_s=0.3)
    finally:
        c1.run(["nft", "delete", "table", "ip", TABLE], timeout=10)
    assert {segment_of(p).sport for p in copies} == {42001}
    # On the wire, only the second SYN, and to the new server's port.
    seen = s1.run(["tcpdump", "-r", str(pcap), "-nn"], check=True).stdout
    assert ".42000 >" not in seen, seen
    assert f".42001 > {vip}.{PORT + 8}:" in seen, seen


def test_a_connection_opened_in_the_freeze_sends_everything_to_the_new_server(
    lab_factory,
) -> None:
    """``client_shim.rules``' ``fresh`` set, in a real table: in a hand-over's freeze, a
    connection whose SYN went to the new server sends its ACK and its first request there too,
    while a connection opened before the hold still reaches the old server; the next hold
    forgets which connections were new."""
    lab = lab_factory(TOPO)
    c1, s1, vip, new = two_server_table(lab, PORT + 9, 14)

    def segment(sport: int, flags: int, payload: bytes = b"") -> bytes:
        return build_ipv4_tcp(
            str(c1.address), str(vip), sport, PORT + 9, 1000, 1, flags, 500, [], payload,
            ip_id=sport,
        )  # fmt: skip

    pcap = lab.workdir / "fresh.pcap"
    try:
        with in_ns(c1, RawTcpSender) as sender, s1.capture("any", pcap, bpf_filter=["tcp"]):
            sender.send(segment(43000, SYN))  # before the hand-over: the old server's
            c1.run(["nft", "-f", "-"], input=hold_script(TABLE, vip, PORT + 9), check=True)
            c1.run(
                ["nft", "-f", "-"], input=freeze_script(TABLE, vip, PORT + 9, [], new), check=True
            )
            sender.send(segment(43001, SYN))  # in the freeze: the new server's
            sender.send(segment(43001, ACK))
            sender.send(segment(43001, ACK | PSH, b"GET"))
            sender.send(segment(43000, ACK | PSH, b"GET"))
            # The next hand-over's hold: 43001 is an old connection now (no switch here, so
            # ``addr_out`` still names the first server: where its segments go).
            c1.run(["nft", "-f", "-"], input=hold_script(TABLE, vip, PORT + 9), check=True)
            sender.send(segment(43001, ACK | PSH, b"PUT"))
    finally:
        c1.run(["nft", "delete", "table", "ip", TABLE], timeout=10)
    seen = s1.run(["tcpdump", "-r", str(pcap), "-nn", "-A"], check=True).stdout
    lines = [line for line in seen.splitlines() if " > " in line]

    def went(sport: int, port: int) -> list[str]:
        return [line for line in lines if f".{sport} > {vip}.{port}:" in line]

    assert len(went(43001, PORT + 10)) == 3, seen  # SYN, ACK and request to the new server
    assert len(went(43000, PORT + 9)) == 2, seen  # SYN and request to the old one
    assert not went(43000, PORT + 10), seen
    assert len(went(43001, PORT + 9)) == 1, seen  # after the next hold: the old map's


@pytest.mark.parametrize("ending", ["answer", "drop"])
def test_reconnect_mode_a_connection_opened_before_a_switch_hears_its_server_to_the_end(
    lab_factory, ending: str
) -> None:
    """Reconnect mode (no capture): a connection stays with the server it opened to. A
    request sent just before a switch gets its answer from the old server after the switch,
    and a connection the old server drops (its gate closing behind the service) is reset at
    the client at once. Before, the client's rules dropped both (only the current server's
    segments passed) and the application waited for its own timeout: curl's fetch in
    test_revocation failed so, about one fetch in eighty."""
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    port = PORT + 20
    # A VIP of its own, routed and ruled as the client shim does (its daemon's ``_install``),
    # through an instance that removes both when the test ends.
    vip = list(TOPO.subnet().hosts())[-1]
    address = ipaddress.ip_address(str(s1.address))
    old, new = Endpoint(address, port), Endpoint(address, port + 1)
    with Instance.start("nflogtest", netns=c1.netns) as instance:
        instance.add_table("ip", TABLE, rewrite_table_body(vip, port, (old, new), old))
        HostRoute(instance).add_vip_route(str(vip), toward=str(s1.address))
        with connection(lab, port, to=str(vip)) as (client, server):
            client.sendall(b"GET")
            assert recv_exact(server, 3) == b"GET"
            switch = switch_script(TABLE, vip, port, new)
            c1.run(["nft", "-f", "-"], input=switch, check=True)
            client.settimeout(5)
            if ending == "answer":
                server.sendall(b"answer")
                assert recv_exact(client, 6) == b"answer"
            else:
                close_abortively(server)
                with pytest.raises(ConnectionResetError):
                    client.recv(100)
