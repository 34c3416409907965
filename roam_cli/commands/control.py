"""``roam threat`` and ``roam trigger``: group control messages to every server of the pool.

The operator's host holds the deployment directory (and so the group key). The command builds
the message from its view of the schedule, sends it to every server's control port, and waits
for each server's authenticated acknowledgement, retrying a few times: UDP may lose a message,
and a server that refuses one (its schedule disagrees) logs why and answers "refused".
"""

from __future__ import annotations

import argparse
import select
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from migrate.channel import CounterFloor
from migrate.control import OPERATOR, Ack, ControlChannel, Revoke, Threat, Trigger
from migrate.errors import ConfigError, RoamError
from migrate.kernel.deployment import DeploymentDir
from migrate.kernel.files import write_private
from migrate.pool import PoolState, ServerPool
from migrate.schedule import check_m
from migrate.strictjson import dump_object, parse_object
from roam_cli.args import positive_int, positive_seconds

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

ATTEMPTS = 3
ATTEMPT_TIMEOUT_S = 1.0


def register(subparsers: Subparsers) -> None:
    threat = subparsers.add_parser(
        "threat",
        help="change the threat level m on every server from a future epoch",
        description="Epochs from L on use m = M (epoch lengths 1..2^M ticks). L defaults to "
        "the first epoch starting at least --lead seconds from now, so that every client "
        "hears of it through its periodic updates before it takes effect.",
    )
    threat.add_argument("--deployment", required=True, type=Path, metavar="DIR")
    threat.add_argument("--m", required=True, type=int, metavar="M")
    threat.add_argument("--from-epoch", type=positive_int, metavar="L")
    threat.add_argument(
        "--lead",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="minimum time before the change takes effect (default 10)",
    )
    threat.add_argument("--control-port", type=positive_int, default=47475, metavar="PORT")
    threat.set_defaults(handler=run_threat)

    trigger = subparsers.add_parser(
        "trigger",
        help="reactive roam: the service leaves its current server now",
        description="As after an intrusion alarm: the current epoch ends now and the schedule "
        "jumps to the next epoch on another server. Clients learn it from the next update.",
    )
    trigger.add_argument("--deployment", required=True, type=Path, metavar="DIR")
    trigger.add_argument("--control-port", type=positive_int, default=47475, metavar="PORT")
    trigger.set_defaults(handler=run_trigger)


COUNTER_FORMAT = "server-roaming/operator-counter"


def operator_state_path(directory: Path) -> Path:
    return directory / "state" / "operator.json"


def operator_counter_path(directory: Path) -> Path:
    """The floor under the operator's control-message counters (not ``*.json``: it is no
    server state, which ``_latest_state`` looks for)."""
    return directory / "state" / "operator.counter"


def operator_counters(directory: Path) -> CounterFloor:
    """The operator's counters start above what its last command reserved: two commands
    never seal under one nonce, even if this host's clock went back between them."""
    path = operator_counter_path(directory)
    floor = 0
    if path.exists():
        fields = parse_object(path.read_bytes(), COUNTER_FORMAT, 1)
        floor = fields.integer("floor", 0)
        fields.done()

    def save(value: int) -> None:
        try:
            # fsync-ed before the command seals under the reserved counters: after a crash the
            # floor on disk is at least what any sent message used.
            write_private(path, dump_object(COUNTER_FORMAT, 1, {"floor": value}))
        except OSError as error:
            raise ConfigError(f"cannot write {path}: {error.strerror}") from None

    return CounterFloor(floor, save)


def _latest_state(directory: Path) -> PoolState | None:
    """The most recent view of the pool's run-time state this host has."""
    candidates = sorted((directory / "state").glob("*.json"), key=lambda path: path.stat().st_mtime)
    for path in reversed(candidates):
        try:
            return PoolState.decode(path.read_bytes())
        except RoamError:
            continue
    return None


