"""sock_diag adapter on live connections in a lab: tcp_info counters match the traffic, and
SOCK_DESTROY aborts the owning process's blocking recv with ECONNABORTED.

Topology: ``PoolTopo(servers=1, clients=1, outsiders=0)``; sockets are made inside the lab's
namespaces with ``call_in_netns``, or by a helper process started with ``lab["c1"].popen``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from client_shim.connections import DUMPED_STATES
from labs import Lab, PoolTopo
from labs.node import Node
from labs.waiting import wait_for
from migrate.kernel import sockdiag
from migrate.kernel.instances import call_in_netns
from migrate.kernel.tcp_repair import read_tcp_info

pytestmark = pytest.mark.system

TOPO = PoolTopo(servers=1, clients=1, outsiders=0)
PORT = 7200
T = TypeVar("T")


def in_ns(host: Node, function: Callable[[], T]) -> T:
    return call_in_netns(host.netns, function)


def listen(host: Node, port: int) -> socket.socket:
    def make() -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((str(host.address), port))
        listener.listen()
        listener.settimeout(5)
        return listener

    return in_ns(host, make)


@contextlib.contextmanager
def connection(lab: Lab, port: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    server_ip = str(lab["s1"].address)
    with listen(lab["s1"], port) as listener:
        client = in_ns(lab["c1"], lambda: socket.create_connection((server_ip, port), timeout=5))
        server, _ = listener.accept()
    with client, server:
        server.settimeout(5)
        yield client, server


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 16))
        assert chunk, "connection closed early"
        data += chunk
    return bytes(data)


def test_counters_match_the_traffic(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    up, down = 300_000, 123_457
    with connection(lab, PORT) as (client, server):
        client_addr = client.getsockname()
        server_addr = (str(s1.address), PORT)
        client.sendall(os.urandom(up))
        recv_exact(server, up)
        server.sendall(os.urandom(down))
        recv_exact(client, down)

        def client_view() -> sockdiag.TcpSocketInfo:
            found = in_ns(c1, lambda: sockdiag.tcp_sockets(dst=server_addr))
            assert len(found) == 1
            return found[0]

        # the connecting side counts its SYN in bytes_acked (docs/tcp_repair.md)
        wait_for("the server to ack the upload", lambda: client_view().bytes_acked == up + 1, 3.0)
        info = client_view()
        assert info.src == client_addr
        assert info.dst == server_addr
        assert info.state == "ESTABLISHED"
        assert info.family == socket.AF_INET
        assert info.has_info
        assert info.inode == os.fstat(client.fileno()).st_ino
        assert info.uid == os.getuid()
        assert info.bytes_received == down
        assert info.bytes_sent == up
        assert info.unacked == 0
        assert info.retrans == 0
        assert info.segs_out > 0
        assert info.segs_in > 0
        assert info.snd_cwnd > 0
        assert info.rtt_us > 0
        assert info.timestamps
        assert info.sack
        assert info.wscale
        # the same fields as the owner's getsockopt(TCP_INFO)
        own = read_tcp_info(client)
        assert (info.snd_wscale, info.rcv_wscale) == (own.snd_wscale, own.rcv_wscale)
        assert info.options == own.options
        assert info.snd_mss == own.snd_mss
        assert info.advmss == own.advmss
        assert info.bytes_acked == own.bytes_acked
        assert info.bytes_received == own.bytes_received

        def server_view() -> sockdiag.TcpSocketInfo:
            found = in_ns(s1, lambda: sockdiag.tcp_sockets(src_port=PORT))
            assert len(found) == 1  # the listener is closed
            return found[0]

        # the accepting side does not count the client's SYN
        wait_for("the client to ack the download", lambda: server_view().bytes_acked == down, 3.0)
        theirs = server_view()
        assert theirs.dst == client_addr
        assert theirs.bytes_received == up
        assert theirs.bytes_sent == down
        assert theirs.inode == os.fstat(server.fileno()).st_ino

        # filters and exact lookup
        assert in_ns(c1, lambda: sockdiag.tcp_sockets(dst=(server_addr[0], 1))) == []
        assert in_ns(c1, lambda: sockdiag.tcp_sockets(src_port=client_addr[1]))[0].inode == (
            info.inode
        )
        found = in_ns(c1, lambda: sockdiag.lookup(client_addr, server_addr))
        assert found is not None
        assert found.inode == info.inode
        assert found.bytes_received == down


OWNER = textwrap.dedent(
    """
    import errno, socket, sys
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    print(sock.getsockname()[1], flush=True)
    try:
        data = sock.recv(100)
        print("data", data, flush=True)
    except OSError as error:
        print(errno.errorcode.get(error.errno, error.errno), flush=True)
    """
)


def test_destroy_aborts_the_owners_blocking_recv(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    server_addr = (str(s1.address), PORT + 1)
    with listen(s1, PORT + 1) as listener:
        owner = c1.popen(
            [sys.executable, "-c", OWNER, *map(str, server_addr)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert owner.stdout is not None
            client_port = int(owner.stdout.readline())
            server, _ = listener.accept()
            with server:
                client_addr = (str(c1.address), client_port)
                time.sleep(0.2)  # the owner is now blocked in recv()
                assert in_ns(c1, lambda: sockdiag.destroy(client_addr, server_addr))
                assert owner.stdout.readline().strip() == "ECONNABORTED"
                assert owner.wait(5) == 0
                # the kernel answers for the aborted socket with a RST to the peer
                server.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    server.recv(10)
            assert in_ns(c1, lambda: sockdiag.tcp_sockets(dst=server_addr)) == []
            assert not in_ns(c1, lambda: sockdiag.destroy(client_addr, server_addr))

            # A tuple with no connection, towards a listening port: the kernel's own lookup
            # would fall back to the listener and destroy it; ours does not.
            assert not in_ns(s1, lambda: sockdiag.destroy(server_addr, ("10.9.9.9", 1)))
            assert in_ns(s1, lambda: sockdiag.lookup(server_addr, ("10.9.9.9", 1))) is None
            listening = in_ns(s1, lambda: sockdiag.tcp_sockets(states=sockdiag.TCPF_LISTEN))
            assert [(s.src, s.state) for s in listening] == [(server_addr, "LISTEN")]
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait(5)


def test_ipv4_mapped_sockets_are_reported_and_destroyed(lab_factory) -> None:
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    server_addr = (str(s1.address), PORT + 2)
    with listen(s1, PORT + 2) as listener:

        def connect() -> socket.socket:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect((f"::ffff:{server_addr[0]}", server_addr[1]))
            return sock

        client = in_ns(c1, connect)
        server, _ = listener.accept()
        with client, server:
            client.sendall(b"12345")
            assert recv_exact(server, 5) == b"12345"
            local_port = client.getsockname()[1]
            wait_for(
                "the five bytes acked",
                lambda: in_ns(c1, lambda: sockdiag.tcp_sockets(dst=server_addr))[0].unacked == 0,
                3.0,
            )
            [info] = in_ns(c1, lambda: sockdiag.tcp_sockets(dst=server_addr))
            assert info.family == socket.AF_INET6
            assert info.src == (str(c1.address), local_port)
            assert info.bytes_acked == 6
            assert (
                in_ns(c1, lambda: sockdiag.tcp_sockets(dst=server_addr, include_mapped=False)) == []
            )
            assert in_ns(c1, lambda: sockdiag.destroy(info.src, server_addr))
            with pytest.raises(ConnectionAbortedError):
                client.recv(10)


def test_a_dump_for_one_destination_is_filtered_by_the_kernel(lab_factory) -> None:
    """The kernel runs the destination filter: only the sockets whose remote end is exactly
    the address and port asked for come back, IPv4 and IPv4-mapped alike; not those to
    another port of the same address, nor the listener, nor the server's own ends."""
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    server_ip = str(s1.address)
    with listen(s1, PORT + 3) as wanted, listen(s1, PORT + 4) as other:

        def connect(family: int, port: int) -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(5)
            host = server_ip if family == socket.AF_INET else f"::ffff:{server_ip}"
            sock.connect((host, port))
            return sock

        clients = [
            in_ns(c1, lambda f=family, p=port: connect(f, p))
            for family in (socket.AF_INET, socket.AF_INET6)
            for port in (PORT + 3, PORT + 4)
        ]
        accepted = [wanted.accept()[0], wanted.accept()[0], other.accept()[0], other.accept()[0]]
        try:
            expected = {
                (sock.family, sock.getsockname()[1])
                for sock in clients
                if sock.getpeername()[1] == PORT + 3
            }
            found = in_ns(c1, lambda: sockdiag.tcp_sockets(dst=(server_ip, PORT + 3)))
            assert {(info.family, info.src[1]) for info in found} == expected
            assert all(info.dst == (server_ip, PORT + 3) for info in found)
            everything = in_ns(c1, sockdiag.tcp_sockets)
            assert len(everything) == len(clients)  # the filter, not an empty namespace
            assert in_ns(s1, lambda: sockdiag.tcp_sockets(dst=(server_ip, PORT + 3))) == []
        finally:
            for sock in clients + accepted:
                sock.close()


