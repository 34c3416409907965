"""``roam lab``: check the lab kit's link shaping, and remove labs left by dead processes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from migrate.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="network-namespace labs: check link shaping, clean up after crashed labs",
        description="Network-namespace labs (needs root). See docs/labs.md.",
    )
    commands = parser.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")
    commands.required = True

    linkcheck = commands.add_parser(
        "linkcheck",
        help="build a two-host lab with one shaped link, measure its rate and loss, remove it",
    )
    linkcheck.add_argument("--rate-mbit", type=float, required=True, help="configured rate")
    linkcheck.add_argument(
        "--loss-pct", type=float, default=0.0, help="configured random loss (default 0)"
    )
    linkcheck.add_argument(
        "--duration-s", type=float, default=3.0, help="iperf3 TCP measurement time (default 3)"
    )
    linkcheck.add_argument(
        "--probes", type=int, default=3000, help="UDP datagrams of the loss probe (default 3000)"
    )
    linkcheck.add_argument("--json", action="store_true", help="print one JSON object")
    linkcheck.set_defaults(handler=run_linkcheck)

    cleanup = commands.add_parser(
        "cleanup",
        help="remove the namespaces, processes and files of labs whose owner process is dead",
    )
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cleanup.add_argument("--json", action="store_true", help="print one JSON object")
    cleanup.set_defaults(handler=run_cleanup)

    # fig2 and overhead: the experiments of docs/results.md
    from roam_cli.experiments import register_experiments

    register_experiments(commands)

    faults = commands.add_parser(
        "faults",
        help="kill the active server at random moments of live downloads, N times "
        "(docs/reliability.md)",
    )
    faults.add_argument("--out", type=Path, required=True, metavar="DIR", help="results here")
    faults.add_argument("--trials", type=int, default=100, help="downloads (default 100)")
    faults.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    faults.set_defaults(handler=run_faults)


def run_linkcheck(args: argparse.Namespace) -> int:
    from labs.linkcheck import check_link

    result = check_link(
        args.rate_mbit, args.loss_pct, duration_s=args.duration_s, probes=args.probes
    )
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print(
            f"rate: configured {result.configured_mbit:g} Mbit/s, measured "
            f"{result.measured_mbit:.2f} Mbit/s (iperf3 TCP)"
        )
        print(
            f"loss: configured {result.configured_loss_pct:g} %, measured "
            f"{result.measured_loss_pct:.2f} % over {result.probes} UDP probes"
        )
    return 0


def run_cleanup(args: argparse.Namespace) -> int:
    from labs.cleanup import cleanup_dead_labs

    summary = cleanup_dead_labs(dry_run=args.dry_run)
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "labs": [
                        {
                            "lab_id": report.lab_id,
                            "namespaces": report.namespaces_removed,
                            "pids": report.pids_stopped,
                            "workdir": report.workdir_removed,
                            "errors": report.errors,
                        }
                        for report in summary.reports
                    ],
                    "unreadable_records": summary.unreadable_records,
                }
            )
        )
    else:
        verb = "would remove" if args.dry_run else "removed"
        for report in summary.reports:
            print(
                f"lab {report.lab_id}: {verb} {len(report.namespaces_removed)} namespaces, "
                f"stopped {len(report.pids_stopped)} processes"
                + (f"; errors: {'; '.join(report.errors)}" if report.errors else "")
            )
        if not summary.reports:
            print("no labs of dead processes")
    failed = [r for r in summary.reports if r.errors]
    if summary.unreadable_records:
        raise ConfigError("; ".join(summary.unreadable_records))
    return 1 if failed else 0


def run_faults(args: argparse.Namespace) -> int:
    from labs.faults import run_server_death_trials

    if args.trials < 1:
        raise ConfigError("--trials must be at least 1")
    summary = run_server_death_trials(args.out, trials=args.trials, seed=args.seed)
    print(json.dumps(summary))
    bad = {"corrupted", "failed-silent"} & summary["verdicts"].keys()
    return 1 if bad or summary["shim_problems"] else 0
