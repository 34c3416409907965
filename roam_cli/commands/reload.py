"""``roam reload``: make running server shims re-read the client list (SIGHUP)."""

from __future__ import annotations

import argparse
import os
import signal
from typing import TYPE_CHECKING

from migrate.errors import ConfigError
from roam_cli.args import positive_int

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: Subparsers) -> None:
    reload = subparsers.add_parser(
        "reload",
        help="make the server shims of this host re-read clients.sealed (SIGHUP)",
        description="Send SIGHUP to every server shim running in this host's network "
        "namespace (or to --pid): each re-reads DIR/clients.sealed and lets in the clients "
        "subscribed since it started (and keeps out those revoked), without dropping a "
        "connection. Each logs 'clients_reloaded' (or 'reload_failed' with the reason, keeping "
        "its list). Only processes recorded as server shims are signalled.",
    )
    reload.add_argument(
        "--pid", type=positive_int, metavar="PID", help="only the server shim with this pid"
    )
    reload.set_defaults(handler=run_reload)


def run_reload(args: argparse.Namespace) -> int:
    from migrate.kernel.instances import current_netns_inode, instances_dir, live_records

    here = current_netns_inode()
    shims = [
        record
        for _path, record in live_records(instances_dir())
        if record.kind == "server"
        and (record.pid == args.pid or args.pid is None)
        and (args.pid is not None or record.netns_inode == here)
    ]
    if not shims:
        recorded = f"as recorded in {instances_dir()}; nothing signalled"
        if args.pid is not None:
            raise ConfigError(f"pid {args.pid} is not a running server shim ({recorded})")
        raise ConfigError(f"no server shim runs in this network namespace ({recorded})")
    for record in shims:
        os.kill(record.pid, signal.SIGHUP)
        print(f"asked the server shim pid {record.pid} to re-read its client list (SIGHUP)")
    return 0
