"""redis through the VIP across roams, and what a redis connection's hand-over costs as it ages
(issue 15).

Two parts, both printed as tables:

* **Lab**: three servers running redis-server (Debian) with the same keys behind the server
  shims, the client shim on c1, and ``redis-benchmark -k 1`` (keep-alive connections) through
  the VIP doing GET and SET. One deployment after another in the same lab: live mode without
  roaming (epochs of a day: the baseline), live mode roaming about every second, and the
  paper's drop-and-reconnect roaming (``--migration reconnect``). redis-benchmark stops at its
  first error (a reset connection); its requests per second, whether it finished, and the roams
  during its run are printed, with the ratio to the baseline.
* **Simulated traffic** (pure, no lab): a RESP stream state fed a connection's GET/SET
  exchanges for 1 s, 1 min and 10 min of traffic at a steady rate, then checkpointed as a
  hand-over would: the replay bytes a PREPARE carries and the service bytes a new server
  regenerates. The RESP codec keeps only the session's state commands and the unanswered
  ones, so both must stay flat however old the connection is.

Run as root: ``python -m labs.benchmarks.redis_roaming [--requests N] [--clients C]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from labs import Lab, PoolTopo
from labs.benchmarks.roaming import STILL_TICK
from labs.benchmarks.roaming.orchestration import deploy, source_state
from labs.roaming import LISTEN_PORT, RoamingLab

ROAM_TICK = 0.5  # m = 1: a roam about every second
CASES = (
    # (name, migration mode, tick)
    ("live, no roaming", "live", STILL_TICK),
    ("live, roaming", "live", ROAM_TICK),
    ("reconnect, roaming", "reconnect", ROAM_TICK),
)
KEYS = {f"key:{i:012d}": os.urandom(3).hex() for i in range(0, 100_000, 9973)}
AGES_S = (1.0, 60.0, 600.0)
SIMULATED_RATE = 200  # exchanges per second of simulated traffic


def _rates(output: str) -> dict[str, float]:
    """redis-benchmark's --csv lines: "TEST","rps",... (header and progress lines skipped)."""
    rates = {}
    for line in output.splitlines():
        fields = [f.strip('"') for f in line.strip().split(",")]
        if len(fields) >= 2 and re.fullmatch(r"[A-Z_]+", fields[0]):
            try:
                rates[fields[0]] = float(fields[1])
            except ValueError:
                continue
    return rates


def run_case(
    pool: RoamingLab, mode: str, tick: float, requests: int, clients: int
) -> dict[str, Any]:
    deploy(pool, mode=mode, servers=pool.server_hosts, tick=tick)
    started = time.time()
    argv = ["redis-benchmark", "-h", str(pool.vip), "-p", str(LISTEN_PORT), "-k", "1",
            "-c", str(clients), "-n", str(requests), "-t", "get,set", "--csv"]  # fmt: skip
    result = pool.lab["c1"].run(argv, timeout=600)
    ended = time.time()
    switches = [
        e
        for e in pool.clients["c1"].events()
        if e["event"] == "switch" and started <= e["ts"] <= ended
    ]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "rror" in line]
    outcomes: dict[str, int] = {}
    for event in pool.clients["c1"].events():
        if event["event"] == "handoff" and started <= event["ts"] <= ended:
            outcomes[event["outcome"]] = outcomes.get(event["outcome"], 0) + 1
    return {
        "finished": result.returncode == 0,
        "seconds": round(ended - started, 2),
        "rates": _rates(result.stdout),
        "roams": len(switches),
        "errors": errors[:3],
        "handoffs": outcomes,
    }


