"""Uploads across roams against no roaming, in one run: the table of issue 15.

Three servers run Debian's nginx with its WebDAV module (``dav_methods PUT``), the client shim
on c1, and curl PUTs 1, 8 and 64 MiB of random bytes through the VIP, each paced by curl's
``--limit-rate`` to last about ``--seconds`` (so every size meets several roams). The same
uploads run twice in the same lab, one deployment after the other: live mode without roaming
(epochs of a day: the baseline), then live mode roaming about every second. At each roam the
unanswered PUT is replayed from its first byte to the next server (the replay stream,
docs/protocol.md section 8.2), so a roam re-sends the whole body so far.

Printed per size and case: whether the upload completed (201/204 and the file stored intact
on the server that answered, SHA-256), its time and the ratio to no roaming, the roams during
the upload (the client shim's hand-overs of that connection) and the replay bytes re-sent at
each, and the hand-over pauses.

Run as root: ``python -m labs.benchmarks.uploads [--sizes-mib 1,8,64] [--seconds 6]``. The
shims run with ``--max-replay`` of ``--max-replay-mib`` (default 72): a 64 MiB body with its
request head is more than the default bound of exactly 64 MiB. ``--rate-kbit`` subscribes the
client with a rate contract: a server refills a client's replay budget at its contract, at
2 MiB/s without one (migrate.admission), and re-sending a growing upload at every roam asks
for more than that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from labs import Lab, PoolTopo
from labs.benchmarks.roaming import STILL_TICK
from labs.benchmarks.roaming.orchestration import deploy, progress, source_state
from labs.faults import logged_reasons
from labs.roaming import RoamingLab
from labs.services import DAV_PUT

MIB = 1024 * 1024
ROAM_TICK = 0.5  # m = 1: a roam about every second
CASES = (("no roaming", STILL_TICK), ("roaming", ROAM_TICK))
CURL_FORMAT = "%{http_code} %{local_port} %{time_total} %{size_upload}"


def rate_for(size: int, seconds: float) -> str:
    """curl's ``--limit-rate`` (bytes per second, in K) for ``size`` bytes in ``seconds``."""
    return f"{max(1, round(size / seconds / 1024))}K"


def parse_curl(output: str) -> dict[str, Any] | None:
    """curl's ``-w CURL_FORMAT`` line: status, local port, seconds, bytes sent; None if it is
    not one (curl failed before writing it)."""
    fields = output.split()
    if len(fields) != 4:
        return None
    try:
        return {
            "status": int(fields[0]),
            "port": int(fields[1]),
            "seconds": float(fields[2]),
            "sent": int(float(fields[3])),
        }
    except ValueError:
        return None


