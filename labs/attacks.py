"""Floods and measurements of the attack tests (tests/system/test_attacks*.py, issue 7).

The floods are small Python programs run with ``Node.popen``/``Node.run`` inside a lab host
(``python3 -c SCRIPT args...``), so that every packet stays inside the lab's namespaces; each
is bounded both in count and in time, and prints what it did on stdout:

* ``FLOOD``: SYNs from a raw IP socket (scapy builds 256 templates per source and target).
  Arguments: targets (comma-separated addresses), sources (comma-separated, possibly spoofed
  addresses), the count, the time limit in seconds. Prints the number sent.
* ``REQUESTS``: full TCP connections to port 80 of each target, each with an HTTP request, a
  50 ms connect timeout. Arguments: targets, count, time limit. Prints ``tried answered``
  (``answered``: the connection was accepted and the request sent).
* ``TIMED_GETS``: a legitimate client's HTTP GETs through the VIP, one at a time, each timed.
  See ``timed_gets``.

Counting what reaches a legacy service: ``count_service_packets`` puts an nftables table in a
server host that counts the packets leaving for the service's loopback port and, per source,
the packets that arrived for the shim's public port, those the shim's gate let through, and
those sent to the service from the source's address; ``service_packets`` and
``source_traffic`` read them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from labs.errors import LabError
from labs.roaming import LISTEN_PORT, SERVICE_PORT, RoamingLab

FLOOD = r"""
import socket, sys, time
from scapy.all import IP, TCP
targets, sources = sys.argv[1].split(","), sys.argv[2].split(",")
count, limit_s = int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sent, deadline = 0, time.monotonic() + limit_s
templates = [bytes(IP(src=s, dst=t) / TCP(sport=1024 + i, dport=80, flags="S", seq=i))
             for i in range(256) for s in sources for t in targets]
while sent < count and time.monotonic() < deadline:
    packet = templates[sent % len(templates)]
    sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
    sent += 1
print(sent)
"""

REQUESTS = r"""
import socket, sys, time
targets, count, limit_s = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
deadline, tried = time.monotonic() + limit_s, 0
answered = 0
while tried < count and time.monotonic() < deadline:
    for target in targets:
        s = socket.socket(); s.settimeout(0.05)
        try:
            s.connect((target, 80)); s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"); answered += 1
        except OSError:
            pass
        finally:
            s.close()
        tried += 1
