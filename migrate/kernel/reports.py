"""Reading the servers' attack reports and ranking a deployment's clients (``roam suspects``,
the ``insiders`` lab): the files around ``migrate.suspects``, whose ranking is pure."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from migrate.activeset import assignments, check_active
from migrate.errors import ConfigError
from migrate.kernel.deployment import DeploymentDir
from migrate.suspects import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    Evidence,
    Ranking,
    SuspectsError,
    Thresholds,
    parse_report,
    rank,
)

MAX_LINE = 4096  # bytes of one report line
MAX_REPORT_BYTES = 1 << 30  # a reports file larger than this is refused, not read


def report_lines(path: Path) -> list[tuple[int, bytes]]:
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


def server_reports(directory: Path) -> list[Path]:
    """The server shims' report files (``proxy.daemon.attack_reports_path``)."""
    found = sorted((directory / "reports").glob("*.jsonl"))
    if not found:
        raise ConfigError(
            f"no attack reports in {directory / 'reports'} (the servers of a k-of-N "
            "deployment write them there); give --reports FILE"
        )
    return found


@dataclass(frozen=True)
class Evaluation:
    """A ranking of a deployment's clients that are not revoked, with what it was made of."""

    ranking: Ranking
    names: dict[int, str]  # client id -> name
    active: int
    reports: int


def evaluate(
    path: Path,
    reports: Path | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    thresholds: Thresholds | None = None,
    active: int | None = None,
) -> Evaluation:
    """Read the reports (``reports``, else every ``path/reports/*.jsonl``) and rank the
    deployment's clients that are not revoked: what ``roam suspects`` prints, and what the
    ``insiders`` lab evaluates after every epoch."""
    if window > MAX_WINDOW:
        raise ConfigError(f"--window must be at most {MAX_WINDOW}, got {window}")
    directory = DeploymentDir(path)
    deployment = directory.deployment()
    servers = deployment.servers
    k = deployment.active if active is None else active
    try:
        check_active(k, len(servers))
    except ConfigError as error:
        raise ConfigError(f"--active: {error}") from None
    names = {str(server): index for index, server in enumerate(servers)}
    evidence = Evidence(len(servers), window, thresholds or Thresholds())
    count = 0
    sources = [reports] if reports is not None else server_reports(path)
    for source in sources:
        for number, line in report_lines(source):
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
    return Evaluation(ranking, by_id, k, count)
