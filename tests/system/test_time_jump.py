"""Time as it passes, with the real shims: a client silent for hours, then everyone's clock
jumped by them (the hidden ``--clock-offset`` hook), issue 12.

The client shim keeps its replay windows' counters across restarts, and counters are
microseconds: after six hours of silence its first update arrives with a counter 2.16e10
above the last. Nothing may block on that (the client accepts updates at the servers' period,
the servers keep their epochs' cadence, a request through the VIP is answered), and an update
captured before the silence, replayed after it, is refused with a logged reason.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from labs.clients import send_datagrams
from labs.faults import live_lab, shim_problems, start_client
from labs.waiting import wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

JUMP_S = 6 * 3600.0
ROAMING_PORT = 47474
WAIT_S = 30.0


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")


def events(shim: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in shim.events() if e["event"] == name]


def udp_payloads(pcap: Path, port: int) -> list[bytes]:
    """UDP payloads to ``port`` in a pcap of ``any`` (Linux cooked) or Ethernet frames."""
    data = pcap.read_bytes()
    link = struct.unpack_from("<I", data, 20)[0]
    link_header = {1: 14, 113: 16, 276: 20}[link]
    payloads, offset = [], 24
    while offset + 16 <= len(data):
        included = struct.unpack_from("<I", data, offset + 8)[0]
        frame = data[offset + 16 : offset + 16 + included]
        offset += 16 + included
        ip = frame[link_header:]
        if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        udp = ip[(ip[0] & 0x0F) * 4 :]
        if struct.unpack_from("!H", udp, 2)[0] == port:
            payloads.append(bytes(udp[8:]))
    return payloads


def server_epochs(roaming: Any, host: str) -> list[float]:
    return [e["ts"] for e in events(roaming.servers[host], "epoch")]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_a_client_silent_for_hours_blocks_nothing_and_nothing_is_accepted_twice() -> None:
    with live_lab(tick=1.0, m=1, update_period=1.0) as roaming:
        roaming.start()
        roaming.wait_for_schedule(0.3)
        client = roaming.clients["c1"]
        c1 = roaming.lab["c1"]

        # An eavesdropper on the client's link captures a few authentic updates.
        pcap = roaming.workdir / "updates.pcap"
        with c1.capture("any", pcap, bpf_filter=["udp", "dst", "port", str(ROAMING_PORT)]):
            seen = len(events(client, "update_accepted"))
            wait_for(
                "three updates on the wire",
                lambda: len(events(client, "update_accepted")) >= seen + 3,
                WAIT_S,
            )
        captured = udp_payloads(pcap, ROAMING_PORT)
        assert captured, f"no roaming update was captured ({pcap.stat().st_size} bytes of pcap)"

        # Silence: the client shim stops; the servers stop; six hours pass for everyone.
        client.stop(signal.SIGTERM)
        for host in roaming.server_hosts:
            roaming.servers[host].stop(signal.SIGTERM)
        for host in roaming.server_hosts:
            roaming.start_server(host, "--clock-offset", str(JUMP_S))
        start_client(roaming, "c1", "--clock-offset", str(JUMP_S))
        roaming.wait_ready()
        client = roaming.clients["c1"]

        # Nothing blocks: updates are accepted at the servers' period from the first one on
        # (its counter is 2.16e10 above the last the client kept), and the servers' epochs go on.
        accepted = wait_for(
            "eight updates after the jump",
            lambda: (
                len(events(client, "update_accepted")) >= 8 and events(client, "update_accepted")
            ),
            WAIT_S,
        )
        update_gaps = gaps([e["ts"] for e in accepted[:8]])
        print(f"update intervals after the jump: {[round(g, 3) for g in update_gaps]} s")
        assert max(update_gaps) < 3 * roaming.update_period, update_gaps
        for host in roaming.server_hosts:
            # Epochs last 1-2 s: eight updates (three servers sending every second) may come
            # within one, so wait for three epochs (bounded) rather than count on them.
            epochs = wait_for(
                f"three epochs of server {host} after the jump",
                lambda host=host: server_epochs(roaming, host)[2:] and server_epochs(roaming, host),
                WAIT_S,
            )
            longest = max(gaps(epochs))
            print(f"{host}: longest pause between epochs after the jump {longest:.3f} s")
            # Epochs last 1 to 2 ticks; a stalled loop would show as a longer pause.
            assert longest < 2 * roaming.tick + 1.0, gaps(epochs)
        answer = c1.run(["curl", "-s", "--max-time", "10", roaming.url("/whoami")], timeout=20)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout in roaming.server_hosts

        # Nothing is accepted twice: each captured update, replayed now, is refused: counted in
        # the client's status, and logged bounded (the first of each error class per minute in
        # full, migrate.ratelog), never accepted.
        def rejected_count() -> int:
            return int(json.loads(client.status_path.read_text())["updates_rejected"])

        before = rejected_count()
        replayed_at = time.time()
        sender = roaming.server_hosts[0]
        for payload in captured:
            send_datagrams(roaming.lab[sender], str(c1.address), ROAMING_PORT, [payload])
        wait_for(
            "the replayed updates' rejections",
            lambda: rejected_count() >= before + len(captured),
            WAIT_S,
        )
        rejected = [e for e in events(client, "update_rejected") if e["ts"] >= replayed_at]
        reasons = {e["error"] for e in rejected}
        print(f"replayed captured updates refused: {rejected_count() - before}, {sorted(reasons)}")
        assert reasons <= {"ReplayedMessageError", "ReorderedMessageError", "StaleMessageError"}
        assert len(events(client, "update_accepted")) >= len(accepted)
        assert shim_problems(roaming) == []
