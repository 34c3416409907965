"""``roam suspects DIR --reports FILE``: rank clients by the likelihood that they leak the
schedule (k of N, migrate.suspects; docs/insiders.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrate.errors import ConfigError
from migrate.kernel.deployment import DeploymentDir
from migrate.kernel.reports import evaluate
from migrate.suspects import (
    DEFAULT_CONFIDENCE,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    Ranking,
    RevocationPolicy,
    Suspect,
    Thresholds,
)
from roam_cli.args import bounded_float, positive_int

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

SHOWN_EVIDENCE = 12  # epochs of evidence per client in the table (all of them with --json)


def _probability(text: str) -> float:
    return bounded_float(text, "a number", lambda v: 0 < v < 1, "must be between 0 and 1")


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "suspects",
        help="rank clients by how likely they leak the schedule (k of N attack reports)",
        description="Read per-epoch attack summaries of the servers (JSON lines: "
        '{"epoch": E, "server": "HOST:PORT", "dropped": D, "syn": S, "violations": V}, '
        "measures optional, at least one) and rank the deployment's clients that are not "
        "revoked by the likelihood that their assigned server is attacked more often than a "
        "random active server: an insider leaking its schedule (docs/insiders.md). Needs k > 1 "
        "(roam init --active); reads DIR's secret to compute the assignments.",
    )
    parser.add_argument("directory", metavar="DIR", type=Path)
    parser.add_argument(
        "--reports",
        type=Path,
        metavar="FILE",
        help="JSON lines ('-': stdin); default: every DIR/reports/*.jsonl, where the server "
        "shims of a k-of-N deployment append theirs",
    )
    parser.add_argument(
        "--window",
        type=positive_int,
        default=DEFAULT_WINDOW,
        metavar="W",
        help=f"use the newest W epochs of reports (default {DEFAULT_WINDOW}, at most {MAX_WINDOW})",
    )
    parser.add_argument(
        "--confidence",
        type=_probability,
        default=DEFAULT_CONFIDENCE,
        metavar="P",
        help=f"flag clients at or above this confidence (default {DEFAULT_CONFIDENCE})",
    )
    parser.add_argument(
        "--active",
        type=int,
        metavar="K",
        help="k of N the reports were made under (default: the deployment's)",
    )
    defaults = Thresholds()
    for name, what in (
        ("dropped", "packets dropped from unregistered sources"),
        ("syn", "SYNs of a flood"),
        ("violations", "contract violations"),
    ):
        parser.add_argument(
            f"--{name}",
            type=positive_int,
            default=getattr(defaults, name),
            metavar="N",
            help=f"an epoch counts as attacked at a server with N or more {what} "
            f"(default {getattr(defaults, name)})",
        )
    parser.add_argument(
        "--revoke-above",
        type=_probability,
        metavar="P",
        help="automatic policy (off by default): revoke the clients ranked at or above "
        "confidence P, best first, at most --revoke-at-most of them, as 'roam revoke' does "
        "(the list, then every server's control port); run it every epoch or minute",
    )
    parser.add_argument(
        "--revoke-at-most",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --revoke-above: revoke at most N clients per run (default 1)",
    )
    parser.add_argument(
        "--no-notify",
        dest="notify",
        action="store_false",
        help="with --revoke-above: only change the list, do not tell running servers",
    )
    parser.add_argument("--control-port", type=positive_int, default=47475, metavar="PORT")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    policy = None
    if args.revoke_above is not None:
        policy = RevocationPolicy(args.revoke_above, args.revoke_at_most or 1)
    elif args.revoke_at_most is not None or not args.notify:
        raise ConfigError("--revoke-at-most and --no-notify go with --revoke-above P")
    result = evaluate(
        args.directory,
        args.reports,
        window=args.window,
        thresholds=Thresholds(args.dropped, args.syn, args.violations),
        active=args.active,
    )
    ranking, by_id, k, count = result.ranking, result.names, result.active, result.reports
    chosen = policy.choose(ranking) if policy is not None else ()
    if args.json:
        document = _document(ranking, by_id, k, count, args.confidence)
        if policy is not None:
            document["revoke_above"] = policy.confidence
            document["revoked"] = [by_id[suspect.client] for suspect in chosen]
        # The revocations' own lines go to stderr: stdout stays one JSON object.
        with contextlib.redirect_stdout(sys.stderr):
            _revoke(args, chosen, by_id)
        print(json.dumps(document))
    else:
        _table(ranking, by_id, k, count, args.confidence)
        if policy is not None and not chosen:
            print(f"no client at or above confidence {policy.confidence}: nobody revoked")
        _revoke(args, chosen, by_id)
    return 0


def _revoke(args: argparse.Namespace, chosen: Sequence[Suspect], names: dict[int, str]) -> None:
    from roam_cli.commands.registration import revoke_client

    for suspect in chosen:
        print(
            f"policy: revoking {names[suspect.client]} (confidence {suspect.confidence:.4f} "
            f">= {args.revoke_above}, {suspect.hits}/{suspect.epochs} epochs attacked)"
        )
        revoke_client(
            DeploymentDir(args.directory), names[suspect.client], args.notify, args.control_port
        )


def _document(
    ranking: Ranking, names: dict[int, str], k: int, reports: int, threshold: float
) -> dict[str, Any]:
    return {
        "active": k,
        "reports": reports,
        "epochs": list(ranking.epochs[:1] + ranking.epochs[-1:]),
        "epochs_with_evidence": len(ranking.epochs),
        "stale_reports": ranking.stale,
        "attacks_outside_active_set": ranking.outside,
        "confidence_threshold": threshold,
        "suspects": [
            {
                "client": names[suspect.client],
                "client_id": suspect.client,
                "score": round(suspect.score, 6),
                "confidence": suspect.confidence,
                "above_threshold": suspect.above(threshold),
                "hits": suspect.hits,
                "epochs": suspect.epochs,
                "expected_hits": round(suspect.expected, 6),
                "evidence": list(suspect.evidence),
            }
            for suspect in ranking.suspects
        ],
    }


def _table(ranking: Ranking, names: dict[int, str], k: int, reports: int, threshold: float) -> None:
    span = f"epochs {ranking.epochs[0]}..{ranking.epochs[-1]}" if ranking.epochs else "no epochs"
    print(
        f"{reports} reports, {span} ({len(ranking.epochs)} with evidence), k = {k}; "
        f"{ranking.outside} attacks on inactive servers, {ranking.stale} reports older than "
        "the window"
    )
    if k == 1:
        print("note: with k = 1 every client has the same server: reports cannot tell them apart")
    print(
        f"{'rank':>4}  {'client':<20} {'id':>6}  {'score':>8}  {'confidence':>10}  "
        f"{'hits/epochs':>11}  {'expected':>8}  evidence (epochs its server was attacked)"
    )
    for place, suspect in enumerate(ranking.suspects, 1):
        flag = "  SUSPECT" if suspect.above(threshold) else ""
        shown = ",".join(str(epoch) for epoch in suspect.evidence[-SHOWN_EVIDENCE:])
        if len(suspect.evidence) > SHOWN_EVIDENCE:
            shown = "...," + shown
        print(
            f"{place:>4}  {names[suspect.client]:<20} {suspect.client:>6}  "
            f"{suspect.score:>8.2f}  {suspect.confidence:>10.4f}  "
            f"{f'{suspect.hits}/{suspect.epochs}':>11}  {suspect.expected:>8.1f}  "
            f"{shown or '-'}{flag}"
        )
