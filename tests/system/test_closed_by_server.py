"""A connection the server has closed, and that the client application closes only after the
service roamed, ends quietly: the client's late FIN must not reach the new server, which has no
socket for it and would answer with a RST (client_shim.rules, ``finished``).

Live mode, Python's http.server (HTTP/1.0: it closes the connection after each response).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from labs.faults import live_lab, shim_problems
from labs.roaming import LISTEN_PORT, RoamingLab

pytestmark = [pytest.mark.system]

# Fetch once, read to the server's FIN, hold the socket (CLOSE_WAIT) past a roam, then close
# and linger long enough for any answer to the FIN to arrive. Prints its port and times.
LATE_CLOSER = """
import json, socket, sys, time
host, port, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.create_connection((host, port), timeout=10)
sock.sendall(b"GET /small HTTP/1.0\\r\\nHost: vip\\r\\n\\r\\n")
data = b""
while chunk := sock.recv(65536):
    data += chunk
eof = time.time()
time.sleep(hold)
local_port = sock.getsockname()[1]
sock.close()
closed = time.time()
time.sleep(1.5)
print(json.dumps({"port": local_port, "bytes": len(data), "eof": eof, "closed": closed}))
"""


def resets(capture: Path, port: int) -> list[str]:
    from scapy.all import TCP, rdpcap

    return [
        f"{p['IP'].src}:{p[TCP].sport} > {p['IP'].dst}:{p[TCP].dport} {p[TCP].flags}"
        for p in rdpcap(str(capture))
        if p.haslayer(TCP) and p[TCP].flags & 0x04 and port in (p[TCP].sport, p[TCP].dport)
    ]


def test_a_connection_closed_by_the_server_and_by_the_client_after_a_roam_gets_no_reset() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    small = os.urandom(2000)
    with live_lab(tick=1.0, m=1, content={"small": small}) as roaming:
        roaming.start()
        roaming.wait_for_schedule(0.2)
        checked = 0
        for _ in range(3):
            outcome, found = late_close(roaming, len(small))
            assert found == [], f"the late FIN drew a RST: {found}; {outcome}"
            checked += 1
        roaming.stop()
        assert shim_problems(roaming) == []
    assert checked == 3


def late_close(roaming: RoamingLab, size: int) -> tuple[dict[str, float], list[str]]:
    """One fetch whose socket is closed 0.3-0.8 s after the next server change."""
    switch_at = roaming.wait_for_switch_between(0.3, 0.6)
    hold = (switch_at - time.time()) + 0.5
    capture = roaming.workdir / f"late-close-{time.time():.0f}.pcap"
    with roaming.lab["c1"].capture(
        "eth0", capture, bpf_filter=["tcp", "port", str(LISTEN_PORT)], snaplen_bytes=96
    ):
        result = roaming.lab["c1"].run(
            ["python3", "-c", LATE_CLOSER, str(roaming.vip), str(LISTEN_PORT), f"{hold:.3f}"],
            timeout=30,
            check=True,
        )
    outcome = json.loads(result.stdout)
    assert outcome["bytes"] > size  # the whole response (headers and body) before the FIN
    # The roam came between the server's FIN and the client's, as the test needs.
    switches = [
        e["ts"]
        for e in roaming.clients["c1"].events()
        if e["event"] == "switch" and outcome["eof"] < e["ts"] < outcome["closed"]
    ]
    assert switches, f"no roam between the server's FIN and the client's: {outcome}"
    return outcome, resets(capture, int(outcome["port"]))
