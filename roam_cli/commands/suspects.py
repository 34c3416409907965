"""``roam suspects DIR --reports FILE``: rank clients by the likelihood that they leak the
schedule (k of N, migrate.suspects; docs/insiders.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrate.activeset import assignments, check_active
from migrate.errors import ConfigError
from migrate.kernel.deployment import DeploymentDir
from migrate.suspects import (
    DEFAULT_CONFIDENCE,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    Evidence,
    Ranking,
    SuspectsError,
    Thresholds,
    parse_report,
    rank,
)
from roam_cli.args import bounded_float, positive_int

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

MAX_LINE = 4096  # bytes of one report line
MAX_REPORT_BYTES = 1 << 30  # a reports file larger than this is refused, not read
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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def _lines(path: Path) -> list[tuple[int, bytes]]:
    """The non-empty lines of ``path`` with their numbers; bounded in size."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(MAX_REPORT_BYTES + 1)
    else:
        try:
            if path.stat().st_size > MAX_REPORT_BYTES:
                raise ConfigError(f"--reports {path} is larger than {MAX_REPORT_BYTES} bytes")
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"--reports {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"--reports {path} is a directory") from None
    if len(data) > MAX_REPORT_BYTES:
        raise ConfigError(f"--reports: more than {MAX_REPORT_BYTES} bytes")
    found = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            raise SuspectsError(f"{path} line {number}: longer than {MAX_LINE} bytes")
        found.append((number, line))
    return found


def _server_reports(directory: Path) -> list[Path]:
    """The server shims' report files (``proxy.daemon.attack_reports_path``)."""
    found = sorted((directory / "reports").glob("*.jsonl"))
    if not found:
        raise ConfigError(
            f"no attack reports in {directory / 'reports'} (the servers of a k-of-N "
            "deployment write them there); give --reports FILE"
        )
    return found


def run(args: argparse.Namespace) -> int:
    if args.window > MAX_WINDOW:
        raise ConfigError(f"--window must be at most {MAX_WINDOW}, got {args.window}")
    directory = DeploymentDir(args.directory)
    deployment = directory.deployment()
    servers = deployment.servers
    k = deployment.active if args.active is None else args.active
    try:
        check_active(k, len(servers))
    except ConfigError as error:
        raise ConfigError(f"--active: {error}") from None
    names = {str(server): index for index, server in enumerate(servers)}
    thresholds = Thresholds(args.dropped, args.syn, args.violations)
    evidence = Evidence(len(servers), args.window, thresholds)
    count = 0
    sources = [args.reports] if args.reports is not None else _server_reports(args.directory)
    for source in sources:
        for number, line in _lines(source):
            report = parse_report(line, names, f"{source} line {number}")
            if report.epoch > deployment.chain_length:
                raise SuspectsError(
                    f"{source} line {number}: epoch {report.epoch} is after the chain's "
                    f"last epoch {deployment.chain_length}"
                )
            evidence.add(report)
            count += 1
    secret = directory.secret_with_index()
    clients = [client for client in directory.clients(secret).clients if not client.revoked]
    epochs = evidence.epochs()
    facts = {}
    if epochs:
        chain = secret.chain(deployment.chain_length)
        facts = assignments(chain, epochs[0], epochs[-1], len(servers), k)
    ranking = rank(evidence, [client.client_id for client in clients], facts.get)
    by_id = {client.client_id: client.name for client in clients}
    if args.json:
        print(json.dumps(_document(ranking, by_id, k, count, args.confidence)))
    else:
        _table(ranking, by_id, k, count, args.confidence)
    return 0


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
