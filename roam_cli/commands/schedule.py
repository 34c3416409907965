"""``roam schedule``: print the roaming schedule (PROTOCOL.md section 3)."""

from __future__ import annotations

import argparse
import binascii
import json
import sys
from pathlib import Path

from migrate.activeset import ActiveSchedule, check_client_id
from migrate.endpoints import parse_server_list
from migrate.errors import ConfigError
from migrate.hashchain import KEY_BYTES, MAX_CHAIN_LENGTH, KeyChain
from migrate.kernel.deployment import DeploymentDir, load_bundle
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams, check_m
from roam_cli.args import positive_int, positive_seconds, server_list, unix_time
from roam_cli.recorded import bundle_schedule, bundle_state_path, deployment_schedule

EXPLICIT = ("chain_key", "key_index", "m", "tick", "start", "servers")
DEPRECATED_CHAIN_KEY = (
    "roam: warning: --chain-key puts K_T in the process list, readable by every local user; "
    "use --chain-key-file PATH (or - for standard input)"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="print the roaming schedule from key material, a deployment or a bundle",
        description="Print epochs I .. min(T, I+C-1): start, length and active server. Key "
        "material comes from --chain-key-file/--key-index/--m/--tick/--start/--servers, or "
        "from --deployment DIR, or from --bundle FILE.",
    )
    source = parser.add_argument_group("key material (explicit)")
    source.add_argument(
        "--chain-key-file",
        metavar="PATH",
        type=Path,
        help="file holding K_T as 64 hex digits ('-' reads it from standard input)",
    )
    source.add_argument(
        "--chain-key",
        metavar="HEX",
        help="deprecated: K_T on the command line, where every local user can read it "
        "(/proc/PID/cmdline, ps); use --chain-key-file",
    )
    source.add_argument("--key-index", metavar="T", type=positive_int, help="index T of the key")
    source.add_argument("--m", metavar="M", type=int, help="epoch length parameter, 1..32")
    source.add_argument("--tick", metavar="SECONDS", type=positive_seconds)
    source.add_argument("--start", metavar="UNIX", type=unix_time, help="start of epoch 1")
    source.add_argument("--servers", metavar="HOST:PORT,...", type=server_list)
    files = parser.add_argument_group("key material (from a file)")
    files.add_argument("--deployment", metavar="DIR", type=Path, help="a deployment directory")
    files.add_argument("--bundle", metavar="FILE", type=Path, help="a client bundle")
    files.add_argument(
        "--state",
        metavar="FILE",
        type=Path,
        help="with --bundle: the client's saved key extensions and m changes (default "
        "FILE.state beside the bundle, if it exists)",
    )
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
    parser.add_argument(
        "--active",
        metavar="K",
        type=int,
        help="k of N active servers per epoch (PROTOCOL.md section 4; default: the "
        "deployment's or bundle's k, else 1); prints each epoch's active set",
    )
    parser.add_argument(
        "--clients",
        metavar="ID,ID,...",
        type=client_ids,
        help="client ids (as 'roam inspect DIR' lists them): print each one's server per epoch",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(handler=run)


MAX_CLIENTS = 10_000  # ids on one command line: bounds the output per epoch


def client_ids(text: str) -> tuple[int, ...]:
    """``ID,ID,...``: distinct client ids, each in 1..2^32-2."""
    ids: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise argparse.ArgumentTypeError(f"{text!r} has an empty entry")
        try:
            value = check_client_id(int(item, 10))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a client id (an integer)") from None
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if value in ids:
            raise argparse.ArgumentTypeError(f"client id {value} is given twice")
        ids.append(value)
    if len(ids) > MAX_CLIENTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_CLIENTS} ids, got {len(ids)}")
    return tuple(ids)


def _read_chain_key(path: Path) -> str:
    """The hex text of K_T from ``path`` or standard input; the key is never echoed."""
    if str(path) == "-":
        return sys.stdin.read().strip()
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"--chain-key-file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--chain-key-file {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"--chain-key-file {path}: permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--chain-key-file {path} is not hexadecimal") from None


def _chain_key(args: argparse.Namespace) -> None:
    """Resolve --chain-key-file or the deprecated --chain-key into ``args.chain_key``."""
    if args.chain_key is not None and args.chain_key_file is not None:
        raise ConfigError("give either --chain-key-file or --chain-key, not both")
    args.chain_key_deprecated = args.chain_key is not None
    if args.chain_key is not None:
        args.chain_key_source = f"--chain-key {args.chain_key!r}"
    elif args.chain_key_file is not None:
        args.chain_key = _read_chain_key(args.chain_key_file)
        # Name the file, never its content: it is a secret.
        args.chain_key_source = f"--chain-key-file {args.chain_key_file}"


def _flag(name: str) -> str:
    return "--chain-key-file" if name == "chain_key" else "--" + name.replace("_", "-")


