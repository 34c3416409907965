"""``roam server`` and ``roam client``: the two daemons, plus client status and systemd units."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrate.admission import MAX_PENDING_PER_CLIENT
from migrate.checkpoint import MIGRATION_MODES, RANGE_BODIES, STREAM_HASHES
from migrate.codec import CODEC_CHOICES
from migrate.cover import (
    DEFAULT_CELL_BYTES,
    DEFAULT_COVER_RATE,
    MAX_CELL_BYTES,
    MIN_CELL_BYTES,
    CoverConfig,
)
from migrate.endpoints import Endpoint
from migrate.errors import ConfigError, RoamError
from migrate.kernel.deployment import DeploymentDir, load_bundle
from migrate.kernel.eventlog import EventLog
from migrate.kernel.files import own_private_directory
from migrate.ratelog import DEFAULT_PERIOD_S as DEFAULT_REJECTION_PERIOD_S
from migrate.replaystream import DEFAULT_MAX_REPLAY
from proxy.live_relays import LIVE_RELAYS
from roam_cli.args import non_negative_float, positive_int, positive_seconds
from roam_cli.units import (
    SYSTEMD_DIR,
    install_unit,
    roam_executable,
    server_unit_name,
    server_unit_text,
    uninstall_units,
)

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

METRICS_HELP = (
    "serve Prometheus metrics at http://HOST:PORT/metrics, on that address only (default: off)"
)


WATCH_OPTION: dict[str, Any] = {
    "dest": "watch",
    "nargs": "?",
    "const": 2.0,
    "type": positive_seconds,
    "metavar": "S",
    "help": "refresh the summary every S seconds (default 2) until Ctrl-C or SIGTERM",
}


def endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except RoamError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def clock_offset(text: str) -> float:
    """Testing only (hidden ``--clock-offset S``): the shim's clock runs ``S`` seconds ahead
    (negative: behind) of the host's, to test skewed clocks in a lab."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("the clock offset must be finite")
    return value


def shifted_clock(offset: float) -> Callable[[], float]:
    if not offset:
        return time.time
    return lambda: time.time() + offset


