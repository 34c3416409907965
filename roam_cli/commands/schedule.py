"""``roam schedule``: print the roaming schedule (PROTOCOL.md section 3)."""

from __future__ import annotations

import argparse
import binascii
import json
from pathlib import Path

from migrate.endpoints import parse_server_list
from migrate.errors import ConfigError
from migrate.hashchain import KEY_BYTES, MAX_CHAIN_LENGTH, KeyChain
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams, check_m
from roam_cli.args import positive_int, positive_seconds, server_list, unix_time
from roam_cli.store import DeploymentDir, load_bundle

EXPLICIT = ("chain_key", "key_index", "m", "tick", "start", "servers")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="print the roaming schedule from key material, a deployment or a bundle",
        description="Print epochs I .. min(T, I+C-1): start, length and active server. Key "
        "material comes from --chain-key/--key-index/--m/--tick/--start/--servers, or from "
        "--deployment DIR, or from --bundle FILE.",
    )
    source = parser.add_argument_group("key material (explicit)")
    source.add_argument("--chain-key", metavar="HEX", help="K_T, 64 hex digits")
    source.add_argument("--key-index", metavar="T", type=positive_int, help="index T of the key")
    source.add_argument("--m", metavar="M", type=int, help="epoch length parameter, 1..32")
    source.add_argument("--tick", metavar="SECONDS", type=positive_seconds)
    source.add_argument("--start", metavar="UNIX", type=unix_time, help="start of epoch 1")
    source.add_argument("--servers", metavar="HOST:PORT,...", type=server_list)
    files = parser.add_argument_group("key material (from a file)")
    files.add_argument("--deployment", metavar="DIR", type=Path, help="a deployment directory")
    files.add_argument("--bundle", metavar="FILE", type=Path, help="a client bundle")
    parser.add_argument(
        "--from",
        dest="first",
        metavar="I",
        type=positive_int,
        default=None,
        help="first epoch to print (default 1, or the epoch at --at)",
    )
    parser.add_argument(
        "--at",
        metavar="UNIX",
        type=unix_time,
        help="start from the epoch running at this time ('now' for the clock)",
    )
    parser.add_argument(
        "--count", metavar="C", type=positive_int, default=10, help="number of epochs (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(handler=run)


def _schedule(args: argparse.Namespace) -> EpochSchedule:
    explicit = [name for name in EXPLICIT if getattr(args, name) is not None]
    sources = sum(1 for source in (args.deployment, args.bundle) if source is not None)
    if sources > 1:
        raise ConfigError("give either --deployment or --bundle, not both")
    if sources == 1:
        if explicit:
            flag = "--" + explicit[0].replace("_", "-")
            raise ConfigError(f"{flag} cannot be combined with --deployment or --bundle")
        if args.deployment is not None:
            directory = DeploymentDir(args.deployment)
            deployment = directory.deployment()
            chain = directory.secret_with_index().chain(deployment.chain_length)
            return EpochSchedule(chain, deployment.schedule_params())
        bundle = load_bundle(args.bundle)
        return EpochSchedule(bundle.chain(), bundle.schedule_params())
    missing = [name for name in EXPLICIT if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ConfigError(f"missing {flags} (or give --deployment DIR or --bundle FILE)")
    try:
        key = binascii.unhexlify(args.chain_key)
    except (binascii.Error, ValueError):
        raise ConfigError(f"--chain-key {args.chain_key!r} is not hexadecimal") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"--chain-key must be {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits)")
    if args.key_index > MAX_CHAIN_LENGTH:
        raise ConfigError(f"--key-index must be at most {MAX_CHAIN_LENGTH}")
    params = ScheduleParams(
        parse_server_list(args.servers), args.tick, args.start, MSchedule(check_m(args.m))
    )
    return EpochSchedule(KeyChain(key, args.key_index), params)


def run(args: argparse.Namespace) -> int:
    schedule = _schedule(args)
    if args.at is not None and args.first is not None:
        raise ConfigError("give either --from or --at, not both")
    first = schedule.epoch_at(args.at).index if args.at is not None else (args.first or 1)
    held = schedule.chain.held_index
    if first > held:
        raise ConfigError(f"epoch {first} is after the last key held (epoch {held})")
    last = min(held, first + args.count - 1)
    epochs = list(schedule.epochs(first, last - first + 1))  # all computed before printing
    lines = []
    for epoch in epochs:
        if args.json:
            record = {
                "epoch": epoch.index,
                "start": epoch.start,
                "length": epoch.length,
                "server": str(epoch.server),
            }
            lines.append(json.dumps(record))
        else:
            lines.append(
                f"{epoch.index:>8}  {epoch.start:>16.3f}  {epoch.length:>10.3f}  {epoch.server}"
            )
    if not args.json:
        print(f"{'epoch':>8}  {'start':>16}  {'length':>10}  server")
    print("\n".join(lines))
    return 0
