"""What an eavesdropper on the client's link learns from migration-port traffic (issue 12, 6).

A live lab (three servers, one client with a keep-alive connection that makes requests across
roams) runs with tcpdump on the client's interface, capturing UDP to and from the migration
port. The client's ``switch`` events say when each roam happened and to which server. Then,
for each roam that handed the connection over, at time T from server P to server S, the
datagrams of the window
``[max(T - 4 s, previous roam), T)`` are what an eavesdropper could use to predict it:

* ``next_share``: the share of the client's datagrams (and bytes) that went to S; without
  cover, every PREPARE goes to S, so ~1; with cover, 1/N;
* ``accuracy``: an eavesdropper guessing that S is the server other than P that got the most
  datagrams in the window (ties broken at random, counted as the expected score), against the
  baseline of guessing blindly, 1/(N-1);
* ``sizes``: the distinct sizes of the datagrams each way (one size: size tells nothing);
* ``uneven_bins``: the share of time bins (one cover slot wide) in which the servers did not
  all get the same number of datagrams (the destination shows in any such bin);
* ``rate_ratio``: the client's datagram rate in the last second before roams over its rate at
  other times (a hand-over's burst shows as a ratio above 1).

Run: ``sudo env PYTHONPATH=$PWD python -m labs.traffic`` (prints the figures with cover off
and on; ``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIGRATION_PORT = 47476
WINDOW_S = 4.0  # the longest lead a hand-over prepares with (client_shim MAX_PREPARE_LEAD)
LAST_SECOND_S = 1.0


@dataclass(frozen=True, slots=True)
class Datagram:
    t: float
    src: str
    dst: str
    size: int  # UDP payload bytes


@dataclass(frozen=True, slots=True)
class Roam:
    t: float
    server: str  # address of the server roamed to
    previous: str


@dataclass(frozen=True, slots=True)
class Leak:
    roams: int
    servers: int
    datagrams_out: int
    datagrams_in: int
    next_share: float
    next_share_bytes: float
    accuracy: float
    baseline: float
    sizes_out: list[int]
    sizes_in: list[int]
    uneven_bins: float
    rate_ratio: float
    bytes_per_s_out: float


def read_datagrams(pcap: Path, port: int = MIGRATION_PORT) -> list[Datagram]:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import PcapReader

    found = []
    with PcapReader(str(pcap)) as reader:
        for packet in reader:
            if UDP in packet and port in (packet[UDP].sport, packet[UDP].dport):
                udp = packet[UDP]
                found.append(
                    Datagram(float(packet.time), packet[IP].src, packet[IP].dst, udp.len - 8)
                )
    return found


def roams_of(events: Sequence[dict[str, Any]]) -> list[Roam]:
    """The client's switches that handed a connection over (a ``switch`` event names
    ``ip:port`` of both servers): only those had requests to hide."""
    handed = {e["epoch"] for e in events if e["event"] == "handoff"}
    return [
        Roam(float(e["ts"]), _address(e["server"]), _address(e["previous"]))
        for e in events
        if e["event"] == "switch"
        and e.get("previous")
        and e["previous"] != e["server"]
        and e.get("epoch") in handed
    ]


def _address(endpoint: object) -> str:
    return str(endpoint).rsplit(":", 1)[0]


def analyse(
    datagrams: Sequence[Datagram],
    roams: Sequence[Roam],
    client: str,
    servers: Sequence[str],
    bin_s: float = 0.05,
) -> Leak:
    out = [d for d in datagrams if d.src == client and d.dst in servers]
    into = [d for d in datagrams if d.dst == client and d.src in servers]
    if not out or not roams:
        raise ValueError("no datagrams or no roams to analyse")
    shares, byte_shares, scores, baselines = [], [], [], []
    previous_t = out[0].t
    for roam in roams:
        start = max(roam.t - WINDOW_S, previous_t)
        previous_t = roam.t
        window = [d for d in out if start <= d.t < roam.t]
        if not window:
            continue
        shares.append(sum(d.dst == roam.server for d in window) / len(window))
        total = sum(d.size for d in window)
        byte_shares.append(sum(d.size for d in window if d.dst == roam.server) / total)
        candidates = [s for s in servers if s != roam.previous]
        counts = Counter(d.dst for d in window if d.dst in candidates)
        best = max(counts.get(s, 0) for s in candidates)
        ties = [s for s in candidates if counts.get(s, 0) == best]
        scores.append((roam.server in ties) / len(ties))
        baselines.append(1 / len(candidates))
    first, last = out[0].t, out[-1].t
    bins: dict[int, Counter[str]] = {}
    for d in out:
        bins.setdefault(int((d.t - first) / bin_s), Counter())[d.dst] += 1
    uneven = sum(len({c.get(s, 0) for s in servers}) > 1 for c in bins.values())
    near = [d for d in out if any(r.t - LAST_SECOND_S <= d.t < r.t for r in roams)]
    near_time = sum(
        min(LAST_SECOND_S, r.t - first) for r in roams if r.t > first
    )  # overlaps are rare at epochs of seconds
    span = max(last - first, 1e-9)
    far_rate = (len(out) - len(near)) / max(span - near_time, 1e-9)
    near_rate = len(near) / max(near_time, 1e-9)
    return Leak(
        roams=len(scores),
        servers=len(servers),
        datagrams_out=len(out),
        datagrams_in=len(into),
        next_share=round(_mean(shares), 3),
        next_share_bytes=round(_mean(byte_shares), 3),
        accuracy=round(_mean(scores), 3),
        baseline=round(_mean(baselines), 3),
        sizes_out=sorted({d.size for d in out}),
        sizes_in=sorted({d.size for d in into}),
        uneven_bins=round(uneven / max(1, len(bins)), 3),
        rate_ratio=round(near_rate / far_rate, 2) if far_rate > 0 else float("inf"),
        bytes_per_s_out=round(sum(d.size for d in out) / span, 1),
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


KEEPALIVE = """
import http.client, sys, time
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=20)
ok = 0
for i in range(int(sys.argv[2])):
    conn.request("GET", f"/f{i % 8}")
    response = conn.getresponse()
    ok += response.status == 200 and len(response.read()) > 0
    time.sleep(float(sys.argv[3]))
