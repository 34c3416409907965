"""``proxy.checkpoints.accept_facts``, the lean read of a new connection's handshake facts on
the relay's setup path, against the whole ``tcp_repair.read_snapshot`` it replaced."""

from __future__ import annotations

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
