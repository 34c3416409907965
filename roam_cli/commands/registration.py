"""Offline registration: ``roam init``, ``subscribe``, ``revoke`` and ``inspect``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrate.activeset import check_active
from migrate.chainindex import sealed_size
from migrate.endpoints import parse_address, parse_address_and_port, parse_server_list
from migrate.errors import ConfigError, RoamError
from migrate.hashchain import DEFAULT_INDEX_SPACING, build_index
from migrate.kernel.deployment import DeploymentDir, random_bytes, read_file, write_new
from migrate.registration import (
    DEFAULT_ROAMING_PORT,
    DEPLOYMENT_ID_BYTES,
    Bundle,
    ClientRecord,
    Deployment,
    DeploymentSecret,
    check_name,
    fingerprint,
)
from migrate.schedule import EpochSchedule, MSchedule, check_m, index_units, m_tag
from migrate.shamir import Share
from roam_cli.args import (
    non_negative_int,
    positive_int,
    positive_seconds,
    seconds,
    server_list,
    unix_time,
)
from roam_cli.recorded import (
    bundle_schedule,
    bundle_state_path,
    current_m,
    deployment_schedule,
    recorded_state,
)

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: Subparsers) -> None:
    init = subparsers.add_parser(
        "init",
        help="create a deployment directory (offline)",
        description="Draw the chain key K_n and the group key and write a new deployment "
        "directory: deployment.json (public), secret.json and clients.sealed (0600).",
    )
    init.add_argument("directory", metavar="DIR", type=Path)
    init.add_argument(
        "--servers",
        required=True,
        type=server_list,
        metavar="IP:PORT,...",
        help="the server pool, in schedule order",
    )
    init.add_argument(
        "--vip",
        required=True,
        metavar="IP[:PORT]",
        help="stable address clients connect to (port: the first server's)",
    )
    init.add_argument("--chain-length", required=True, type=positive_int, metavar="N")
    init.add_argument(
        "--m", required=True, type=int, metavar="M", help="epoch lengths range over 1..2^M ticks"
    )
    init.add_argument("--tick", required=True, type=positive_seconds, metavar="SECONDS")
    init.add_argument(
        "--start",
        type=unix_time,
        metavar="UNIX",
        help="start of epoch 1 (default: now, to the whole second)",
    )
    init.add_argument(
        "--delta",
        type=seconds,
        default=0.1,
        metavar="S",
        help="clock skew bound between servers (default 0.1)",
    )
    init.add_argument(
        "--gamma",
        type=seconds,
        default=0.1,
        metavar="S",
        help="network delay estimate (default 0.1)",
    )
    init.add_argument(
        "--active",
        type=int,
        default=1,
        metavar="K",
        help="k of N: servers active in every epoch, 1..number of servers (default 1; "
        "PROTOCOL.md section 4). Each client's server in the set is re-drawn every epoch",
    )
    init.add_argument(
        "--no-index",
        dest="index",
        action="store_false",
        help="do not build the chain index now (servers then start by hashing from K_n: "
        "one hash per epoch; build it later with 'roam index')",
    )
    init.set_defaults(handler=run_init)

    index = subparsers.add_parser(
        "index",
        help="build the sealed chain index that lets servers start fast (offline)",
        description="Walk the whole chain once from K_n (one hash per epoch, with progress "
        "and an estimate on stderr) and store every 2^16-th key, sealed with the group key, in "
        "DIR/chain-index.sealed. A server then reaches any epoch with at most 3 x 2^16 hashes. "
        "'roam init' does this unless given --no-index.",
    )
    index.add_argument("directory", metavar="DIR", type=Path)
    index.set_defaults(handler=run_index)

    subscribe = subparsers.add_parser(
        "subscribe",
        help="register a client and write its bundle (offline)",
        description="Add NAME to the legitimate-client list and write its bundle: channel key "
        "K_C, chain key K_T for the last epoch T it may follow, the VIP and the sealed server "
        "list.",
    )
    subscribe.add_argument("directory", metavar="DIR", type=Path)
    subscribe.add_argument("name", metavar="NAME")
    subscribe.add_argument(
        "--address", required=True, metavar="IP", help="the client's source address"
    )
    subscribe.add_argument("--until-epoch", required=True, type=positive_int, metavar="T")
    subscribe.add_argument("--out", required=True, type=Path, metavar="FILE")
    subscribe.add_argument(
        "--roaming-port",
        type=positive_int,
        default=DEFAULT_ROAMING_PORT,
        metavar="PORT",
        help=f"UDP port for roaming updates (default {DEFAULT_ROAMING_PORT})",
    )
    subscribe.add_argument(
        "--lease-epochs",
        type=non_negative_int,
        default=0,
        metavar="L",
        help="extend online to L epochs past the current one (default 0: no online extension)",
    )
    subscribe.add_argument(
        "--expires-epoch",
        type=non_negative_int,
        default=0,
        metavar="E",
        help="never extend past epoch E (default: the chain's end)",
    )
    subscribe.add_argument(
        "--rate-kbit",
        type=non_negative_int,
        default=0,
        metavar="KBIT",
        help="rate contract in kbit/s (default 0: none)",
    )
    subscribe.add_argument(
        "--chain-index",
        action="store_true",
        help="make the bundle carry a sealed index of its keys K_1..K_T (built now: two "
        "hashes per epoch up to T; 40 bytes per 2^16 epochs) so the client starts fast "
        "however large T is; worth it when T is above about 2^20",
    )
    subscribe.set_defaults(handler=run_subscribe)

    revoke = subparsers.add_parser(
        "revoke",
        help="revoke a client: every server refuses it from now on",
        description="Mark NAME revoked in the legitimate-client list and tell every running "
        "server: each server's gate drops the client's packets as soon as it applies the "
        "revocation (within seconds; a server that misses it learns it from the others), "
        "the servers stop sending it roaming updates and key extensions and refuse its "
        "hand-overs. The keys it holds still compute the schedule (the chain is one-way), "
        "but no server lets it in.",
    )
    revoke.add_argument("directory", metavar="DIR", type=Path)
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument(
        "--no-notify",
        dest="notify",
        action="store_false",
        help="only change the list; do not tell running servers (they learn it when they "
        "re-read the list: 'roam reload' or a restart, and then from each other)",
    )
    revoke.add_argument("--control-port", type=positive_int, default=47475, metavar="PORT")
    revoke.set_defaults(handler=run_revoke)

    inspect = subparsers.add_parser(
        "inspect",
        help="show a deployment, bundle or share without printing secrets",
        description="Show what PATH (a deployment directory, a bundle, a client's saved state "
        "BUNDLE.state or a key share) holds. "
        "Secrets appear only as fingerprints.",
    )
    inspect.add_argument("path", metavar="PATH", type=Path)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=run_inspect)


def run_init(args: argparse.Namespace) -> int:
    servers = parse_server_list(args.servers)
    vip_endpoint = parse_address_and_port(args.vip, servers[0].port)
    vip, service_port = vip_endpoint.address, vip_endpoint.port
    start = float(round(time.time())) if args.start is None else args.start
    try:
        check_active(args.active, len(servers))
    except ConfigError as error:
        raise ConfigError(f"--active: {error}") from None
    deployment = Deployment(
        deployment_id=random_bytes(DEPLOYMENT_ID_BYTES),
        servers=servers,
        vip=vip,
        service_port=service_port,
        chain_length=args.chain_length,
        m=MSchedule(check_m(args.m)),
        tick=args.tick,
        start=start,
        delta=args.delta,
        gamma=args.gamma,
        active=args.active,
    )
    secret = DeploymentSecret.generate(deployment.deployment_id, random_bytes)
    directory = DeploymentDir(args.directory)
    directory.create(deployment, secret)
    active = f" ({deployment.active} active per epoch)" if deployment.active > 1 else ""
    print(
        f"created deployment {deployment.deployment_id.hex()} in {args.directory}: "
        f"{len(servers)} servers{active}, chain of {deployment.chain_length} epochs, VIP "
        f"{vip}:{service_port}"
    )
    if args.index:
        build_chain_index(directory, deployment, secret)
    return 0


def run_index(args: argparse.Namespace) -> int:
    directory = DeploymentDir(args.directory)
    with directory.locked():
        build_chain_index(directory, directory.deployment(), directory.secret())
    return 0


class _Progress:
    """Progress and time left on stderr: a rewritten line on a terminal, else every 10%."""

    def __init__(self, total_hashes: int) -> None:
        self.total_hashes = total_hashes
        self.started = time.monotonic()
        self.shown = -1.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        fraction = done / total
        if done < total and (
            (self.tty and now - self.shown < 0.5) or (not self.tty and fraction < self.shown + 0.1)
        ):
            return
        self.shown = now if self.tty else fraction
        elapsed = now - self.started
        left = elapsed / fraction - elapsed if fraction else 0.0
        line = (
            f"chain index: {fraction:6.1%} of {self.total_hashes:,} hashes, about {left:.0f} s left"
        )
        end = "\n" if done == total or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def build_chain_index(
    directory: DeploymentDir, deployment: Deployment, secret: DeploymentSecret
) -> None:
    """Walk the chain once (O(n), progress on stderr) and store its sealed pebble index."""
    spacing = DEFAULT_INDEX_SPACING
    started = time.monotonic()
    progress = _Progress(2 * (deployment.chain_length - 1))  # a step and a length per epoch
    m = deployment.m
    index = build_index(
        secret.chain_key, deployment.chain_length, spacing, progress, index_units(m), m_tag(m)
    )
    directory.save_chain_index(index, secret)
    print(
        f"chain index: {index.count} keys (every {spacing} epochs, "
        f"{sealed_size(deployment.chain_length, spacing):,} bytes sealed) in "
        f"{time.monotonic() - started:.1f} s; servers start within {3 * spacing:,} hashes"
    )


def run_subscribe(args: argparse.Namespace) -> int:
    directory = DeploymentDir(args.directory)
    name = check_name(args.name)
    address = parse_address(args.address, "--address")
    if args.out.exists():
        raise ConfigError(f"{args.out} already exists; refusing to overwrite it")
    with directory.locked():
        deployment = directory.deployment()
        secret = directory.secret_with_index()
        if address.version != deployment.vip.version:
            raise ConfigError(f"--address {address} is not of the VIP's IP version")
        if args.until_epoch > deployment.chain_length:
            raise ConfigError(
                f"--until-epoch {args.until_epoch} is past the chain's last epoch "
                f"{deployment.chain_length}"
            )
        if args.expires_epoch and args.expires_epoch > deployment.chain_length:
            raise ConfigError("--expires-epoch is past the chain's last epoch")
        clients = directory.clients(secret)
        record = ClientRecord(
            name=name,
            client_id=clients.next_client_id(),
            address=address,
            roaming_port=args.roaming_port,
            channel_key=random_bytes(32),
            until_epoch=args.until_epoch,
            lease_epochs=args.lease_epochs,
            expires_epoch=args.expires_epoch,
            rate_kbit=args.rate_kbit,
        )
        updated = clients.add(record)
        holder = next((c for c in clients.clients if c.address == address and not c.revoked), None)
        if holder is not None:
            # The gate, the contracts and the migration port know a client by its address:
            # two clients at one address could act for each other there.
            raise ConfigError(
                f"--address {address} is already subscribed as client {holder.name!r}; "
                "revoke it first or give this client its own address"
            )
        # The bundle carries the m schedule as it runs now (recorded threat changes), so its
        # client starts on the servers' schedule rather than waiting for its first update.
        current = replace(deployment, m=current_m(directory, deployment))
        bundle = Bundle.issue(current, secret, record, random_bytes)
        if args.chain_index:
            bundle = bundle.with_index(random_bytes, _Progress(2 * (bundle.key_index - 1)))
        write_new(args.out, bundle.encode())
        directory.save_clients(updated, secret)
    print(
        f"subscribed {name} (client id {record.client_id}) until epoch {args.until_epoch}; "
        f"bundle written to {args.out}"
    )
    return 0


REVOKE_ATTEMPTS = 10


def run_revoke(args: argparse.Namespace) -> int:
    revoke_client(DeploymentDir(args.directory), args.name, args.notify, args.control_port)
    return 0


def revoke_client(
    directory: DeploymentDir, name: str, notify: bool = True, control_port: int = 47475
) -> dict[str, str]:
    """Revoke ``name`` in the operator's list and (``notify``) tell every server, printing
    what happened; returns server -> "applied" | "refused" | "no answer" (empty without
    ``notify``). ``roam revoke`` and ``roam suspects --revoke-above`` both come here."""
    from migrate.antientropy import CONVERGENCE_PERIODS
    from migrate.control import Revoke
    from roam_cli.commands.control import send_to_pool

    with directory.locked():
        secret = directory.secret()
        clients = directory.clients(secret).revoke(name)
        directory.save_clients(clients, secret)
    print(f"revoked {name}: every server that applies it refuses the client from now on")
    if not notify:
        return {}
    # Running servers loaded the list at start; tell them now, retrying each second until
    # each answers (UDP may lose the message or the answer). Servers also pass their
    # revocations on to each other every sync period (migrate.antientropy): one that
    # misses this, or is down, learns it from any live server within the bound.
    results = send_to_pool(
        directory,
        Revoke(clients.by_name(name).client_id),
        control_port,
        attempts=REVOKE_ATTEMPTS,
    )
    absent = (
        "no answer (down or unreachable: it learns the revocation from any live server "
        f"within {CONVERGENCE_PERIODS} sync periods of its return)"
    )
    for server, outcome in results.items():
        print(f"{server}: {absent if outcome == 'no answer' else outcome}")
    return results


def _deployment_summary(deployment: Deployment) -> dict[str, Any]:
    return {
        "deployment_id": deployment.deployment_id.hex(),
        "servers": [str(server) for server in deployment.servers],
        "vip": f"{deployment.vip}:{deployment.service_port}",
        "chain_length": deployment.chain_length,
        "m": deployment.m.as_mapping(),
        "tick": deployment.tick,
        "start": deployment.start,
        "delta": deployment.delta,
        "gamma": deployment.gamma,
        "active": deployment.active,
    }


def _current_epoch(schedule: EpochSchedule, now: float) -> dict[str, Any] | str:
    first = schedule.anchor
    if first.epoch == 1 and now < first.time:
        # Right after ``roam init`` (its --start is in the future, or now rounded up).
        return f"not started: epoch 1 starts in {first.time - now:.1f} s"
    try:
        epoch = schedule.epoch_at(now)
    except RoamError as error:
        return str(error)
    return {"epoch": epoch.index, "server": str(epoch.server), "ends_in": round(epoch.end - now, 3)}


def inspect_deployment(directory: DeploymentDir) -> dict[str, Any]:
    deployment = directory.deployment()
    info: dict[str, Any] = {"kind": "deployment", **_deployment_summary(deployment)}
    if not directory.has_secret():
        info["secret"] = "absent (restore it with 'roam keys combine ... --into DIR')"
        return info
    secret = directory.secret()
    info["secret"] = {
        "chain_key": f"fingerprint {fingerprint(secret.chain_key)}",
        "group_key": f"fingerprint {fingerprint(secret.group_key)}",
    }
    schedule = deployment_schedule(directory, deployment, secret)
    state = recorded_state(directory, deployment)
    if state is not None:
        info["recorded"] = {
            "m": schedule.params.m.as_mapping(),
            "anchor": "none"
            if state.anchor is None
            else {"epoch": state.anchor.epoch, "time": state.anchor.time},
        }
    info["now"] = _current_epoch(schedule, time.time())
    clients = directory.clients(secret)
    info["client_list_generation"] = clients.generation
    info["clients"] = [
        {
            "name": client.name,
            "client_id": client.client_id,
            "address": str(client.address),
            "roaming_port": client.roaming_port,
            "until_epoch": client.until_epoch,
            "lease_epochs": client.lease_epochs,
            # 0 in the list means the chain's end: show the epoch it is.
            "expires_epoch": client.expires_epoch or deployment.chain_length,
            "rate_kbit": client.rate_kbit,
            "revoked": client.revoked,
            "channel_key": f"fingerprint {fingerprint(client.channel_key)}",
        }
        for client in clients.clients
    ]
    return info


def inspect_bundle(bundle: Bundle, path: Path | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kind": "bundle",
        "deployment_id": bundle.deployment_id.hex(),
        "name": bundle.name,
        "client_id": bundle.client_id,
        "address": str(bundle.address),
        "roaming_port": bundle.roaming_port,
        "vip": f"{bundle.vip}:{bundle.service_port}",
        "servers": [str(server) for server in bundle.servers()],
        "key_index": bundle.key_index,
        "chain_key": f"fingerprint {fingerprint(bundle.chain_key)}",
        "channel_key": f"fingerprint {fingerprint(bundle.channel_key)}",
        "chain_length": bundle.chain_length,
        "m": bundle.m.as_mapping(),
        "tick": bundle.tick,
        "start": bundle.start,
        "delta": bundle.delta,
        "gamma": bundle.gamma,
        "active": bundle.active,
    }
    state_path = None if path is None else bundle_state_path(path)
    schedule = bundle_schedule(bundle, state_path)
    if state_path is not None and state_path.exists():
        info["state"] = {
            "path": str(state_path),
            "key_index": schedule.chain.held_index,
            "m": schedule.params.m.as_mapping(),
        }
    info["now"] = _current_epoch(schedule, time.time())
    return info


def inspect_client_state(data: bytes) -> dict[str, Any]:
    """A client shim's saved state (``BUNDLE.state``): what it holds beyond its bundle."""
    from client_shim.state import ClientState

    state = ClientState.decode(data)
    return {
        "kind": "client state",
        "deployment_id": state.deployment_id.hex(),
        "client_id": state.client_id,
        "key_index": state.key_index,
        "chain_key": f"fingerprint {fingerprint(state.chain_key)}",
        "m": state.m.as_mapping(),
        "update_senders_seen": len(state.counters),
        "counter_floor": state.counter_floor,
    }