def register(subparsers: Subparsers) -> None:
    server = subparsers.add_parser(
        "server",
        help="run the server shim in front of an unmodified service (or: server "
        "status|install|uninstall)",
        description="Gate the service by the secret schedule, relay clients to it, send "
        "roaming updates and take group control messages. Runs until SIGTERM/SIGINT; removes "
        "everything it created on exit.",
    )
    server.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of options: each key is a long option below without its dashes "
        '(listen = "192.0.2.1:80", update-period = 2, quiet = true); options given on the '
        "command line override it",
    )
    server.add_argument(
        "--check-config",
        action="store_true",
        help="check the options (and the deployment, the state file and --listen's place in "
        "the server list) and exit without starting ('roam doctor' checks the kernel)",
    )
    server.add_argument("--deployment", type=Path, metavar="DIR", help="(required)")
    server.add_argument(
        "--listen",
        type=endpoint,
        metavar="IP:PORT",
        help="(required) this server's entry in the deployment's server list",
    )
    server.add_argument(
        "--service",
        type=endpoint,
        metavar="HOST:PORT",
        help="(required) the unmodified legacy service, normally on loopback",
    )
    server.add_argument(
        "--migration",
        choices=MIGRATION_MODES,
        default="live",
        help="what happens to live connections at a roam: 'live' re-creates them at the next "
        "server from client-held checkpoints (default); 'reconnect' drops them (the paper's "
        "prototype)",
    )
    server.add_argument(
        "--codec",
        choices=CODEC_CHOICES,
        default="auto",
        help="how to find request boundaries, which keep replay logs short: 'auto' (default) "
        "recognises HTTP/1.x, redis (RESP) and memcached from each connection's first bytes "
        "and uses 'generic' (a byte log from the connection's start) for anything else; TLS "
        "and SSH connections are marked unmigratable at once (not replayable)",
    )
    server.add_argument(
        "--stream-hash",
        choices=STREAM_HASHES,
        default="sha256",
        help="the running hash of each connection's service bytes that checkpoints commit to: "
        "'sha256' (default: cheapest per message on CPUs with SHA extensions) or 'blake3' "
        "(keyed per connection; cheaper per byte, for bulk downloads; docs/benchmarks.md). "
        "Every server reads both",
    )
    server.add_argument(
        "--live-relay",
        choices=LIVE_RELAYS,
        default="copy",
        help="how live mode forwards each connection's bytes past its checkpoint observer: "
        "'copy' through Python (default); 'splice' zero-copy, each bulk read teed to the "
        "observer; 'splice-thread' the same with the observer on a thread of its own per "
        "bulk direction (fastest for downloads when a CPU is spare; docs/benchmarks.md)",
    )
    server.add_argument(
        "--range-bodies",
        choices=RANGE_BODIES,
        default="hash",
        help="what checkpoints commit to of a response body that can be resumed by Range (a "
        "strong validator and Accept-Ranges): 'hash' every byte (default: a replica that "
        "ignores Range is regenerated from the start and verified); 'window' only the 64 KiB "
        "before the client's position, so that with a splice relay the body's other bytes "
        "never leave the kernel (a replica that ignores Range then resets the connection; "
        "docs/benchmarks.md)",
    )
    server.add_argument(
        "--checkpoint-period",
        type=positive_seconds,
        default=0.5,
        metavar="S",
        help="checkpoint each connection this often (default 0.5)",
    )
    server.add_argument(
        "--max-pending-per-client",
        type=positive_int,
        default=MAX_PENDING_PER_CLIENT,
        metavar="N",
        help="re-incarnations one client may have prepared at once on this server; its "
        f"excess PREPAREs are refused (default {MAX_PENDING_PER_CLIENT})",
    )
    server.add_argument(
        "--max-replay",
        type=positive_int,
        default=DEFAULT_MAX_REPLAY,
        metavar="BYTES",
        help="replay bytes one connection may need at a hand-over; a connection past it is "
        "reported unmigratable at once; all connections together hold at most 8 times it "
        f"(default {DEFAULT_MAX_REPLAY}, 64 MiB)",
    )
    server.add_argument(
        "--rejection-log-period",
        type=non_negative_float,
        default=DEFAULT_REJECTION_PERIOD_S,
        metavar="SECONDS",
        help="log the first rejected datagram of each kind per period in full and then one "
        "count per kind (anyone can send them); 0 logs every rejection "
        f"(default {DEFAULT_REJECTION_PERIOD_S:g})",
    )
    server.add_argument(
        "--migration-port",
        type=positive_int,
        default=47476,
        metavar="PORT",
        help="UDP port for re-incarnation requests (default 47476)",
    )
    server.add_argument(
        "--allow-any-source",
        action="store_true",
        help="while active, accept any source, not only registered clients",
    )
    server.add_argument(
        "--capture-dropped",
        type=Path,
        metavar="DIR",
        help="write what the closed gate drops to rotating pcap files (NFLOG)",
    )
    server.add_argument(
        "--no-transparent",
        dest="transparent",
        action="store_false",
        help="connect to the service from this host's address instead of the client's own",
    )
    server.add_argument(
        "--update-period",
        type=positive_seconds,
        default=2.0,
        metavar="S",
        help="mean period of roaming updates to each client (default 2)",
    )
    server.add_argument(
        "--control-port",
        type=positive_int,
        default=47475,
        metavar="PORT",
        help="UDP port for group control on every server (default 47475)",
    )
    server.add_argument(
        "--sync-period",
        type=positive_seconds,
        default=1.0,
        metavar="S",
        help="mean period of anti-entropy: this server's revocations and strikes to every "
        "other server (default 1; a revocation reaches every live server within 20 periods "
        "at 50%% loss)",
    )
    server.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="persistent state (default DIR/state/server-INDEX.json)",
    )
    server.add_argument("--status", type=Path, metavar="FILE", help="write a status JSON file")
    server.add_argument("--metrics", type=endpoint, metavar="HOST:PORT", help=METRICS_HELP)
    server.add_argument(
        "--log-json", type=Path, metavar="FILE", help="append one JSON object per event"
    )
    server.add_argument("--quiet", action="store_true", help="no human log on stderr")
    server.add_argument("--clock-offset", type=clock_offset, default=0.0, help=argparse.SUPPRESS)
    server.set_defaults(handler=run_server)
    server_actions = server.add_subparsers(dest="server_command", metavar="ACTION")
    server_status = server_actions.add_parser(
        "status",
        help="show a running server shim's status",
        description="Epoch, whether this server is active and when the service leaves it, the "
        "gate, connections, clients and the list's generation, updates sent and live-mode "
        "counts, from the file the shim writes with --status; --json prints it as it is.",
    )
    server_status.add_argument(
        "--status", dest="status_file", required=True, type=Path, metavar="FILE"
    )
    server_status.add_argument("--json", action="store_true")
    server_status.add_argument("--watch", **WATCH_OPTION)
    server_status.set_defaults(handler=run_server_status)
    server_install = server_actions.add_parser(
        "install",
        help="install and start a hardened systemd unit running 'roam server --config FILE'",
        description="Write /etc/systemd/system/roam-server-ADDRESS-PORT.service, running "
        "'roam server --config CONFIG' with a capability bounding set, a read-only file "
        "system except the directories the shim writes (made 0700 if missing), a private "
        "/tmp and no new privileges, and 'roam cleanup' after it stops; enable and start it. "
        "Without systemctl nothing is written (unless --no-start); if systemctl fails, the "
        "unit is removed again.",
    )
    server_install.add_argument(
        "install_config", type=Path, metavar="CONFIG", help="the server's TOML file"
    )
    server_install.add_argument(
        "--netns",
        metavar="NAME",
        help="run the shim in network namespace NAME (NetworkNamespacePath=/run/netns/NAME)",
    )
    server_install.add_argument("--no-start", action="store_true", help="write the unit only")
    server_install.add_argument(
        "--unit-dir", type=Path, default=SYSTEMD_DIR, help=argparse.SUPPRESS
    )
    server_install.set_defaults(handler=run_server_install, server_parser=server)
    server_uninstall = server_actions.add_parser(
        "uninstall",
        help="stop and remove the systemd unit (of CONFIG's server, or every roam server unit)",
    )
    server_uninstall.add_argument(
        "uninstall_config", nargs="?", type=Path, metavar="CONFIG", help="the server's TOML file"
    )
    server_uninstall.add_argument(
        "--unit-dir", type=Path, default=SYSTEMD_DIR, help=argparse.SUPPRESS
    )
    server_uninstall.set_defaults(handler=run_server_uninstall, server_parser=server)

    client = subparsers.add_parser(
        "client",
        help="run the client shim (or: client status|install|uninstall)",
        description="Follow the schedule from a bundle and rewrite the VIP to the active server "
        "in the kernel. Applications connect to the VIP. Runs until SIGTERM/SIGINT; removes "
        "everything it created on exit.",
    )
    client.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of options: each key is a long option below without its dashes "
        '(bundle = "/etc/roam/alice.bundle", cover-rate = 20); options given on the command '
        "line override it",
    )
    client.add_argument("--bundle", type=Path, metavar="FILE")
    client.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="key extensions and counters (default FILE.state beside the bundle)",
    )
    client.add_argument(
        "--status",
        type=Path,
        metavar="FILE",
        help="status file (default /run/server-roaming/client-NAME.status.json)",
    )
    client.add_argument(
        "--migration",
        choices=MIGRATION_MODES,
        default="live",
        help="'live' (default): keep checkpoints and hand live connections "
        "over at each roam; 'reconnect': only follow the schedule",
    )
    client.add_argument(
        "--prepare-lead",
        type=positive_seconds,
        default=0.15,
        metavar="S",
        help="start preparing a hand-over this long before the boundary (default 0.15)",
    )
    client.add_argument(
        "--max-replay",
        type=positive_int,
        default=DEFAULT_MAX_REPLAY,
        metavar="BYTES",
        help="replay bytes kept per connection; a connection past it is reported "
        f"unmigratable at once (default {DEFAULT_MAX_REPLAY}, 64 MiB)",
    )
    client.add_argument(
        "--cover-rate",
        type=non_negative_float,
        default=DEFAULT_COVER_RATE,
        metavar="HZ",
        help="cover traffic: slots per second, each a cell to every server's migration port, "
        "hand-over requests in place of cover; 0 sends requests at once, unpadded, and lets an "
        f"eavesdropper see the next server (default {DEFAULT_COVER_RATE:g})",
    )
    client.add_argument(
        "--cover-cell",
        type=positive_int,
        default=DEFAULT_CELL_BYTES,
        metavar="BYTES",
        help=f"size of every migration-port datagram ({MIN_CELL_BYTES}-{MAX_CELL_BYTES}; a "
        f"request that does not fit goes at a multiple of it; default {DEFAULT_CELL_BYTES})",
    )
    client.add_argument(
        "--migration-port",
        type=positive_int,
        default=47476,
        metavar="PORT",
        help="servers' UDP port for re-incarnation requests (default 47476)",
    )
    client.add_argument("--metrics", type=endpoint, metavar="HOST:PORT", help=METRICS_HELP)
    client.add_argument("--log-json", type=Path, metavar="FILE")
    client.add_argument("--quiet", action="store_true")
    client.add_argument("--clock-offset", type=clock_offset, default=0.0, help=argparse.SUPPRESS)
    client.set_defaults(handler=run_client)
    actions = client.add_subparsers(dest="client_command", metavar="ACTION")
    status = actions.add_parser(
        "status",
        help="show a running client shim's status",
        description="Epoch and server, keys held, m schedule, clock offset, roaming updates "
        "(with a warning when none came for 30 s: revoked, expired or cut off), tracked "
        "connections and the last roams; --json prints the status file as it is.",
    )
    status.add_argument("--bundle", dest="status_bundle", type=Path, metavar="FILE")
    status.add_argument("--status", dest="status_file", type=Path, metavar="FILE")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", **WATCH_OPTION)
    status.set_defaults(handler=run_client_status)
    install = actions.add_parser(
        "install",
        help="install and start a systemd unit",
        description="Write /etc/systemd/system/roam-client-NAME.service and enable and start "
        "it. Without systemctl nothing is written (unless --no-start); if systemctl fails, the "
        "unit is removed again.",
    )
    install.add_argument(
        "--bundle", dest="install_bundle", required=True, type=Path, metavar="FILE"
    )
    install.add_argument("--unit-dir", type=Path, default=SYSTEMD_DIR, help=argparse.SUPPRESS)
    install.add_argument("--no-start", action="store_true", help="write the unit only")
    install.set_defaults(handler=run_client_install)
    uninstall = actions.add_parser(
        "uninstall",
        help="stop and remove the systemd unit (of --bundle FILE, or every roam client unit)",
    )
    uninstall.add_argument(
        "--bundle",
        dest="uninstall_bundle",
        type=Path,
        metavar="FILE",
        help="only the unit of this bundle's client (default: every roam client unit)",
    )
    uninstall.add_argument("--unit-dir", type=Path, default=SYSTEMD_DIR, help=argparse.SUPPRESS)
    uninstall.set_defaults(handler=run_client_uninstall)


