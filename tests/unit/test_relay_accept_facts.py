"""``proxy.checkpoints.accept_facts``, the lean read of a new connection's handshake facts on
the relay's setup path, against the whole ``tcp_repair.read_snapshot`` it replaced."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from migrate.checkpoint import TcpSnapshot
from migrate.kernel import tcp_repair
from proxy.checkpoints import SEQ_MOD, accept_facts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="TCP_REPAIR needs CAP_NET_ADMIN")


def facts_from_snapshot(sock: socket.socket) -> TcpSnapshot:
    """What accept_facts computed before: the whole snapshot, queues copied."""
    try:
        state, queues = tcp_repair.read_snapshot(sock)
    finally:
        tcp_repair.leave_repair(sock)
    return TcpSnapshot(
        server_isn=(state.send_seq - 1 - len(queues.send)) % SEQ_MOD,
        client_isn=(state.recv_seq - 1 - len(queues.recv)) % SEQ_MOD,
        mss=state.mss,
        snd_wscale=state.snd_wscale,
        rcv_wscale=state.rcv_wscale,
        sack=state.sack,
        timestamps=state.timestamps,
        ts_val=0,
    )


@pytest.mark.parametrize("request_bytes", [0, 100, 70_000])
@pytest.mark.parametrize("mss", [None, 1200])
def test_accept_facts_equal_those_of_a_whole_snapshot(request_bytes: int, mss: int | None) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        if mss is not None:
            client.setsockopt(socket.SOL_TCP, socket.TCP_MAXSEG, mss)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            client.setblocking(False)
            sent = 0
            while sent < request_bytes:  # the first request, already queued at accept
                try:
                    sent += client.send(os.urandom(request_bytes - sent))
                except BlockingIOError:
                    break
            facts = accept_facts(server)
            assert facts == facts_from_snapshot(server)
            # Out of repair mode: the connection carries on.
            server.sendall(b"answer")
            client.setblocking(True)
            assert client.recv(6) == b"answer"
            if sent:
                assert len(server.recv(sent)) > 0
            assert not tcp_repair._in_repair(server)


def connected_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the peer closed"
        data += chunk
    return data


@pytest.mark.parametrize("exchanges", [1, 3])
def test_facts_read_later_from_the_relays_counts_equal_those_read_at_accept(
    exchanges: int,
) -> None:
    """A copying relay reads a connection's facts at its first checkpoint, after requests and
    answers went through: the bytes it read and wrote since say what the sequence numbers
    moved by, whatever the client has acknowledged or still has queued."""
    with socket.socket() as listener:
        client, server = connected_pair(listener)
        with client, server:
            at_accept = accept_facts(server)
            read = written = 0
            for number in range(exchanges):
                client.sendall(os.urandom(100 + number))
                read += len(receive_exactly(server, 100 + number))
                server.sendall(os.urandom(70_000))  # more than a window's first flight
                written += 70_000
                receive_exactly(client, 70_000)
            client.sendall(b"next request")  # queued, not read yet
            server.settimeout(5)
            assert server.recv(4, socket.MSG_PEEK) == b"next"
            assert accept_facts(server, read=read, written=written) == at_accept
            assert accept_facts(server, read=read + 1, written=written) != at_accept


def test_the_facts_of_a_connection_the_client_half_closed_are_not_read() -> None:
    """Its FIN moved the receive sequence: no ISN can be told from it any more (the relay then
    stops checkpointing the connection, which is ending)."""
    with socket.socket() as listener:
        client, server = connected_pair(listener)
        with client, server:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            server.settimeout(5)
            assert receive_exactly(server, 7) == b"request"
            assert server.recv(1) == b""  # the FIN is in
            with pytest.raises(tcp_repair.TcpRepairError) as refused:
                accept_facts(server, read=7)
            assert refused.value.errno == errno.ENOTCONN
            assert not tcp_repair._in_repair(server)
