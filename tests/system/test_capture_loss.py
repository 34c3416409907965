"""A capture loss on the client costs only the connections it touched (issue 14).

Real processes: ``roam server --migration live`` in front of nginx on three server hosts,
``roam client`` on c1, python's http.client as the application. The client shim's NFLOG socket
is made to overflow for real: the shim is stopped (SIGSTOP, by pid) while a local process
floods the capture chain with segments to the VIP, until the kernel counts drops on the
shim's netlink socket; then it runs again. The copies it lost belonged to no connection of the
client's; a keep-alive connection open all along must still follow the next roam.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from labs.faults import live_lab, shim_problems
from labs.roaming import LISTEN_PORT, RoamingLab
from labs.waiting import wait_for
from migrate.kernel.instances import call_in_netns
from migrate.kernel.rawtcp import ACK, RawTcpSender, build_ipv4_tcp

pytestmark = [pytest.mark.system, pytest.mark.slow]

NETLINK_NETFILTER = 12
FLOOD_BATCH = 2000
FLOOD_MAX = 200_000  # packets: bounds the flood whatever the socket's buffer
WAIT_S = 30.0

# A keep-alive client: one GET, prints its port, waits for a line on stdin, GETs again on the
# same connection and prints the outcome.
HOLDER = r"""
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=20)
def get():
    conn.request("GET", "/small")
    response = conn.getresponse()
    return response.status, len(response.read())
first = get()
port = conn.sock.getsockname()[1]
print(json.dumps({"port": port, "first": first}), flush=True)
sys.stdin.readline()
try:
    second, error = get(), ""
except Exception as exc:
    second, error = None, repr(exc)
same = conn.sock is not None and conn.sock.getsockname()[1] == port
print(json.dumps({"second": second, "error": error, "same_port": same}), flush=True)
"""


def netfilter_socket_drops(pool: RoamingLab) -> int:
    """Drops the kernel counted on c1's NETLINK_NETFILTER sockets (the shim's NFLOG reader)."""
    text = pool.lab["c1"].run(["cat", "/proc/net/netlink"], check=True).stdout
    rows = [line.split() for line in text.splitlines()[1:] if line.strip()]
    return sum(int(row[8]) for row in rows if int(row[1]) == NETLINK_NETFILTER)


def events_named(pool: RoamingLab, name: str) -> list[dict[str, object]]:
    return [e for e in pool.clients["c1"].events() if e["event"] == name]


def overflow_the_capture(pool: RoamingLab) -> int:
    """Stop the client shim, flood its capture chain with segments to the VIP from ports no
    connection uses until its NFLOG socket drops copies, let it run again; returns the
    packets sent."""
    client = pool.lab["c1"]
    shim = pool.clients["c1"].process
    sender = call_in_netns(client.netns, RawTcpSender)
    before = netfilter_socket_drops(pool)
    sent = 0
    os.kill(shim.pid, signal.SIGSTOP)
    try:
        while netfilter_socket_drops(pool) == before:
            assert sent < FLOOD_MAX, "the capture's socket never overflowed"
            for index in range(FLOOD_BATCH):
                packet = build_ipv4_tcp(
                    str(client.address), str(pool.vip), 1000 + index % 500, LISTEN_PORT,
                    sent + index, 1, ACK, 500, [], bytes(1400), ip_id=1 + index,
                )  # fmt: skip
                sender.send(packet)
            sent += FLOOD_BATCH
    finally:
        os.kill(shim.pid, signal.SIGCONT)
        sender.close()
    return sent


def test_an_nflog_overflow_costs_no_connection_whose_stream_is_whole() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    content = {"small": os.urandom(20_000)}
    with live_lab(tick=3.0, m=1, service="nginx", content=content, min_switches=4,
                  switch_window=40.0) as pool:  # fmt: skip
        pool.start()
        pool.wait_for_schedule(0.2)
        holder = pool.lab["c1"].popen(
            [sys.executable, "-c", HOLDER, str(pool.vip), str(LISTEN_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdin is not None
            opened = json.loads(holder.stdout.readline())
            assert opened["first"] == [200, 20_000], opened
            port = opened["port"]
            # Right after a roam: the next is seconds away, the shim can pause meanwhile.
            switches = len(events_named(pool, "switch"))
            wait_for("a roam", lambda: len(events_named(pool, "switch")) > switches, WAIT_S)
            sent = overflow_the_capture(pool)
            lost = wait_for(
                "the loss logged", lambda: events_named(pool, "capture_lost_packets"), WAIT_S
            )
            lost_at = float(str(lost[0]["ts"]))
            # The next roam after the loss: the holder's connection must follow it.
            moved = wait_for(
                "the holder's next hand-over",
                lambda: [
                    e
                    for e in events_named(pool, "handoff")
                    if e["port"] == port and float(str(e["ts"])) > lost_at
                ],
                WAIT_S,
            )
            holder.stdin.write("go\n")
            holder.stdin.flush()
            after = json.loads(holder.stdout.readline())
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=10)
        touched = [e for e in events_named(pool, "capture_loss") if e["port"] == port]
        status = json.loads(pool.clients["c1"].status_path.read_text())
        pool.stop()
        problems = shim_problems(pool)
    detail = f"{sent} packets flooded, loss {lost[0]}, hand-over {moved[0]}, status {status}"
    assert moved[0]["outcome"] == "migrated", detail
    assert after == {"second": [200, 20_000], "error": "", "same_port": True}, detail
    assert touched == [], detail
    assert status["live"]["capture_losses"] == 0, detail
    assert problems == []