def _schedule(args: argparse.Namespace) -> EpochSchedule:
    given = [name for name in EXPLICIT if getattr(args, name) is not None]
    if args.chain_key_file is not None and "chain_key" not in given:
        given.insert(0, "chain_key")
    sources = sum(1 for source in (args.deployment, args.bundle) if source is not None)
    if sources > 1:
        raise ConfigError("give either --deployment or --bundle, not both")
    if sources == 1:
        if given:
            flag = _flag(given[0])
            raise ConfigError(f"{flag} cannot be combined with --deployment or --bundle")
        if args.deployment is not None:
            if args.state is not None:
                raise ConfigError("--state goes with --bundle (a deployment's is in DIR/state)")
            directory = DeploymentDir(args.deployment)
            deployment = directory.deployment()
            args.held_why = "the chain's last epoch"
            args.default_active = deployment.active
            # With the threat changes and triggers recorded in DIR/state (roam threat, trigger,
            # resync): the schedule the servers run, not the one created.
            return deployment_schedule(directory, deployment, directory.secret_with_index())
        bundle = load_bundle(args.bundle)
        state = args.state if args.state is not None else bundle_state_path(args.bundle)
        if args.state is not None and not args.state.exists():
            raise ConfigError(f"--state {args.state} does not exist")
        schedule = bundle_schedule(bundle, state)
        args.default_active = bundle.active
        if schedule.chain.held_index > bundle.key_index:
            args.held_why = f"the client's last key, extended online ({state})"
        else:
            args.held_why = f"the client's last key, from its bundle (--until-epoch; no {state})"
            if state.exists():
                args.held_why = f"the client's last key ({state} holds no extension)"
        return schedule
    missing = [name for name in EXPLICIT if name not in given]
    if missing:
        flags = ", ".join(_flag(name) for name in missing)
        raise ConfigError(f"missing {flags} (or give --deployment DIR or --bundle FILE)")
    _chain_key(args)
    try:
        key = binascii.unhexlify(args.chain_key)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{args.chain_key_source} is not hexadecimal") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{args.chain_key_source} must be {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits)"
        )
    if args.key_index > MAX_CHAIN_LENGTH:
        raise ConfigError(f"--key-index must be at most {MAX_CHAIN_LENGTH}")
    params = ScheduleParams(
        parse_server_list(args.servers), args.tick, args.start, MSchedule(check_m(args.m))
    )
    return EpochSchedule(KeyChain(key, args.key_index), params)


def run(args: argparse.Namespace) -> int:
    if args.state is not None and args.bundle is None and args.deployment is None:
        raise ConfigError("--state goes with --bundle")
    schedule = _schedule(args)
    k = args.active if args.active is not None else getattr(args, "default_active", 1)
    active = ActiveSchedule(schedule, k)  # checks 1 <= k <= N before anything is printed
    # The k of N fields appear when k of N is in play; without it the output is section 3's.
    sets = args.active is not None or args.clients is not None or k > 1
    if args.at is not None and args.first is not None:
        raise ConfigError("give either --from or --at, not both")
    first = schedule.epoch_at(args.at).index if args.at is not None else (args.first or 1)
    held = schedule.chain.held_index
    if first > held:
        why = getattr(args, "held_why", "the key given")
        raise ConfigError(f"epoch {first} is after the last key held (epoch {held}: {why})")
    last = min(held, first + args.count - 1)
    epochs = list(schedule.epochs(first, last - first + 1))  # all computed before printing
    lines = []
    for epoch in epochs:
        members = [str(server) for server in active.active(epoch.index)] if sets else []
        assigned = {
            str(client): str(active.assigned(epoch.index, client)) for client in args.clients or ()
        }
        if args.json:
            record: dict[str, object] = {
                "epoch": epoch.index,
                "start": epoch.start,
                "length": epoch.length,
                "server": str(epoch.server),
            }
            if sets:
                record["active"] = members
            if args.clients is not None:
                record["assigned"] = assigned
            lines.append(json.dumps(record))
        else:
            line = f"{epoch.index:>8}  {epoch.start:>16.3f}  {epoch.length:>10.3f}  {epoch.server}"
            if sets:
                line += "  " + ",".join(members)
            if assigned:
                line += "  " + " ".join(f"{c}={s}" for c, s in assigned.items())
            lines.append(line)
    if not args.json:
        header = f"{'epoch':>8}  {'start':>16}  {'length':>10}  server"
        if sets:
            header += "  active"
        if args.clients:
            header += "  assigned"
        print(header)
    print("\n".join(lines))
    if len(epochs) < args.count:
        # After the output, on stderr: the rows stop early for a reason the reader must see.
        why = getattr(args, "held_why", "the key given")
        print(
            f"roam: note: {len(epochs)} of {args.count} epochs printed: epoch {held} is the "
            f"last one held ({why})",
            file=sys.stderr,
        )
    if getattr(args, "chain_key_deprecated", False):
        # After the output, so that an error stays one line.
        print(DEPRECATED_CHAIN_KEY, file=sys.stderr)
    return 0
