"""``python -m labs.benchmarks.roaming shims|migration|overload``, and the client roles it
starts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from labs.benchmarks import roaming as package
from labs.benchmarks.roaming import (
    BIG_MIB,
    CONNECTION_COUNTS,
    HTTP_BULK_MIB,
    HTTP_COPIES,
    MAX_CONNECTIONS,
    SHIM_PATHS,
)
from labs.benchmarks.roaming.busy import busy_client
from labs.benchmarks.roaming.clients import (
    hold_client,
    latency_client,
    opening_client,
    stream_client,
)
from labs.benchmarks.roaming.migration import run_migration
from labs.benchmarks.roaming.orchestration import progress
from labs.benchmarks.roaming.overload import render_overload, run_overload
from labs.benchmarks.roaming.rendering import render_migration, render_shims
from labs.benchmarks.roaming.shims import run_shims
from labs.errors import LabError
from migrate.checkpoint import RANGE_BODIES
from proxy.live_relays import LIVE_RELAYS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labs.benchmarks.roaming", description=(package.__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--role",
        choices=("stream-client", "latency-client", "hold-client", "busy-client", "opening-client"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/big", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--rcvbuf", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sha256", default="", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--tail", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="shims: GETs in a row on one connection per round (default 2000)",
    )
    parser.add_argument(
        "--connects",
        type=int,
        default=500,
        help="shims: new connections, one GET each, per round (default 500)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="shims: per iperf3 run (default 3); migration: per download (default 20)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds (default 3 for shims, 1 for migration, 5 for overload)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(SHIM_PATHS),
        help=f"shims: comma-separated, of: {', '.join(SHIM_PATHS)}",
    )
    parser.add_argument(
        "--tick",
        type=float,
        default=0.5,
        help="migration: tick of the roaming deployment (default 0.5, m=1)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=0.25,
        help="migration, reconnect mode: no data this long is a broken connection (default 0.25 s)",
    )
    parser.add_argument(
        "--connections",
        default=",".join(map(str, CONNECTION_COUNTS)),
        help="migration: connection counts across one roam (default 1,100,1000; empty to skip)",
    )
    parser.add_argument(
        "--connections-tick",
        type=float,
        default=2.0,
        help="migration: tick of the deployment the connection counts roam in (default 2; "
        "thousands of connections from one client need epochs longer than their hand-over)",
    )
    parser.add_argument(
        "--live-relay",
        choices=LIVE_RELAYS,
        default="copy",
        help="migration: the live server shims' --live-relay (default copy)",
    )
    parser.add_argument(
        "--range-bodies",
        choices=RANGE_BODIES,
        default="hash",
        help="migration: the live server shims' --range-bodies (default hash)",
    )
    parser.add_argument(
        "--no-streams",
        action="store_true",
        help="migration: skip the downloads (pauses and goodput), only RTT and connections",
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="shims: skip the iperf3 runs and HTTP downloads, measure GET latency only",
    )
    parser.add_argument(
        "--http-mib",
        type=int,
        default=HTTP_BULK_MIB,
        help=f"shims: size of the file curl downloads {HTTP_COPIES} times on one connection "
        f"from nginx per path and round (default {HTTP_BULK_MIB}; 0 to skip)",
    )
    parser.add_argument(
        "--stream-mib",
        type=int,
        default=BIG_MIB,
        help=f"migration: size of the file the downloads fetch again and again on one "
        f"connection (default {BIG_MIB}; 1 to 4096: a hand-over must cost the same whatever it)",
    )
    parser.add_argument(
        "--opening",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="migration: also open new connections one after another (a GET each) this long, "
        "live, with one server and roaming: how many waited a second for a SYN sent again "
        "(default 0: not measured)",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="overload: copy each run's shim event logs (JSON lines) into DIR, which must exist "
        "(run-N-HOST.jsonl): why a run broke connections, after the lab is gone",
    )
    parser.add_argument("subcommand", nargs="?", choices=("shims", "migration", "overload"))
    args = parser.parse_args(argv)
    if args.role == "stream-client":
        print(
            json.dumps(
                stream_client(
                    args.host,
                    args.port,
                    args.path,
                    args.seconds or 10.0,
                    rate=args.rate,
                    rcvbuf=args.rcvbuf,
                    stall_timeout=args.stall_timeout,
                    expected_sha256=args.sha256,
                )
            )
        )
        return 0
    if args.role == "latency-client":
        print(
            json.dumps(
                latency_client(args.host, args.port, args.path, args.requests, args.connects)
            )
        )
        return 0
    if args.role == "busy-client":
        busy_client(
            args.host, args.port, args.path, args.rate, args.seconds or 20.0, args.interval,
            args.tail,
        )  # fmt: skip
        return 0
    if args.role == "opening-client":
        print(json.dumps(opening_client(args.host, args.port, args.path, args.seconds or 10.0)))
        return 0
    if args.role == "hold-client":
        hold_client(args.host, args.port, args.path, args.count)
        return 0
    if args.subcommand is None:
        parser.error("choose a subcommand: shims, migration or overload")
    if os.geteuid() != 0:
        parser.error("the benchmark builds network namespaces: run it as root")
    try:
        if args.subcommand == "shims":
            paths = [p.strip() for p in args.paths.split(",") if p.strip()]
            unknown = [p for p in paths if p not in SHIM_PATHS]
            if unknown or not paths:
                parser.error(f"unknown paths {unknown}; choose from {', '.join(SHIM_PATHS)}")
            seconds = args.seconds or 3.0
            repeat = args.repeat or 3
            if not 1 <= repeat <= 100 or not 0 < seconds <= 600:
                parser.error("--repeat must be in [1, 100] and --seconds in (0, 600]")
            if not 0 <= args.http_mib <= 4096:
                parser.error("--http-mib must be in [0, 4096]")
            results = run_shims(
                0.0 if args.latency_only else seconds,
                repeat,
                args.requests,
                args.connects,
                paths,
                progress,
                http_mib=args.http_mib,
            )
            print(json.dumps(results, indent=2) if args.json else render_shims(results))
        elif args.subcommand == "overload":
            repeat = args.repeat or 5
            if not 1 <= repeat <= 50:
                parser.error("--repeat must be in [1, 50]")
            if args.keep_logs is not None and not args.keep_logs.is_dir():
                parser.error(f"--keep-logs: {args.keep_logs} is not a directory")
            results = run_overload(repeat, progress, keep_logs=args.keep_logs)
            print(json.dumps(results, indent=2) if args.json else render_overload(results))
        else:
            seconds = args.seconds or 20.0
            repeat = args.repeat or 1
            if not 1 <= repeat <= 20 or not 2 <= seconds <= 600:
                parser.error("--repeat must be in [1, 20] and --seconds in [2, 600]")
            if not 1 <= args.stream_mib <= 4096:
                parser.error("--stream-mib must be in [1, 4096]")
            try:
                counts = [int(c) for c in args.connections.split(",") if c.strip()]
            except ValueError:
                parser.error(
                    f"--connections: not a comma-separated list of counts: {args.connections!r}"
                )
            if not all(1 <= c <= MAX_CONNECTIONS for c in counts):
                parser.error(f"--connections: each count must be in [1, {MAX_CONNECTIONS}]")
            if not 0.5 <= args.connections_tick <= 60:
                parser.error("--connections-tick must be in [0.5, 60]")
            if not (args.opening == 0 or 2 <= args.opening <= 600):
                parser.error("--opening must be 0 or in [2, 600]")
            results = run_migration(
                seconds,
                repeat,
                args.tick,
                args.stall_timeout,
                counts,
                progress,
                with_streams=not args.no_streams,
                stream_mib=args.stream_mib,
                connections_tick=args.connections_tick,
                opening_s=args.opening,
                live_server_args=(
                    "--live-relay",
                    args.live_relay,
                    "--range-bodies",
                    args.range_bodies,
                ),
            )
            print(json.dumps(results, indent=2) if args.json else render_migration(results))
    except (LabError, RuntimeError) as error:
        print(f"roaming benchmark: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
