"""Who the gate lets in, as time passes and as outsiders spoof (issue 12, findings 2 and 4).

* A client subscribed until a near epoch finds the active server by probing every server's
  service port directly while its subscription runs, and finds none once it has expired: the
  gates' sets of admissible addresses follow the epochs, not only the start of the shims.
* An outsider spoofing a contracted client's address floods every server for two epochs with
  SYNs, ACKs and data segments far over the client's contract: the client is neither struck
  nor revoked (only traffic of connections it really holds counts), and its downloads,
  through the roams, all complete intact.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from labs import Lab, PoolTopo
from labs.attacks import (
    attacker_cpu,
    count_service_packets,
    finish_timed_gets,
    source_traffic,
    start_timed_gets,
)
from labs.faults import live_lab, reaped
from labs.roaming import RoamingLab

pytestmark = pytest.mark.system


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")


@contextmanager
def pool(**options: Any) -> Iterator[RoamingLab]:
    lab = Lab(PoolTopo(servers=2, clients=1, outsiders=1)).start()
    try:
        roaming = RoamingLab(lab, **options)
        try:
            yield roaming
        finally:
            roaming.stop()
    finally:
        lab.close()


def events(roaming: RoamingLab, name: str) -> list[dict[str, Any]]:
    return [e for s in roaming.servers.values() for e in s.events() if e["event"] == name]


def probe(roaming: RoamingLab, host: str) -> str | None:
    """From c1, straight to ``host``'s service port (not through the VIP): the name of the
    server that answered, or ``None`` if nothing did."""
    address = roaming.lab[host].address
    result = roaming.lab["c1"].run(
        ["curl", "-s", "--max-time", "0.6", f"http://{address}/whoami"], timeout=10
    )
    return result.stdout.strip() if result.returncode == 0 else None


def wait_until(when: float) -> None:
    time.sleep(max(0.0, when - time.time()))


def test_an_expired_client_finds_no_server_by_probing() -> None:
    until = 5
    with pool(
        tick=2.0, m=1, migration="reconnect", subscribe_options={"until-epoch": str(until)}
    ) as roaming:
        roaming.start()
        # The prober needs no client shim (which would take the servers' answers for its own
        # connections through the VIP): the gates know the client by its address.
        roaming.clients.pop("c1").stop()
        roaming.wait_for_schedule(0.1)
        epochs = {e["epoch"]: e for e in roaming.schedule(1, until + 8)}
        margin = roaming.delta + roaming.gamma + 0.15
        # While subscribed: in epoch ``until - 1`` (away from its edges), exactly the active
        # server answers.
        before = epochs[until - 1]
        wait_until(before["start"] + margin)
        began = time.time()
        answered = {host for host in roaming.server_hosts if probe(roaming, host) == host}
        assert time.time() < before["start"] + before["length"] - roaming.delta, (
            "the probes ran past the epoch (machine too slow)"
        )
        assert began >= before["start"]
        assert answered == {roaming.host_of(before["server"])}, answered
        # Expired: from the first epoch whose key it does not hold, on every server, for 12
        # probes over several epochs.
        wait_until(epochs[until + 1]["start"] + margin)
        answers = [probe(roaming, host) for _round in range(6) for host in roaming.server_hosts]
        assert answers == [None] * 12, answers
        # Every gate said so, and the updates stopped.
        skipped = [
            e for e in events(roaming, "update_skipped") if e["error"] == "SubscriptionExpiredError"
        ]
        assert {e["client"] for e in skipped} == {"c1"}
        assert len(skipped) == len(roaming.servers), skipped


# Raw packets from the outsider with the client's address as their source, at port 80 of each
# target: one in three a SYN, one in three a bare ACK, one in three a data segment (ACK|PSH, 400
# bytes), with random ports, sequence and acknowledgment numbers. Bounded in count and time.
SPOOF_FLOOD = r"""
import random, socket, sys, time
from scapy.all import IP, TCP, Raw
targets, source = sys.argv[1].split(","), sys.argv[2]
count, limit_s, rate = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
rng = random.Random(7)
templates = []
for i in range(3 * 256):
    kind = i % 3
    flags, payload = [("S", b""), ("A", b""), ("PA", bytes(400))][kind]
    for target in targets:
        packet = IP(src=source, dst=target) / TCP(
            sport=rng.randrange(1024, 65536), dport=80, flags=flags,
            seq=rng.getrandbits(32), ack=rng.getrandbits(32) if "A" in flags else 0)
        templates.append((bytes(packet / Raw(payload)) if payload else bytes(packet), target))