def _preflight(kind: str, live: bool) -> None:
    """Refuse to start, with one clear line, when a kernel feature or privilege is missing."""
    from migrate.kernel import doctor

    checks = [doctor.check_privileges(), doctor.check_nftables()]
    if kind == "server":
        checks += [doctor.check_ip_transparent(), doctor.check_splice()]
    if live and kind == "server":
        checks.append(doctor.check_tcp_repair())
    if live and kind == "client":
        checks.append(doctor.check_nflog())  # the checkpoints come from an NFLOG group
    for check in checks:
        if check.required and not check.ok:
            fix = f"; fix: {check.fix}" if check.fix else ""
            raise ConfigError(f"cannot start the {kind} shim: {check.name}: {check.detail}{fix}")


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a daemon's main coroutine on uvloop (the project's event loop), with room for as
    many connections as the host allows (``raise_open_file_limit``), and descriptors held
    back for its rule changes when its connections reach that limit (``fdreserve``)."""
    import uvloop

    from migrate.kernel.fdreserve import RESERVE
    from migrate.kernel.processes import raise_open_file_limit

    raise_open_file_limit()
    RESERVE.hold()
    try:
        uvloop.run(main())
    finally:
        RESERVE.let_go()


def run_server(args: argparse.Namespace) -> int:
    import logging

    missing = [
        f"--{name}" for name in ("deployment", "listen", "service") if getattr(args, name) is None
    ]
    if missing:
        raise ConfigError(
            f"the server needs {', '.join(missing)} (on the command line or in --config FILE)"
        )

    from proxy.daemon import ServerOptions, ServerShim

    # The relay engine reports connection-level trouble through ``logging``.
    logging.basicConfig(level=logging.INFO, format="server: %(levelname)s: %(message)s")
    options = ServerOptions(
        deployment_dir=args.deployment,
        listen=args.listen,
        service=args.service,
        migration=args.migration,
        allow_any_source=args.allow_any_source,
        capture_dropped=args.capture_dropped,
        transparent=args.transparent,
        update_period=args.update_period,
        control_port=args.control_port,
        sync_period=args.sync_period,
        state_path=args.state,
        status_path=args.status,
        codec=args.codec,
        stream_hash=args.stream_hash,
        live_relay=args.live_relay,
        range_bodies=args.range_bodies,
        checkpoint_period=args.checkpoint_period,
        migration_port=args.migration_port,
        max_pending_per_client=args.max_pending_per_client,
        max_replay=args.max_replay,
        metrics=args.metrics,
    )
    if args.check_config:
        # Everything the shim reads at start, read now; nothing written, nothing started.
        shim = ServerShim(options, EventLog("server", quiet=True))
        print(
            f"configuration OK: server {options.listen} (index {shim.pool.index}) of deployment "
            f"{shim.deployment.deployment_id.hex()}, service {options.service}, "
            f"{len(shim.pool.clients.clients)} clients, migration {options.migration}"
        )
        return 0
    _preflight("server", args.migration == "live")
    log = EventLog(
        "server", args.log_json, quiet=args.quiet, rejection_period_s=args.rejection_log_period
    )
    try:
        shim = ServerShim(options, log, clock=shifted_clock(args.clock_offset))
        _run_loop(shim.run)
    finally:
        log.close()
    return 0


def run_client(args: argparse.Namespace) -> int:
    from client_shim.daemon import ClientShim, default_state_path, default_status_path

    if args.bundle is None:
        raise ConfigError("give --bundle FILE (or an action: status, install, uninstall)")
    bundle = load_bundle(args.bundle)
    _preflight("client", args.migration == "live")
    status_path = args.status or default_status_path(bundle.name)
    if args.status is None:
        # The default run directory is ours alone: 0700 even if an older version made it 0755.
        own_private_directory(status_path.parent)
    log = EventLog("client", args.log_json, quiet=args.quiet)
    try:
        shim = ClientShim(
            bundle,
            bundle_path=args.bundle,
            state_path=args.state or default_state_path(args.bundle),
            status_path=status_path,
            log=log,
            live=args.migration == "live",
            prepare_lead=args.prepare_lead,
            max_replay=args.max_replay,
            migration_port=args.migration_port,
            cover_config=CoverConfig(rate=args.cover_rate, cell=args.cover_cell),
            metrics=args.metrics,
            clock=shifted_clock(args.clock_offset),
        )
        _run_loop(shim.run)
    finally:
        log.close()
    return 0


def _read_status(path: Path, kind: str) -> dict[str, Any]:
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {kind} shim is running ({path} does not exist)") from None
    except PermissionError:
        # 0600: it names the active server and the epoch ends.
        raise ConfigError(f"{path} is readable only by the shim's user (run as it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not a status file") from None
    pid = status.get("pid")
    if not isinstance(pid, int) or not Path(f"/proc/{pid}").exists():
        raise ConfigError(f"the {kind} shim that wrote {path} (pid {pid}) is not running")
    return status


def _watch(args: argparse.Namespace, frame: Callable[[], list[str]]) -> int:
    if args.json:
        raise ConfigError("--watch refreshes the summary; --json prints the file once")
    from roam_cli.watch import watch

    return watch(frame, args.watch)


def run_server_status(args: argparse.Namespace) -> int:
    from roam_cli.status import server_summary

    if args.watch is not None:
        return _watch(
            args,
            lambda: server_summary(_read_status(args.status_file, "server"), time.time()),
        )
    status = _read_status(args.status_file, "server")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print("\n".join(server_summary(status, time.time())))
    return 0


def run_client_status(args: argparse.Namespace) -> int:
    from client_shim.daemon import default_status_path

    path = args.status_file
    if path is None:
        if args.status_bundle is None:
            raise ConfigError("give --bundle FILE or --status FILE")
        path = default_status_path(load_bundle(args.status_bundle).name)
    if args.watch is not None:
        from roam_cli.status import client_summary

        return _watch(args, lambda: client_summary(_read_status(path, "client"), time.time()))
    status = _read_status(path, "client")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        from roam_cli.status import client_summary

        print("\n".join(client_summary(status, time.time())))
    return 0


def unit_name(bundle_name: str) -> str:
    return f"roam-client-{bundle_name}.service"


def unit_text(bundle: Path, roam: str) -> str:
    return f"""[Unit]
