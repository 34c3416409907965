"""``roam demo``: a live download survives the service roaming, on this machine.

Builds a lab (network namespaces: three servers, one client, one outsider), a deployment with
short epochs, python's http.server behind a server shim on each server host and a client shim
on the client; then downloads a file through the VIP with curl while the service hops between
servers, and shows each hand-over as it happens. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from typing import TYPE_CHECKING

from migrate.errors import ConfigError
from roam_cli.args import positive_float, positive_int, positive_seconds

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: Subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="watch a live download survive roams (a lab on this machine, needs root)",
        description="Three servers, one client and an outsider in network namespaces; a file "
        "is downloaded with curl through the VIP while the service roams every second or "
        "so. The download must arrive intact (sha256) although every byte after each roam "
        "comes from another server. Removes everything it created when it ends.",
    )
    demo.add_argument(
        "--size-mib",
        type=positive_int,
        default=96,
        metavar="MIB",
        help="size of the file (default 96)",
    )
    demo.add_argument(
        "--rate-mbit",
        type=positive_float,
        default=64.0,
        metavar="MBIT",
        help="rate of every lab link (tc), so that the transfer spans roams (default 64)",
    )
    demo.add_argument(
        "--tick",
        type=positive_seconds,
        default=1.0,
        metavar="S",
        help="epochs last 1 or 2 ticks (default 1)",
    )
    demo.add_argument("--service", choices=["http", "nginx"], default="http")
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ConfigError("the demo builds network namespaces and firewall rules: run it as root")
    from labs import Lab, PoolTopo
    from labs.params import LinkParams
    from labs.roaming import RoamingLab

    data = os.urandom(args.size_mib * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    print(
        f"lab: 3 servers, 1 client, 1 outsider, links of {args.rate_mbit:g} Mbit/s; "
        f"a {args.size_mib} MiB file on each server"
    )
    links = LinkParams(rate_mbit=args.rate_mbit)
    transfer_s = args.size_mib * 8 * 1.048576 / args.rate_mbit
    wanted = demo_roams(transfer_s, args.tick)
    if wanted == 0:
        print(
            f"note: the download takes about {transfer_s:.1f} s, less than two epochs of "
            f"{args.tick:g} s: it may meet no roam (raise --size-mib or lower --rate-mbit)"
        )
    with Lab(PoolTopo(servers=3, clients=1, outsiders=1, params=links)) as lab:
        pool = RoamingLab(
            lab,
            tick=args.tick,
            m=1,
            migration="live",
            service=args.service,
            content={"file": data},
            # A random chain key may keep one server for a short download: the deployment is
            # drawn again until the schedule roams while the download runs.
            min_switches=wanted,
            switch_window=transfer_s,
        )
        pool.start()
        print(f"deployment: VIP {pool.vip}:80, servers {pool.server_list}")
        pool.wait_for_schedule(0.2)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(pool, stop), daemon=True)
        watcher.start()
        out = pool.workdir / "download"
        started = time.time()
        print(f"client: curl {pool.url('/file')}")
        result = lab["c1"].run(["curl", "-sS", "-o", str(out), pool.url("/file")], timeout=3600)
        stop.set()
        watcher.join(timeout=5)
        elapsed = time.time() - started
        outsider = lab["o1"].run(
            ["curl", "-s", "--max-time", "1", f"http://{lab['s1'].address}:80/file"]
        )
        got = hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else "(nothing)"
        roams = [e for e in pool.clients["c1"].events() if e["event"] == "roam"]
        migrated = sum(e["outcomes"].get("migrated", 0) for e in roams)
        pool.stop()
    print()
    print(f"curl exit status {result.returncode} after {elapsed:.1f} s; {migrated} hand-overs")
    print(f"sha256 sent     {digest}")
    print(f"sha256 received {got}")
    print(f"outsider without a bundle: {'no answer' if outsider.returncode else 'ANSWERED'}")
    ok = result.returncode == 0 and got == digest and outsider.returncode != 0
    print("demo: OK, the download survived every roam intact" if ok else "demo: FAILED")
    return 0 if ok else 1


def demo_roams(transfer_s: float, tick: float) -> int:
    """How many roams the demo's schedule must have while the download runs: an epoch lasts
    one or two ticks, so a schedule can always change server twice in four ticks, once in
    two."""
    if transfer_s >= 4 * tick:
        return 2
    return 1 if transfer_s >= 2 * tick else 0


def _watch(pool: object, stop: threading.Event) -> None:
    from labs.roaming import RoamingLab

    assert isinstance(pool, RoamingLab)
    seen = 0
    while not stop.is_set():
        events = [e for e in pool.clients["c1"].events() if e["event"] == "handoff"]
        for event in events[seen:]:
            host = pool.host_of(str(event["server"]))
            print(
                f"  epoch {event['epoch']:>3}: service moved to {host} ({event['server']}); "
                f"connection {event['outcome']}, pause {event['pause_ms']:.0f} ms"
            )
        seen = len(events)
        time.sleep(0.1)