sent, began = 0, time.monotonic()
while sent < count and time.monotonic() - began < limit_s:
    packet, target = templates[sent % len(templates)]
    sock.sendto(packet, (target, 0))
    sent += 1
    if sent % 50 == 0:
        # Paced: ``rate`` packets a second, so the flood lasts its time, not a burst.
        ahead = sent / rate - (time.monotonic() - began)
        if ahead > 0:
            time.sleep(ahead)
print(sent)
"""


def test_spoofing_a_contracted_client_gets_it_neither_struck_nor_revoked() -> None:
    small = os.urandom(16 * 1024)
    expected = hashlib.sha256(small).hexdigest()
    with (
        attacker_cpu() as attacker,
        live_lab(
            outsiders=1,
            tick=3.0,
            m=1,
            content={"small": small},
            subscribe_options={"rate-kbit": "800"},
            min_switches=2,
            switch_window=30.0,
        ) as roaming,
    ):
        roaming.start()
        roaming.wait_for_schedule(0.2)
        client = str(roaming.lab["c1"].address)
        for host in roaming.server_hosts:
            count_service_packets(roaming, host, [client])
        # The flood spans two changes of epoch: from now to a second into the epoch after the
        # next one.
        now = time.time()
        epochs = roaming.schedule(1, 40)
        current = next(
            i for i, e in enumerate(epochs) if e["start"] <= now < e["start"] + e["length"]
        )
        end = epochs[current + 2]["start"] + 1.0
        limit_s = min(end - now, 30.0)
        targets = ",".join(str(roaming.lab[h].address) for h in roaming.server_hosts)
        # 2500 packets/s of about 270 bytes on average, over three servers: some 220 kB/s at
        # each, more than twice the client's 800 kbit/s (100 kB/s).
        gets = start_timed_gets(roaming, limit_s=limit_s)
        flood = roaming.lab["o1"].popen(
            [
                *attacker,
                sys.executable,
                "-c",
                SPOOF_FLOOD,
                targets,
                client,
                str(int(2500 * limit_s)),
                str(limit_s),
                "2500",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with reaped(flood):
            out, err = flood.communicate(timeout=limit_s + 60)
        assert flood.returncode == 0, err[-500:]
        sent = int(out)
        outcome = finish_timed_gets(gets)
        print(
            f"spoofed packets sent: {sent} in {limit_s:.1f} s; client GETs: {len(outcome['times'])}"
        )
        for host in roaming.server_hosts:
            traffic = source_traffic(roaming, host, client)
            print(f"{host}: arrived {traffic.arrived}, passed the gate {traffic.passed}")
            assert traffic.arrived[0] >= sent // (2 * len(roaming.server_hosts)), host
        assert time.time() >= end - 0.5, "the flood ended before its two epochs"
        assert not events(roaming, "contract_exceeded"), events(roaming, "contract_exceeded")
        applied = [e["message"] for e in events(roaming, "control_applied")]
        assert not {"Strike", "Revoke"} & set(applied), applied
        for shim in roaming.servers.values():
            assert not any(e["event"] == "contract_exceeded" for e in shim.events())
        digests = outcome["digests"]
        assert len(digests) >= 10, outcome
        assert digests == [expected] * len(digests), [d for d in digests if d != expected][:5]