Description=server-roaming client shim ({bundle.name})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={roam} client --bundle {bundle}
ExecStopPost={roam} cleanup
Restart=on-failure
RestartSec=2
# Status, log and state files name the active server: nobody else may read them.
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def run_client_install(args: argparse.Namespace) -> int:
    bundle_path = args.install_bundle.resolve()
    bundle = load_bundle(bundle_path)
    install_unit(
        args.unit_dir,
        unit_name(bundle.name),
        unit_text(bundle_path, roam_executable()),
        no_start=args.no_start,
        uninstall_hint="roam client uninstall",
    )
    return 0


def run_client_uninstall(args: argparse.Namespace) -> int:
    chosen = None
    if args.uninstall_bundle is not None:
        chosen = args.unit_dir / unit_name(load_bundle(args.uninstall_bundle).name)
    return _uninstall(args.unit_dir, chosen, "client")


def _uninstall(unit_dir: Path, chosen: Path | None, kind: str) -> int:
    """Remove ``chosen``, or every roam unit of ``kind`` in ``unit_dir``."""
    if chosen is not None and not chosen.exists():
        raise ConfigError(f"{chosen} is not installed")
    units = [chosen] if chosen is not None else sorted(unit_dir.glob(f"roam-{kind}-*.service"))
    if not units:
        raise ConfigError(f"no roam {kind} unit is installed in {unit_dir}")
    uninstall_units(units)
    return 0


