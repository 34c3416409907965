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
from migrate.control import (
    OPERATOR,
    Ack,
    ControlChannel,
    ControlMessage,
    Revoke,
    StateQuery,
    StateReport,
    Threat,
    Trigger,
)
from migrate.errors import ConfigError, RoamError
from migrate.kernel.deployment import DeploymentDir
from migrate.kernel.files import write_private
from migrate.pool import PoolState, ServerPool
from migrate.schedule import check_m
from migrate.strictjson import dump_object, parse_object
from roam_cli.args import positive_int, positive_seconds
from roam_cli.recorded import latest_state

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

    resync = subparsers.add_parser(
        "resync",
        help="record the servers' current schedule state (threat changes, triggers) here",
        description="Ask every server for its schedule state (its anchor from the last trigger "
        "and its m schedule) and record it in DIR/state/operator.json, which 'roam threat', "
        "'trigger', 'inspect', 'schedule' and 'subscribe' read. Needed when that file is "
        "behind the servers (a command cut short, a change made from another host). Refuses, "
        "recording nothing, if no server answers or the servers disagree.",
    )
    resync.add_argument("directory", metavar="DIR", type=Path)
    resync.add_argument("--control-port", type=positive_int, default=47475, metavar="PORT")
    resync.set_defaults(handler=run_resync)


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


def _operator_pool(directory: DeploymentDir) -> ServerPool:
    deployment = directory.deployment()
    secret = directory.secret()
    return ServerPool(
        deployment,
        secret,
        directory.clients(secret),
        deployment.servers[0],
        latest_state(directory.path),
    )


def exchange(
    directory: DeploymentDir,
    message: ControlMessage,
    control_port: int,
    attempts: int = ATTEMPTS,
) -> dict[str, ControlMessage | None]:
    """Send ``message`` to every server, each attempt (``ATTEMPT_TIMEOUT_S``) to those that
    have not answered yet; returns server -> its authenticated answer (an ``Ack`` or a
    ``StateReport`` naming the message's counter), or None if none came."""
    deployment = directory.deployment()
    secret = directory.secret()
    channel = ControlChannel(secret.group_key, deployment.deployment_id, OPERATOR)
    channel.sealer.keep_counters(operator_counters(directory.path))
    answers: dict[str, ControlMessage | None] = {str(server): None for server in deployment.servers}
    family = socket.AF_INET6 if deployment.vip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        # The same sealed bytes on every attempt: a server that applied the message but whose
        # answer was lost sees a replay and repeats its answer instead of applying it twice.
        data = channel.seal(message, time.time())
        counter = channel.sealer.last_counter
        for _attempt in range(attempts):
            pending = [s for s in deployment.servers if answers[str(s)] is None]
            if not pending:
                break
            for server in pending:
                sock.sendto(data, (str(server.address), control_port))
            deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
            while time.monotonic() < deadline and any(answers[str(s)] is None for s in pending):
                ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                reply, _source = sock.recvfrom(65536)
                try:
                    opened, answer = channel.open(reply, time.time())
                except RoamError:
                    continue
                if not isinstance(answer, Ack | StateReport) or answer.counter != counter:
                    continue
                channel.accept(opened)
                if opened.header.sender < len(deployment.servers):
                    answers[str(deployment.servers[opened.header.sender])] = answer
    return answers


def send_to_pool(
    directory: DeploymentDir,
    message: Threat | Trigger | Revoke,
    control_port: int,
    attempts: int = ATTEMPTS,
) -> dict[str, str]:
    """``exchange`` a control message; returns server -> "applied" | "refused" | "no answer"."""
    outcomes = {}
    for server, answer in exchange(directory, message, control_port, attempts).items():
        if isinstance(answer, Ack):
            outcomes[server] = "applied" if answer.accepted else "refused"
        else:
            outcomes[server] = "no answer"
    return outcomes


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


def _record(
    directory: DeploymentDir,
    pool: ServerPool,
    message: Threat | Trigger,
    now: float,
    results: dict[str, str],
) -> None:
    """Record what the servers applied before anything is reported: a report cut short (a
    closed standard output, ^C) must not leave this host's view of the schedule behind the
    servers', or every later trigger is refused. One server that applied it is enough: its
    schedule changed, and the others are refused until they agree (``roam resync``)."""
    if "applied" in results.values():
        pool.apply(message, now)
        _save_operator_state(directory, pool)


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
    results = send_to_pool(directory, message, args.control_port)
    _record(directory, pool, message, now, results)
    return _report(results, "the threat change")


def run_trigger(args: argparse.Namespace) -> int:
    directory = DeploymentDir(args.deployment)
    pool = _operator_pool(directory)
    now = time.time()
    message = pool.make_trigger(now)
    print(
        f"leaving epoch {message.leave_epoch} on {pool.schedule.server_for(message.leave_epoch)}"
        f" for epoch {message.next_epoch} on {pool.schedule.server_for(message.next_epoch)}"
    )
    results = send_to_pool(directory, message, args.control_port)
    _record(directory, pool, message, now, results)
    return _report(results, "the trigger")


def _describe(report: StateReport) -> str:
    anchor = (
        "no trigger (anchored at the start)"
        if report.anchor is None
        else f"anchored at epoch {report.anchor.epoch} from {report.anchor.time:.6f}"
    )
    changes = ", ".join(f"m = {m} from epoch {e}" for e, m in report.m.changes)
    return f"{anchor}; m = {report.m.initial}" + (f", then {changes}" if changes else "")


def run_resync(args: argparse.Namespace) -> int:
    directory = DeploymentDir(args.directory)
    deployment = directory.deployment()
    answers = exchange(directory, StateQuery(), args.control_port)
    reports = {s: a for s, a in answers.items() if isinstance(a, StateReport)}
    for server, answer in answers.items():
        print(f"{server}: {_describe(answer) if isinstance(answer, StateReport) else 'no answer'}")
    if not reports:
        raise ConfigError(
            "no server answered; nothing recorded (run it where every server's control port "
            f"{args.control_port}/udp is reachable)"
        )
    states = {(r.anchor, r.m) for r in reports.values()}
    if len(states) > 1:
        raise ConfigError(
            "the servers disagree on the schedule; nothing recorded (see their logs; run "
            "'roam resync' again once they agree)"
        )
    anchor, m = states.pop()
    previous = latest_state(directory.path)
    state = PoolState(deployment.deployment_id, anchor, m)
    if previous is not None and previous.deployment_id == deployment.deployment_id:
        state.revoked = set(previous.revoked)
    path = operator_state_path(directory.path)
    write_private(path, state.encode())
    missing = [server for server, answer in answers.items() if answer is None]
    note = f" ({len(missing)} server(s) did not answer)" if missing else ""
    print(f"recorded in {path}{note}")
    return 0
