"""Frozen segments held in an NFQUEUE (client_shim.holding) on a real kernel.

The client shim's own rules (``client_shim.rules`` with a hold mark) in ``c1``, the iptables
rule of ``migrate.kernel.xtqueue`` through an ``Instance`` (so its removal is checked too),
and a ``PacketHolder`` bound inside ``c1``. What a user relies on: a segment written during the
freeze is *sent* as far as the client's TCP knows (the drop the hold replaces left it unsent
until TCP's probe timer), and after the switch it reaches the server the rewrite names now, or
nowhere for a connection that does not follow; nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest

from client_shim.holding import FrozenHold
from client_shim.rules import freeze_script, hold_script, rewrite_table_body, switch_script
from labs import Lab, PoolTopo
from labs.node import Node
from labs.waiting import wait_for
from migrate.endpoints import Endpoint
from migrate.kernel import sockdiag
from migrate.kernel.instances import Instance, call_in_netns
from migrate.kernel.nfqueue import PacketHolder
from migrate.kernel.xtqueue import hold_mark

pytestmark = pytest.mark.system

TABLE = f"roam_q_{os.getpid()}"
TOPO = PoolTopo(servers=1, clients=1, outsiders=0)
QUEUE = 23
PORT = 7300  # the VIP's port; the old server listens on PORT + 1, the new one on PORT + 2


@contextlib.contextmanager
def client_rules(lab: Lab, *, hold: bool) -> Iterator[tuple[Endpoint, Endpoint, FrozenHold]]:
    """``c1``'s rewrite table pointed at the old server (the VIP is ``s1``'s address), the
    queue bound and the iptables rule added by an instance in ``c1``: (old, new, hold)."""
    c1, s1 = lab["c1"], lab["s1"]
    vip = ipaddress.ip_address(str(s1.address))
    old, new = Endpoint(vip, PORT + 1), Endpoint(vip, PORT + 2)
    mark = hold_mark(QUEUE) if hold else None
    body = rewrite_table_body(vip, PORT, (old, new), old, nflog_group=QUEUE, hold_mark=mark)
    holder = call_in_netns(c1.netns, lambda: PacketHolder.open(QUEUE))
    instance = Instance.start("qtest", netns=c1.netns)
    try:
        if hold:
            instance.add_xt_queue("ip", QUEUE)
        instance.add_table("ip", TABLE, body)
        yield old, new, FrozenHold(holder, hold_mark(QUEUE))
    finally:
        holder.close()
        instance.close()
    # Nothing left: the table, the rule, and the raw table iptables created for it.
    assert "table ip" not in c1.run(["nft", "list", "ruleset"], check=True).stdout
    assert "NFQUEUE" not in c1.run(["iptables-save"], check=True).stdout


def listener(host: Node, port: int) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(host.address), port))
        sock.listen()
        sock.settimeout(5)
        return sock

    return call_in_netns(host.netns, make)


def client_info(
    c1: Node, ends: tuple[tuple[str, int], tuple[str, int]]
) -> sockdiag.TcpSocketInfo | None:
    """The client socket with these (local, peer) ends as sock_diag in ``c1`` sees it (None
    once it is gone)."""
    return call_in_netns(c1.netns, lambda: sockdiag.lookup(*ends))


FROZEN_WRITE = b"written in the freeze"


def handled(info: sockdiag.TcpSocketInfo | None) -> sockdiag.TcpSocketInfo | None:
    """``info`` once the write is either in flight (sent) or left unsent (a send failure)."""
    return info if info is not None and (info.unacked or info.notsent_bytes) else None


def frozen_write(lab: Lab, *, hold: bool, follows: bool) -> tuple[sockdiag.TcpSocketInfo, str]:
    """Connect through the VIP to the old server, freeze the connection, write during the
    freeze, switch to the new server, and release the held segments (dropped for a connection
    that does not ``follow``). Returns the client socket in the freeze and what ``s1`` saw
    arrive at the new server's port."""
    c1, s1 = lab["c1"], lab["s1"]
    pcap = lab.workdir / f"held-{hold}-{follows}.pcap"
    with (
        client_rules(lab, hold=hold) as (old, new, frozen),
        listener(s1, PORT + 1) as old_listener,
        listener(s1, PORT + 2),
    ):
        address = str(s1.address)
        client = call_in_netns(c1.netns, lambda: socket.create_connection((address, PORT), 5))
        with client, old_listener.accept()[0] as server:
            server.settimeout(5)
            client.sendall(b"before")
            assert server.recv(100) == b"before"
            port = client.getsockname()[1]
            ends = ((str(c1.address), port), (address, PORT))
            with s1.capture("any", pcap, bpf_filter=[f"tcp dst port {PORT + 2}"]):
                freeze = freeze_script(TABLE, old.address, PORT, [port], new)
                c1.run(["nft", "-f", "-"], input=freeze, check=True)
                client.sendall(FROZEN_WRITE)
                # Either sent (in flight, unacknowledged) or failed (not sent).
                info = wait_for(
                    "the write in the freeze handled",
                    lambda: handled(client_info(c1, ends)),
                    5,
                )
                # A connection that does not follow is ``finished`` in the switch (as the
                # migrator does): its later segments are dropped before they are copied; the
                # held ones, past that rule already, by the release.
                switch = switch_script(TABLE, old.address, PORT, new, [] if follows else [port])
                c1.run(["nft", "-f", "-"], input=switch, check=True)
                if hold:
                    assert frozen.release(set() if follows else {port}) == (
                        (1, 0) if follows else (0, 1)
                    )
                if hold and not follows:
                    # Until the client's TCP has sent it again (its retransmission timer), and
                    # that copy was dropped too.
                    wait_for(
                        "the client's retransmission",
                        lambda: (i := client_info(c1, ends)) is not None and i.total_retrans > 0,
                        10,
                    )
                if follows:
                    # The new server has no socket for it: its listener answers with a RST,
                    # the sign that the segment arrived there.
                    wait_for("the new server's RST", lambda: client_info(c1, ends) is None, 5)
    seen = s1.run(["tcpdump", "-r", str(pcap), "-nn", "-A"], check=True).stdout
    return info, seen