def summarise(upload: dict[str, Any], handoffs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One upload's row: its hand-overs (the client shim's ``handoff`` events of its port)."""
    mine = [e for e in handoffs if e.get("port") == upload.get("port")]
    replayed = [int(e.get("bytes_replayed") or 0) for e in mine]
    pauses = [float(e.get("pause_ms") or 0.0) for e in mine]
    outcomes: dict[str, int] = {}
    for event in mine:
        outcomes[event["outcome"]] = outcomes.get(event["outcome"], 0) + 1
    return {
        **upload,
        "roams": len(mine),
        "outcomes": outcomes,
        "replayed": replayed,
        "replayed_total": sum(replayed),
        "pause_ms_median": round(statistics.median(pauses), 1) if pauses else None,
        "pause_ms_max": round(max(pauses), 1) if pauses else None,
        "failures": [
            f"{e['outcome']}: {str(e.get('detail', ''))[:200]}"
            for e in mine
            if e["outcome"] != "migrated"
        ],
    }


def _mb(count: float) -> str:
    return f"{count / 1e6:.1f}"


def render(results: dict[str, Any]) -> str:
    lines = [f"Source: {results['source']}", ""]
    lines.append(
        f"curl -T through the VIP to nginx (dav_methods PUT) on three servers, each upload "
        f"paced to ~{results['seconds']:g} s (--limit-rate), --max-replay "
        f"{results['max_replay_mib']} MiB, "
        + (
            f"rate contract {results['rate_kbit']} kbit/s"
            if results["rate_kbit"]
            else "no rate contract"
        )
        + "; live mode, no roaming vs a roam about every second:"
    )
    lines.append("")
    lines.append(
        "| size | case | completed | seconds | vs no roaming | roams during the upload "
        "| replay re-sent per roam (MB) | re-sent in all (MB) | pause ms (median / max) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for size in results["sizes_mib"]:
        base = results["cases"].get(CASES[0][0], {}).get(str(size))
        for name, _tick in CASES:
            row = results["cases"].get(name, {}).get(str(size))
            if row is None:
                continue
            ratio = (
                f"{row['seconds'] / base['seconds']:.2f}x"
                if base and row["completed"] and base["completed"] and base["seconds"]
                else "-"
            )
            per_roam = ", ".join(_mb(count) for count in row["replayed"]) or "-"
            pauses = (
                f"{row['pause_ms_median']} / {row['pause_ms_max']}"
                if row["pause_ms_median"] is not None
                else "-"
            )
            why = "; ".join([row["error"], *row["failures"], *row.get("shim_reasons", [])])
            completed = "yes" if row["completed"] else f"no ({why})"
            lines.append(
                f"| {size} MiB | {name} | {completed} | {row['seconds']:.2f} | {ratio} | "
                f"{row['roams']} {row['outcomes'] or ''} | {per_roam} | "
                f"{_mb(row['replayed_total'])} | {pauses} |"
            )
    return "\n".join(lines)


def upload(pool: RoamingLab, size_mib: int, seconds: float, tag: str) -> dict[str, Any]:
    """One PUT of ``size_mib`` MiB through the VIP; the file checked where it was stored."""
    data = os.urandom(size_mib * MIB)
    digest = hashlib.sha256(data).hexdigest()
    name = f"upload-{tag}-{size_mib}.bin"
    source = pool.lab.workdir / name
    source.write_bytes(data)
    started = time.time()
    result = pool.lab["c1"].run(
        ["curl", "-sS", "--limit-rate", rate_for(len(data), seconds), "-T", str(source),
         "-o", "/dev/null", "-w", CURL_FORMAT, pool.url(f"/{name}")],
        timeout=60 + 10 * seconds,
    )  # fmt: skip
    ended = time.time()
    source.unlink()
    parsed = parse_curl(result.stdout) or {"status": 0, "port": None, "seconds": ended - started}
    stored = {}
    for host in pool.server_hosts:
        path = pool.workdir / f"www-{host}" / name
        if path.exists():
            stored[host] = hashlib.sha256(path.read_bytes()).hexdigest() == digest
            path.unlink()
    error = ""
    if result.returncode != 0:
        error = result.stderr.strip().splitlines()[-1][:120] if result.stderr.strip() else "curl"
    elif parsed["status"] not in (201, 204):
        error = f"HTTP {parsed['status']}"
    elif not stored or not all(stored.values()):
        error = f"stored: {stored}"
    return {
        **parsed,
        "completed": not error,
        "error": error,
        "stored_on": sorted(stored),
        "started": started,
        "ended": ended,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labs.benchmarks.uploads", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes-mib", default="1,8,64", help="upload sizes (default 1,8,64)")
    parser.add_argument("--seconds", type=float, default=6.0, help="pacing of each upload")
    parser.add_argument("--max-replay-mib", type=int, default=72, help="the shims' bound")
    parser.add_argument(
        "--rate-kbit",
        type=int,
        default=0,
        help="subscribe the client with this rate contract (its replay budget refills at it; "
        "default: none, 2 MiB/s)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("uploads: needs root (network namespaces)", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    bound = ["--max-replay", str(args.max_replay_mib * MIB)]
    results: dict[str, Any] = {
        "source": source_state(),
        "sizes_mib": sizes,
        "seconds": args.seconds,
        "max_replay_mib": args.max_replay_mib,
        "rate_kbit": args.rate_kbit,
        "cases": {},
    }
    with Lab(PoolTopo(servers=3, clients=1)) as lab:
        pool = RoamingLab(
            lab, tick=ROAM_TICK, m=1, service="nginx", service_config=DAV_PUT,
            client_extra=bound,
            subscribe_options={"rate-kbit": str(args.rate_kbit)} if args.rate_kbit else {},
        )  # fmt: skip
        try:
            for host in pool.server_hosts:
                pool.start_service(host)
            for name, tick in CASES:
                deploy(pool, mode="live", servers=pool.server_hosts, tick=tick, extra=bound)
                rows = results["cases"][name] = {}
                for size in sizes:
                    done = upload(pool, size, args.seconds, name.replace(" ", "-"))
                    handoffs = [e for e in pool.clients["c1"].events() if e["event"] == "handoff"]
                    rows[str(size)] = row = summarise(done, handoffs)
                    if not row["completed"]:
                        row["shim_reasons"] = logged_reasons(pool)[-6:]
                        row["shim_warnings"] = [
                            f"{shim.host} {e['event']}: "
                            f"{str(e.get('reason', e.get('error', e.get('detail', ''))))[:200]}"
                            for shim in [*pool.servers.values(), *pool.clients.values()]
                            for e in shim.events()
                            if e["level"] != "info" and done["started"] <= e["ts"] <= done["ended"]
                        ][:12]
                    progress(f"{name} {size} MiB: {json.dumps(row)}")
        finally:
            pool.stop()
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