print(ok)
"""


def run(cover_rate: float | None, requests: int = 300, pause: float = 0.05) -> dict[str, Any]:
    """One lab run: a keep-alive client across roams, its migration-port traffic captured.
    ``cover_rate`` None keeps the client's default."""
    from labs.faults import handoffs, live_lab, shim_problems

    extra = () if cover_rate is None else ("--cover-rate", f"{cover_rate:g}")
    files = {f"f{i}": random.randbytes(4000 + 311 * i) for i in range(8)}
    with live_lab(
        tick=1.0,
        m=1,
        service="nginx",  # keeps the connection alive (http.server closes after each answer)
        content=files,
        # Within the client's run (at least 15 s: ``requests`` 50 ms apart, the default), so
        # that every one of these roams hands its connection over (8 in 24 s left 4 in the run
        # of one CI, short of the test's 5).
        min_switches=7,
        switch_window=14.0,
        client_extra=extra,
    ) as roaming:
        roaming.start()
        roaming.wait_for_schedule(0.2)
        client = roaming.lab["c1"]
        pcap = roaming.workdir / "migration-port.pcap"
        with client.capture(
            "eth0", pcap, bpf_filter=["udp", "port", str(MIGRATION_PORT)], snaplen_bytes=64
        ):
            result = client.run(
                [sys.executable, "-c", KEEPALIVE, str(roaming.vip), str(requests), str(pause)],
                timeout=300,
            )
        roaming.stop()
        # A failed hand-over resets the connection: reported, and the traffic until then
        # still measured.
        client_ok = result.returncode == 0 and result.stdout.strip() == str(requests)
        servers = [str(roaming.lab[h].address) for h in roaming.server_hosts]
        leak = analyse(
            read_datagrams(pcap),
            roams_of(roaming.clients["c1"].events()),
            str(client.address),
            servers,
        )
        outcomes = Counter(h["outcome"] for h in handoffs(roaming))
        return {
            "leak": leak,
            "handoffs": dict(outcomes),
            "problems": shim_problems(roaming),
            "client_ok": client_ok,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labs.traffic", description=__doc__)
    parser.add_argument("--rates", default="0,20", help="cover rates to compare (default 0,20)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("labs.traffic: needs root (network namespaces)", file=sys.stderr)
        return 2
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        found = run(rate, requests=args.requests)
        rows.append(
            {
                "cover_rate": rate,
                **asdict(found["leak"]),
                "handoffs": found["handoffs"],
                "client_ok": found["client_ok"],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        print(
            f"cover {row['cover_rate']:g}/s: {row['roams']} roams, {row['servers']} servers; "
            f"next-server share {row['next_share']} (bytes {row['next_share_bytes']}); "
            f"guess accuracy {row['accuracy']} vs baseline {row['baseline']}; "
            f"sizes out {row['sizes_out'][:6]}{'...' if len(row['sizes_out']) > 6 else ''} "
            f"in {row['sizes_in'][:6]}{'...' if len(row['sizes_in']) > 6 else ''}; "
            f"uneven bins {row['uneven_bins']}; last-second rate x{row['rate_ratio']}; "
            f"{row['bytes_per_s_out']:.0f} B/s out; hand-overs {row['handoffs']}; "
            f"client {'ok' if row['client_ok'] else 'reset'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