def test_a_write_in_the_freeze_is_sent_as_far_as_tcp_knows_and_goes_to_the_new_server(
    lab_factory,
) -> None:
    info, seen = frozen_write(lab_factory(TOPO), hold=True, follows=True)
    # Sent: in flight, nothing left unsent (no wait for TCP's probe timer).
    assert (info.unacked, info.notsent_bytes) == (1, 0)
    assert FROZEN_WRITE.decode() in seen, seen


def test_held_segments_of_a_connection_that_does_not_follow_reach_no_server(
    lab_factory,
) -> None:
    info, seen = frozen_write(lab_factory(TOPO), hold=True, follows=False)
    assert (info.unacked, info.notsent_bytes) == (1, 0)
    assert FROZEN_WRITE.decode() not in seen, seen


def test_without_the_hold_a_write_in_the_freeze_stays_unsent(lab_factory) -> None:
    """Why the hold exists: the freeze's drop is a local send failure, and TCP keeps the bytes
    unsent (it tries again only at its probe timer, 200 ms or more later)."""
    info, _seen = frozen_write(lab_factory(TOPO), hold=False, follows=False)
    assert (info.unacked, info.notsent_bytes) == (0, len(FROZEN_WRITE))


def test_a_syn_in_the_hold_waits_in_the_queue_and_opens_its_connection_with_the_new_server(
    lab_factory,
) -> None:
    """A connection opened while a hand-over holds new SYNs (between its last drain and the
    freeze): its SYN is held with the frozen segments, copied by nothing else here, and after
    the freeze and the switch it goes to the new server, where the handshake completes with
    that very SYN: the client's TCP never sent it again (the drop it replaces cost a second)."""
    lab = lab_factory(TOPO)
    c1, s1 = lab["c1"], lab["s1"]
    with (
        client_rules(lab, hold=True) as (old, new, frozen),
        listener(s1, PORT + 1) as old_listener,
        listener(s1, PORT + 2) as new_listener,
    ):
        address = str(s1.address)
        c1.run(["nft", "-f", "-"], input=hold_script(TABLE, old.address, PORT), check=True)
        client = call_in_netns(c1.netns, socket.socket)
        with client:
            client.setblocking(False)
            # The SYN is queued inside this call (the output path runs in it).
            assert client.connect_ex((address, PORT)) == errno.EINPROGRESS
            port = client.getsockname()[1]
            ends = ((str(c1.address), port), (address, PORT))
            held = client_info(c1, ends)
            assert held is not None
            assert held.state == "SYN_SENT", held
            freeze = freeze_script(TABLE, old.address, PORT, [], new)
            c1.run(["nft", "-f", "-"], input=freeze, check=True)
            switch = switch_script(TABLE, old.address, PORT, new)
            c1.run(["nft", "-f", "-"], input=switch, check=True)
            assert frozen.release(set()) == (1, 0)
            accepted, _peer = new_listener.accept()
            with accepted:
                info = wait_for(
                    "the handshake with the new server",
                    lambda: (
                        (i := client_info(c1, ends)) is not None and i.state == "ESTABLISHED" and i
                    ),
                    5,
                )
                assert info.total_retrans == 0, info  # the held SYN itself, not a second one
                client.sendall(b"first request")
                accepted.settimeout(5)
                assert accepted.recv(100) == b"first request"
            old_listener.settimeout(0)
            with pytest.raises(BlockingIOError):
                old_listener.accept()  # the old server never saw it