print(tried, answered)
"""

# One JSON object: per request, its start (wall clock), its duration and the SHA-256 of the
# body (or "error: ..." / "status N": never a digest then).
TIMED_GETS = r"""
import http.client, json, sys, time, hashlib
vip, count, limit_s, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + limit_s
began_at, times, digests = [], [], []
while len(times) < count and time.monotonic() < deadline:
    began_at.append(time.time())
    began = time.perf_counter()
    conn = http.client.HTTPConnection(vip, 80, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status == 200:
            digests.append(hashlib.sha256(body).hexdigest())
        else:
            digests.append(f"status {response.status}")
    except (OSError, http.client.HTTPException) as error:
        digests.append(f"error: {error!r}")
    finally:
        conn.close()
    times.append(time.perf_counter() - began)
    time.sleep(0.02)
print(json.dumps({"began_at": began_at, "times": times, "digests": digests}))
"""

COUNTERS_TABLE = "attack_counters"
# The server shim's gate drops at the raw priority of prerouting (-300): a chain before it sees
# every packet that arrives, a chain after it only those the gate let through.
ARRIVED_PRIORITY = -400
PASSED_PRIORITY = 0

Traffic = tuple[int, int]  # packets, bytes


@dataclass(frozen=True)
class SourceTraffic:
    """What one source sent to a server host, as its counters saw it."""

    arrived: Traffic  # for the shim's public port, before the gate
    passed: Traffic  # let through by the gate
    service: Traffic  # sent to the legacy service from the source's address (by the shim)


def _suffix(address: str) -> str:
    """A counter name's suffix for an IPv4 address (which is checked: it goes into a rule)."""
    try:
        return str(IPv4Address(address)).replace(".", "_")
    except ValueError:
        raise LabError(f"not an IPv4 address: {address!r}") from None


def count_service_packets(roaming: RoamingLab, host: str, sources: Sequence[str] = ()) -> None:
    """Count, in ``host``, the packets sent to the legacy service's loopback port (counter
    ``svc``, read by ``service_packets``) and, for each address of ``sources``, what it sent
    (read by ``source_traffic``). The server shim connects to the service from its client's
    own address, so the service's packets can be told apart by source too."""
    counters = "".join(
        f"  counter {kind}_{_suffix(s)} {{ }}\n" for s in sources for kind in ("svc", "in", "ok")
    )

    def rules(port: int, kind: str) -> str:
        return "".join(
            f'    ip saddr {s} tcp dport {port} counter name "{kind}_{_suffix(s)}"\n'
            for s in sources
        )

    roaming.lab[host].run(
        ["nft", "-f", "-"],
        check=True,
        input=(
            f"table inet {COUNTERS_TABLE} {{\n"
            "  counter svc { }\n"
            f"{counters}"
            "  chain to_service { type filter hook output priority -400; policy accept;\n"
            f'    tcp dport {SERVICE_PORT} counter name "svc"\n'
            f"{rules(SERVICE_PORT, 'svc')}"
            "  }\n"
            f"  chain arrived {{ type filter hook prerouting priority {ARRIVED_PRIORITY}; "
            "policy accept;\n"
            f"{rules(LISTEN_PORT, 'in')}"
            "  }\n"
            f"  chain passed {{ type filter hook prerouting priority {PASSED_PRIORITY}; "
            "policy accept;\n"
            f"{rules(LISTEN_PORT, 'ok')}"
            "  }\n"
            "}\n"
        ),
    )


def _counters(roaming: RoamingLab, host: str) -> dict[str, Traffic]:
    result = roaming.lab[host].run(
        ["nft", "-j", "list", "counters", "table", "inet", COUNTERS_TABLE], check=True
    )
    found = {
        item["counter"]["name"]: (int(item["counter"]["packets"]), int(item["counter"]["bytes"]))
        for item in json.loads(result.stdout)["nftables"]
        if "counter" in item
    }
    if "svc" not in found:
        raise LabError(f"no attack counters in {host}: {result.stdout[:200]}")
    return found


def service_packets(roaming: RoamingLab, host: str) -> int:
    """Packets sent to ``host``'s legacy service since ``count_service_packets``."""
    return _counters(roaming, host)["svc"][0]


def source_traffic(roaming: RoamingLab, host: str, source: str) -> SourceTraffic:
    """What ``source`` (an address given to ``count_service_packets``) sent to ``host``."""
    counters = _counters(roaming, host)
    suffix = _suffix(source)
    if f"svc_{suffix}" not in counters:
        raise LabError(f"{host} counts nothing from {source}")
    return SourceTraffic(
        arrived=counters[f"in_{suffix}"],
        passed=counters[f"ok_{suffix}"],
        service=counters[f"svc_{suffix}"],
    )


@contextmanager
def attacker_cpu() -> Iterator[list[str]]:
    """For the block, the lab's own processes (started inside it) run on every CPU but the
    last; yields the command prefix that runs an attacker on the last one.

    On one machine the attacker otherwise competes with the defence for the same CPUs, which
    no real attacker does, and the legitimate client's response times then measure that
    contention rather than the defence. A flood's packets are handled by the kernel on the
    CPU that sends them (each veth hop queues on the sender's CPU), so they stay there too.
    With a single CPU nothing changes (an empty prefix)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield []
        return
    os.sched_setaffinity(0, cpus[:-1])
    try:
        yield ["taskset", "-c", str(cpus[-1])]
    finally:
        os.sched_setaffinity(0, cpus)


def _timed_gets_argv(roaming: RoamingLab, count: int, limit_s: float, path: str) -> list[str]:
    return [sys.executable, "-c", TIMED_GETS, str(roaming.vip), str(count), str(limit_s), path]


def timed_gets(
    roaming: RoamingLab, count: int, host: str = "c1", path: str = "/small", limit_s: float = 100.0
) -> dict[str, Any]:
    """``count`` GETs of ``path`` through the VIP from ``host`` (at most ``limit_s`` seconds):
    ``{"began_at": [...], "times": [...], "digests": [...]}``, one entry per request made."""
    result = roaming.lab[host].run(_timed_gets_argv(roaming, count, limit_s, path), timeout=120)
    if result.returncode != 0:
        raise LabError(f"timed GETs on {host} failed: {result.stderr[-500:]}")
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


def start_timed_gets(
    roaming: RoamingLab,
    limit_s: float,
    host: str = "c1",
    path: str = "/small",
    count: int = 100_000,
) -> subprocess.Popen[str]:
    """``timed_gets`` in the background, for ``limit_s`` seconds; ``finish_timed_gets`` reads it."""
    return roaming.lab[host].popen(
        _timed_gets_argv(roaming, count, limit_s, path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_timed_gets(process: subprocess.Popen[str], timeout_s: float = 120.0) -> dict[str, Any]:
    stdout, stderr = process.communicate(timeout=timeout_s)
    if process.returncode != 0:
        raise LabError(f"timed GETs failed: {stderr[-500:]}")
    outcome: dict[str, Any] = json.loads(stdout)
    return outcome