def inspect_share(share: Share) -> dict[str, Any]:
    return {
        "kind": "share",
        "deployment_id": share.deployment_id.hex(),
        "generation": share.generation.hex(),
        "index": share.index,
        "threshold": share.threshold,
        "shares": share.total,
        "value": f"fingerprint {fingerprint(share.value)}",
    }


def inspect_path(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return inspect_deployment(DeploymentDir(path))
    data = read_file(path, "file")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{path} is neither a deployment directory nor a JSON file") from None
    kind = document.get("format") if isinstance(document, dict) else None
    try:
        if kind == "server-roaming/bundle":
            return inspect_bundle(Bundle.decode(data), path)
        if kind == "server-roaming/share":
            return inspect_share(Share.decode(data))
        if kind == "server-roaming/deployment":
            return inspect_deployment(DeploymentDir(path.parent))
        if kind == "server-roaming/client-state":
            return inspect_client_state(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    raise ConfigError(
        f"{path}: not a server-roaming deployment, bundle, client state (BUNDLE.state) or share"
    )


def _print_human(info: dict[str, Any], indent: str = "") -> None:
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_human(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                first, *rest = item.items()
                print(f"{indent}  - {first[0]}: {first[1]}")
                for sub_key, sub_value in rest:
                    print(f"{indent}    {sub_key}: {sub_value}")
        elif isinstance(value, list):
            print(f"{indent}{key}: {', '.join(map(str, value)) or '(none)'}")
        else:
            print(f"{indent}{key}: {value}")


def run_inspect(args: argparse.Namespace) -> int:
    info = inspect_path(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_human(info)
    return 0
