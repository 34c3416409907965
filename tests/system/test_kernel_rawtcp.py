"""Raw TCP segments against a real kernel: a handshake made by hand with ``build_ipv4_tcp`` and
``RawTcpSender`` opens a connection to a real listener, whose answers ``parse_ipv4_tcp`` reads
(through NFLOG); the kernel accepts our checksums and rejects a corrupted one.

Topology: ``PoolTopo(servers=1, clients=1, outsiders=0)``. ``c1`` sends raw segments; its table
``roam_t_<pid>`` copies and drops the server's answers before ``c1``'s own TCP (which has no
socket for them and would answer with RST) sees them.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from labs import PoolTopo
from labs.node import Node
from migrate.kernel.instances import call_in_netns
from migrate.kernel.nflog import NflogReader
from migrate.kernel.rawtcp import (
    ACK,
    PSH,
    SYN,
    RawTcpSender,
    TcpSegment,
    build_ipv4_tcp,
    parse_ipv4_tcp,
)

pytestmark = pytest.mark.system

TABLE = f"roam_t_{os.getpid()}"
TOPO = PoolTopo(servers=1, clients=1, outsiders=0)
PORT = 7300
CLIENT_PORT = 45000
T = TypeVar("T")


def in_ns(host: Node, function: Callable[[], T]) -> T:
    return call_in_netns(host.netns, function)


@contextlib.contextmanager
def nft_table(host: Node, chains: str) -> Iterator[None]:
    host.run(["nft", "-f", "-"], input=f"table ip {TABLE} {{\n{chains}\n}}\n", check=True)
    try:
        yield
    finally:
        host.run(["nft", "delete", "table", "ip", TABLE], timeout=10)


def tcp_mib(host: Node) -> dict[str, int]:
    def read() -> dict[str, int]:
        with open("/proc/thread-self/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}

    return in_ns(host, read)


def next_segment(reader: NflogReader, timeout_s: float = 3.0) -> TcpSegment:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        select.select([reader.fileno()], [], [], 0.05)
        for packet in reader.read():
            segment = parse_ipv4_tcp(packet.payload)
            assert segment is not None
            return segment
    raise AssertionError("no segment arrived")


def test_a_handshake_made_by_hand_reaches_a_real_listener(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    client_ip, server_ip = str(c1.address), str(s1.address)
    chains = f"""
    chain pre {{
        type filter hook prerouting priority -300;
        ip saddr {server_ip} tcp sport {PORT} tcp dport {CLIENT_PORT} log group 5 drop
    }}
    """

    def listen() -> socket.socket:
        listener = socket.socket()
        listener.bind((server_ip, PORT))
        listener.listen()
        listener.settimeout(5)
        return listener

    def segment(
        seq: int, ack: int, flags: int, options: list[tuple[int, bytes]], data: bytes
    ) -> bytes:
        return build_ipv4_tcp(
            client_ip, server_ip, CLIENT_PORT, PORT, seq, ack, flags, 64240, options, data,
            ip_id=0x4242,
        )  # fmt: skip

    isn = 0xFFFFFFF0  # wraps during the exchange
    with (
        nft_table(c1, chains),
        in_ns(c1, lambda: NflogReader.open(5)) as answers,
        in_ns(c1, RawTcpSender) as sender,
        in_ns(s1, listen) as listener,
    ):
        sender.send(segment(isn, 0, SYN, [(2, (1400).to_bytes(2, "big")), (4, b"")], b""))
        syn_ack = next_segment(answers)
        assert syn_ack.syn
        assert syn_ack.ack_flag
        assert syn_ack.ack == (isn + 1) % 2**32
        assert syn_ack.mss is not None
        assert syn_ack.option(4) == b""  # SACK permitted, as we offered
        assert (syn_ack.src, syn_ack.sport, syn_ack.dst, syn_ack.dport) == (
            server_ip, PORT, client_ip, CLIENT_PORT,
        )  # fmt: skip

        request = b"hello from a raw socket"
        server_next = syn_ack.seq_end
        sender.send(segment((isn + 1) % 2**32, server_next, ACK | PSH, [], request))
        server, peer = listener.accept()
        with server:
            assert peer == (client_ip, CLIENT_PORT)
            server.settimeout(5)
            assert server.recv(100) == request
            server.sendall(b"answer")
            reply = next_segment(answers)
            while not reply.payload:  # a pure ACK may come first
                reply = next_segment(answers)
            assert reply.payload == b"answer"
            assert reply.seq == server_next
            assert reply.ack == (isn + 1 + len(request)) % 2**32
            assert answers.overflowed == 0


def test_the_kernel_checks_our_checksums(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    src, dst = str(c1.address), str(s1.address)
    syn = bytearray(build_ipv4_tcp(src, dst, CLIENT_PORT, PORT, 1, 0, SYN, 1000, [], b"", ip_id=1))
    before = tcp_mib(s1)
    with in_ns(c1, RawTcpSender) as sender:
        sender.send(bytes(syn))  # no listener: answered with RST, no checksum error
        syn[36] ^= 0xFF  # corrupt the TCP checksum
        sender.send(bytes(syn))
    time.sleep(0.2)
    after = tcp_mib(s1)
    assert after["InCsumErrors"] == before["InCsumErrors"] + 1
    assert after["OutRsts"] == before["OutRsts"] + 1
    assert after["InSegs"] >= before["InSegs"] + 1


def test_raw_sender_without_cap_net_raw_says_so() -> None:
    code = (
        "from migrate.kernel.rawtcp import RawTcpSender, RawSocketError\n"
        "try:\n    RawTcpSender()\nexcept RawSocketError as e:\n    print(e.strerror)\n"
    )
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "raw IPv4 sockets need CAP_NET_RAW (run the shim as root)"