def simulate(ages: Sequence[float] = AGES_S, rate: int = SIMULATED_RATE) -> list[dict[str, Any]]:
    """The hand-over's cost for one redis connection after ``age`` seconds of traffic."""
    from migrate.checkpoint import Checkpoint, TcpSnapshot
    from migrate.streamstate import StreamState

    def command(*parts: bytes) -> bytes:
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    def take(state: StreamState) -> Checkpoint:
        """A checkpoint as the server pushes one, the client having received everything."""
        return state.checkpoint(
            conn_id=bytes(16),
            client=("10.0.0.2", 40000),
            vport=6379,
            epoch=1,
            counter=1,
            now=0.0,
            tcp=TcpSnapshot(1, 2, 1460, 7, 7, True, True, 0),
            s2c_acked=state.s2c_pos,
        )

    rows = []
    for age in ages:
        state = StreamState("resp")
        state.feed_c2s(command(b"SELECT", b"3"))
        state.feed_s2c(b"+OK\r\n")
        exchanges = int(age * rate)
        per_checkpoint = max(1, rate // 50)  # a checkpoint every 20 ms, as the server pushes
        began = time.perf_counter()
        for i in range(exchanges):
            if i % per_checkpoint == 0:
                take(state)
            key = b"key:%012d" % (i % 1000)
            if i % 2:
                state.feed_c2s(command(b"SET", key, b"v" * 64))
                state.feed_s2c(b"+OK\r\n")
            else:
                state.feed_c2s(command(b"GET", key))
                state.feed_s2c(b"$64\r\n" + b"v" * 64 + b"\r\n")
        # The hand-over meets the connection with one request unanswered.
        state.feed_c2s(command(b"GET", b"key:000000000001"))
        fed_s = time.perf_counter() - began
        checkpoint = take(state)
        rows.append(
            {
                "age_s": age,
                "exchanges": exchanges,
                "replay_bytes": checkpoint.c2s_pos - checkpoint.c2s_fresh,
                "session_state_bytes": len(checkpoint.state or b""),
                "regenerate_bytes": checkpoint.s2c_pos - checkpoint.s2c_fresh,
                "observer_us_per_exchange": round(1e6 * fed_s / max(1, exchanges), 1),
            }
        )
    return rows


def render(results: dict[str, Any]) -> str:
    lines = [f"Source: {results['source']}", ""]
    lines.append(
        f"redis-benchmark -k 1 -c {results['clients']} -n {results['requests']} -t get,set "
        "through the VIP, three servers (redis-server, the same keys):"
    )
    lines.append("")
    lines.append(
        "| case | GET req/s | SET req/s | vs no roaming (GET / SET) | roams | finished "
        "| hand-overs | errors |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    base = results["cases"].get(CASES[0][0], {}).get("rates", {})
    for name, case in results["cases"].items():
        rates = case["rates"]
        ratio = " / ".join(
            f"{rates[t] / base[t]:.2f}x" if t in rates and base.get(t) else "-"
            for t in ("GET", "SET")
        )
        lines.append(
            f"| {name} | {rates.get('GET', 0):.0f} | {rates.get('SET', 0):.0f} | {ratio} | "
            f"{case['roams']} | {'yes' if case['finished'] else 'no'} | {case['handoffs']} | "
            f"{'; '.join(case['errors']) or '-'} |"
        )
    lines += ["", "A redis connection's hand-over against its age (simulated traffic, pure):", ""]
    lines.append(
        "| age | exchanges | replay bytes in the PREPARE | session state bytes "
        "| bytes to regenerate | observer µs per exchange |"
    )
    lines.append("|---|---|---|---|---|---|")
    for row in results["aging"]:
        lines.append(
            f"| {row['age_s']:g} s | {row['exchanges']} | {row['replay_bytes']} | "
            f"{row['session_state_bytes']} | {row['regenerate_bytes']} | "
            f"{row['observer_us_per_exchange']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labs.benchmarks.redis_roaming", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=40_000, help="per test (GET, SET) and case")
    parser.add_argument("--clients", type=int, default=4, help="redis-benchmark's connections")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--simulate-only", action="store_true", help="only the pure part")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "source": source_state(),
        "requests": args.requests,
        "clients": args.clients,
        "cases": {},
        "aging": simulate(),
    }
    if not args.simulate_only:
        if os.geteuid() != 0:
            print("the lab part needs root (or give --simulate-only)", file=sys.stderr)
            return 1
        with Lab(PoolTopo(servers=3, clients=1)) as lab:
            content = {name: value.encode() for name, value in KEYS.items()}
            pool = RoamingLab(lab, tick=ROAM_TICK, m=1, service="redis", content=content)
            try:
                for host in pool.server_hosts:
                    pool.start_service(host)
                for name, mode, tick in CASES:
                    results["cases"][name] = case = run_case(
                        pool, mode, tick, args.requests, args.clients
                    )
                    print(f"{name}: {json.dumps(case)}", file=sys.stderr, flush=True)
            finally:
                pool.stop()
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
