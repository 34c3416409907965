"""``roam doctor`` and ``roam cleanup``: host readiness, and removing what dead processes left."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: Subparsers) -> None:
    doctor = subparsers.add_parser(
        "doctor",
        help="check that this host has the kernel features the shims and labs need",
        description="Probe privileges, nftables, libnftables, NFLOG, TCP_REPAIR, "
        "IP_TRANSPARENT, splice, policy routing with port selectors and netem; one line per "
        "check with how to fix "
        "what is missing. Exit status 1 if a required feature is missing.",
    )
    doctor.add_argument(
        "--json",
        action="store_true",
        help='print {"checks": [{"name", "ok", "required", "detail", "fix"}, ...]}',
    )
    doctor.set_defaults(handler=run_doctor)

    cleanup = subparsers.add_parser(
        "cleanup",
        help="remove nft tables, rules, routes, processes and labs left by dead roam processes",
        description="Remove the leftovers of every shim instance and lab whose owner process "
        "is dead: recorded nftables tables, ip rules, routes, sysctls, child processes and "
        "files, tables named roam_<role>_<pid> of dead pids, and lab namespaces. Live "
        "instances and anything not ours are never touched.",
    )
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cleanup.set_defaults(handler=run_cleanup)


def run_doctor(args: argparse.Namespace) -> int:
    from migrate.kernel.doctor import all_required_ok, run_checks

    checks = run_checks()
    if args.json:
        print(json.dumps({"checks": [check.as_json() for check in checks]}))
    else:
        for check in checks:
            print(check.line())
    return 0 if all_required_ok(checks) else 1


def run_cleanup(args: argparse.Namespace) -> int:
    from labs.cleanup import cleanup_dead_labs
    from migrate.kernel.instances import sweep_dead

    lines = sweep_dead(dry_run=args.dry_run)
    summary = cleanup_dead_labs(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for report in summary.reports:
        line = f"lab {report.lab_id}: {verb} namespaces {', '.join(report.namespaces_removed)}"
        if report.pids_stopped:
            line += f"; stopped pids {', '.join(map(str, report.pids_stopped))}"
        if report.workdir_removed:
            line += f"; {verb} {report.workdir_removed}"
        if report.errors:
            line += f"; FAILED: {'; '.join(report.errors)}"
        lines.append(line)
    lines += [f"unreadable lab record left in place: {p}" for p in summary.unreadable_records]
    for line in lines:
        print(line)
    if not lines:
        print("nothing to clean up")
    failed = any("FAILED" in line for line in lines)
    return 1 if failed else 0