def test_a_dump_without_time_wait_leaves_the_connections_the_client_closed_first(
    lab_factory,
) -> None:
    """The client shim's dumps (``client_shim.connections.DUMPED_STATES``): a connection the
    client closed first stays in TIME_WAIT for a minute, and the kernel leaves it out of the
    dump, while the same dump still lists an established connection to the same place."""
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    server_ip = str(s1.address)
    dst = (server_ip, PORT + 5)
    with connection(lab, PORT + 5) as (closed, its_server), connection(lab, PORT + 5) as (live, _):
        closed.close()  # the client's FIN first, then the server's: TIME_WAIT on the client
        assert its_server.recv(10) == b""
        its_server.close()
        port = live.getsockname()[1]

        def states(mask: int) -> dict[int, str]:
            return {info.src[1]: info.state for info in sockdiag.tcp_sockets(dst=dst, states=mask)}

        every = wait_for(
            "the closed connection in TIME_WAIT",
            lambda: (
                found
                if "TIME_WAIT" in (found := in_ns(c1, lambda: states(sockdiag.TCPF_ALL))).values()
                else None
            ),
            5,
        )
        assert sorted(every.values()) == ["ESTABLISHED", "TIME_WAIT"]
        assert in_ns(c1, lambda: states(DUMPED_STATES)) == {port: "ESTABLISHED"}