def _server_options(config: Path, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options ``roam server --config FILE`` would run with (checked the same way)."""
    from roam_cli.config import file_argv

    options = parser.parse_args(file_argv(config, parser))
    missing = [
        name for name in ("deployment", "listen", "service") if getattr(options, name) is None
    ]
    if missing:
        raise ConfigError(f"{config}: the server needs the keys {', '.join(missing)}")
    servers = DeploymentDir(options.deployment).deployment().servers
    if options.listen not in servers:
        raise ConfigError(
            f"{config}: key 'listen': {options.listen} is not in the deployment's server list"
        )
    return options


def _server_writes(options: argparse.Namespace) -> list[Path]:
    """The directories the server shim writes to (its unit's ReadWritePaths)."""
    deployment = options.deployment.resolve()
    state = options.state.resolve().parent if options.state else deployment / "state"
    paths = [state]
    for path in (options.log_json, options.status):
        if path is not None:
            paths.append(path.resolve().parent)
    if options.capture_dropped is not None:
        paths.append(options.capture_dropped.resolve())
    return paths


def run_server_install(args: argparse.Namespace) -> int:
    config = args.install_config.resolve()
    options = _server_options(config, args.server_parser)
    listen = str(options.listen)
    writes = _server_writes(options)
    text = server_unit_text(config, roam_executable(), listen, writes, args.netns)
    install_unit(
        args.unit_dir,
        server_unit_name(listen),
        text,
        no_start=args.no_start,
        uninstall_hint="roam server uninstall",
        directories=writes,
    )
    for path in writes:
        if path.is_relative_to("/tmp") or path.is_relative_to("/var/tmp"):
            # The unit's PrivateTmp= gives the shim a /tmp of its own.
            print(
                f"roam: warning: {path} is under /tmp: the unit's private /tmp hides it from "
                "everything but the shim",
                file=sys.stderr,
            )
    return 0


def run_server_uninstall(args: argparse.Namespace) -> int:
    chosen = None
    if args.uninstall_config is not None:
        options = _server_options(args.uninstall_config.resolve(), args.server_parser)
        chosen = args.unit_dir / server_unit_name(str(options.listen))
    return _uninstall(args.unit_dir, chosen, "server")