def _operator_pool(directory: DeploymentDir) -> ServerPool:
    deployment = directory.deployment()
    secret = directory.secret()
    return ServerPool(
        deployment,
        secret,
        directory.clients(secret),
        deployment.servers[0],
        _latest_state(directory.path),
    )


def send_to_pool(
    directory: DeploymentDir,
    message: Threat | Trigger | Revoke,
    control_port: int,
    attempts: int = ATTEMPTS,
) -> dict[str, str]:
    """Send ``message`` to every server, each attempt (``ATTEMPT_TIMEOUT_S``) to those that
    have not answered yet; returns server -> "applied" | "refused" | "no answer"."""
    deployment = directory.deployment()
    secret = directory.secret()
    channel = ControlChannel(secret.group_key, deployment.deployment_id, OPERATOR)
    channel.sealer.keep_counters(operator_counters(directory.path))
    results = {str(server): "no answer" for server in deployment.servers}
    family = socket.AF_INET6 if deployment.vip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        # The same sealed bytes on every attempt: a server that applied the message but whose
        # answer was lost sees a replay and repeats its answer instead of applying it twice.
        data = channel.seal(message, time.time())
        counter = channel.sealer.last_counter
        for _attempt in range(attempts):
            pending = [s for s in deployment.servers if results[str(s)] == "no answer"]
            if not pending:
                break
            for server in pending:
                sock.sendto(data, (str(server.address), control_port))
            deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
            while time.monotonic() < deadline and any(
                results[str(s)] == "no answer" for s in pending
            ):
                ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                reply, _source = sock.recvfrom(2048)
                try:
                    opened, ack = channel.open(reply, time.time())
                except RoamError:
                    continue
                if not isinstance(ack, Ack) or ack.counter != counter:
                    continue
                channel.accept(opened)
                if opened.header.sender < len(deployment.servers):
                    server = deployment.servers[opened.header.sender]
                    results[str(server)] = "applied" if ack.accepted else "refused"
    return results


def _report(results: dict[str, str], what: str) -> int:
    for server, outcome in results.items():
        print(f"{server}: {outcome}")
    failed = [server for server, outcome in results.items() if outcome != "applied"]
    if failed:
        raise ConfigError(
            f"{what} not applied on {', '.join(failed)} (see those servers' logs; a server that "
            "did not answer may be down)"
        )
    return 0


def _save_operator_state(directory: DeploymentDir, pool: ServerPool) -> None:
    path = operator_state_path(directory.path)
    write_private(path, pool.state.encode())


def run_threat(args: argparse.Namespace) -> int:
    directory = DeploymentDir(args.deployment)
    pool = _operator_pool(directory)
    check_m(args.m)
    now = time.time()
    current = pool.schedule.epoch_at(now).index
    from_epoch = args.from_epoch
    if from_epoch is None:
        from_epoch = current + 1
        while pool.schedule.start_of(from_epoch) < now + args.lead:
            from_epoch += 1
    message = Threat(args.m, from_epoch)
    pool.validate(message, now)
    print(
        f"m = {args.m} from epoch {from_epoch} (starts at "
        f"{pool.schedule.start_of(from_epoch):.3f}; now in epoch {current})"
    )
    status = _report(send_to_pool(directory, message, args.control_port), "the threat change")
    pool.apply(message, now)
    _save_operator_state(directory, pool)
    return status


def run_trigger(args: argparse.Namespace) -> int:
    directory = DeploymentDir(args.deployment)
    pool = _operator_pool(directory)
    now = time.time()
    message = pool.make_trigger(now)
    print(
        f"leaving epoch {message.leave_epoch} on {pool.schedule.server_for(message.leave_epoch)}"
        f" for epoch {message.next_epoch} on {pool.schedule.server_for(message.next_epoch)}"
    )
    status = _report(send_to_pool(directory, message, args.control_port), "the trigger")
    pool.apply(message, now)
    _save_operator_state(directory, pool)
    return status
