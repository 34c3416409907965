"""Which subscribed client leaks the schedule: a likelihood ranking from per-epoch attack reports.

Theory of operation (k of N, PROTOCOL.md section 4; MOTAG's idea without shuffle messages).
Every epoch each client's server is re-drawn from the active set by ``H4(K_i, c)``. An insider
who hands its schedule to an attacker points the attack at *its own* server, epoch after
epoch; an innocent client's server is attacked only when it happens to share that server (one
epoch in ``k`` on average) or when the attack hits servers at random. So we count, for each
client ``c``, the epochs of evidence ``n_c`` (its assigned server reported on) and the *hits*
``h_c`` (its assigned server was attacked in that epoch).

Null hypothesis for ``c`` (innocent): its server in epoch ``e`` is a uniform draw from the active
set, independent of the attack (the assignment is a hash of a key the attacker's choice of
targets cannot change), so ``P(hit in e) = r_e``, the fraction of ``e``'s reported active
servers that were attacked. ``h_c`` is then a sum of independent Bernoulli(``r_e``) variables
with mean ``n_c * rbar_c``. Alternative (insider): its server is attacked at some higher rate
``p`` (unknown: the attack may miss, reports may be lost).

Score: the generalised log-likelihood ratio, ``p`` set to its maximum-likelihood value
``h_c / n_c``::

    G_c = n_c * KL(h_c/n_c || rbar_c)   if h_c/n_c > rbar_c, else 0      (nats)

where ``KL(a||b) = a ln(a/b) + (1-a) ln((1-a)/(1-b))``. By the Chernoff-Hoeffding bound an
innocent client reaches ``G_c >= g`` with probability at most ``e^-g``; over ``C`` clients and the
``n_c`` evaluations as its evidence grew (a union bound), at most ``C * n_c * e^-g``. The
*confidence* is ``1 - min(1, C * n_c * e^-G_c)``: a lower bound on the probability that a
client this far out is not an innocent one by chance. Flagging at confidence ``1 - a``, the
chance that any innocent client is *ever* flagged while the evidence grows to ``n`` epochs
(evaluated after every epoch) is at most ``a * (1 + ln n)``: the sum of ``a / n'`` over
``n' <= n``. A client whose server is attacked no more
often than a random active server drifts to ``G = 0``; an insider's ``G`` grows linearly.

Robustness: a missing report removes that epoch from the evidence of the clients assigned to
the server (no guess); noise (false "attacked" reports) and an attacker who also floods random
servers to frame others raise ``r_e`` for everyone alike, so they slow the insider's isolation
but do not push an innocent client up; an attack on every active server identifies nobody
(``G = 0`` for all). Not covered: an insider who computes *another* client's server from its
keys and that client's id (ids are small integers) and attacks that server instead of its own
frames that client; and several insiders add up, each ranked on its own share.

Bounded: ``Evidence`` keeps at most ``window`` epochs (the newest; older reports are counted
and dropped) of at most ``N`` servers each, one entry per (epoch, server) (a re-sent summary
keeps the larger counts, never adds). ``rank`` takes at most ``MAX_CLIENTS`` clients and costs
one hash per (client, epoch in the window).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from migrate.activeset import EpochAssignment, check_client_id
from migrate.errors import ConfigError
from migrate.strictjson import loads

DEFAULT_WINDOW = 256
MAX_WINDOW = 4096
MAX_CLIENTS = 100_000
DEFAULT_CONFIDENCE = 0.99
CANDIDATES = 16  # leading clients checked against each other (explaining away)
MEASURES = ("dropped", "syn", "violations")
MAX_COUNT = 1 << 62


class SuspectsError(ConfigError):
    """Malformed attack reports or parameters (a one-line message naming what was wrong)."""


@dataclass(frozen=True, slots=True)
class AttackReport:
    """One server's summary of one epoch: what its gate and contracts saw.

    ``dropped``: packets the gate dropped from unregistered sources while the server was
    active; ``syn``: SYNs of a flood (handshakes never completed); ``violations``: contract
    violations by registered clients.
    """

    epoch: int
    server: int  # index into the deployment's server list
    dropped: int = 0
    syn: int = 0
    violations: int = 0


@dataclass(frozen=True, slots=True)
class Thresholds:
    """An epoch counts as attacked at a server when any measure reaches its threshold."""

    dropped: int = 1000
    syn: int = 1000
    violations: int = 1

    def __post_init__(self) -> None:
        for name in MEASURES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SuspectsError(f"threshold {name} must be a positive integer, got {value!r}")

    def attacked(self, report: AttackReport) -> bool:
        return (
            report.dropped >= self.dropped
            or report.syn >= self.syn
            or report.violations >= self.violations
        )


@dataclass(slots=True)
class Evidence:
    """The newest ``window`` epochs of attack reports, bounded in memory."""

    servers: int
    window: int = DEFAULT_WINDOW
    thresholds: Thresholds = field(default_factory=Thresholds)
    _epochs: dict[int, dict[int, AttackReport]] = field(default_factory=dict)
    stale: int = 0  # reports for epochs that fell out of the window

    def __post_init__(self) -> None:
        if not 1 <= self.window <= MAX_WINDOW:
            raise SuspectsError(f"the window must be 1..{MAX_WINDOW} epochs, got {self.window}")
        if self.servers < 1:
            raise SuspectsError("there must be at least one server")

    def add(self, report: AttackReport) -> bool:
        """Take ``report``; False if it is older than the window (counted in ``stale``)."""
        if not 0 <= report.server < self.servers:
            raise SuspectsError(f"server index {report.server} is not one of {self.servers}")
        newest = max(self._epochs, default=report.epoch)
        if report.epoch <= newest - self.window:
            self.stale += 1
            return False
        reports = self._epochs.setdefault(report.epoch, {})
        old = reports.get(report.server)
        if old is not None:  # a re-sent summary: the larger counts, never the sum
            report = AttackReport(
                report.epoch,
                report.server,
                max(old.dropped, report.dropped),
                max(old.syn, report.syn),
                max(old.violations, report.violations),
            )
        reports[report.server] = report
        floor = max(self._epochs) - self.window
        for epoch in [epoch for epoch in self._epochs if epoch <= floor]:
            self.stale += len(self._epochs.pop(epoch))
        return True

    def epochs(self) -> list[int]:
        return sorted(self._epochs)

    def reported(self, epoch: int) -> frozenset[int]:
        return frozenset(self._epochs.get(epoch, {}))

    def attacked(self, epoch: int) -> frozenset[int]:
        reports = self._epochs.get(epoch, {})
        return frozenset(s for s, report in reports.items() if self.thresholds.attacked(report))


@dataclass(frozen=True, slots=True)
class Suspect:
    client: int
    score: float  # G_c, nats
    confidence: float
    hits: int  # epochs in which its server was attacked
    epochs: int  # epochs of evidence (its server reported on)
    expected: float  # hits an innocent client would expect: sum of r_e
    evidence: tuple[int, ...]  # the epochs of the hits
    raw_score: float = 0.0  # G before other candidates explain part of the evidence away

    def above(self, threshold: float) -> bool:
        return self.confidence >= threshold


@dataclass(frozen=True, slots=True)
class Ranking:
    suspects: tuple[Suspect, ...]  # best first
    epochs: tuple[int, ...]  # epochs that carried evidence
    outside: int  # attacked (epoch, server) pairs outside the active set: random floods
    stale: int


def kl_bernoulli(a: float, b: float) -> float:
    """``KL(a || b)`` of two Bernoulli distributions, in nats (``0 < b < 1``)."""
    total = 0.0
    if a > 0:
        total += a * math.log(a / b)
    if a < 1:
        total += (1 - a) * math.log((1 - a) / (1 - b))
    return total


def score(hits: int, epochs: int, expected: float) -> float:
    """``G``: the generalised log-likelihood ratio of a raised attack rate, in nats."""
    if epochs == 0:
        return 0.0
    rate, null = hits / epochs, expected / epochs
    if rate <= null:
        return 0.0
    if null <= 0.0:
        # Never attacked by chance but attacked now: bounded by a tiny null rate.
        null = 1.0 / (1 << 30)
    return epochs * kl_bernoulli(rate, min(null, 1.0 - 1e-12))


def confidence(g: float, clients: int, epochs: int) -> float:
    """``1 - min(1, C * n * e^-G)``: see the module docstring."""
    if epochs == 0:
        return 0.0
    bound = math.log(clients * epochs) - g
    return 0.0 if bound >= 0 else -math.expm1(bound)


def rank(
    evidence: Evidence,
    clients: Sequence[int],
    assignment: Callable[[int], EpochAssignment | None],
) -> Ranking:
    """Rank ``clients`` by ``G`` over the epochs in ``evidence``.

    ``assignment(epoch)`` gives the epoch's active set and key (None: not known, e.g. after the
    key held; such an epoch carries no evidence).
    """
    if len(clients) > MAX_CLIENTS:
        raise SuspectsError(f"at most {MAX_CLIENTS} clients can be ranked, got {len(clients)}")
    for client in clients:
        try:
            check_client_id(client)
        except ConfigError as error:
            raise SuspectsError(str(error)) from None
    if len(set(clients)) != len(clients):
        raise SuspectsError("a client id is given twice")
    hits = dict.fromkeys(clients, 0)
    seen = dict.fromkeys(clients, 0)
    expected = dict.fromkeys(clients, 0.0)
    evidence_epochs: dict[int, list[int]] = {client: [] for client in clients}
    records: list[_Record] = []
    outside = 0
    for epoch in evidence.epochs():
        facts = assignment(epoch)
        if facts is None:
            continue
        active = set(facts.active)
        reported = evidence.reported(epoch) & active
        attacked = evidence.attacked(epoch)
        outside += len(attacked - active)
        attacked &= active
        if not reported:
            continue  # no report from any active server: nothing to learn
        record = _Record(epoch, facts, reported, attacked, len(attacked) / len(reported))
        records.append(record)
        for client in clients:
            server = facts.server_of(client)
            if server not in reported:
                continue  # missing report: this epoch says nothing about the client
            seen[client] += 1
            expected[client] += record.rate
            if server in attacked:
                hits[client] += 1
                evidence_epochs[client].append(epoch)
    full = {client: score(hits[client], seen[client], expected[client]) for client in clients}
    final = _explained_away(full, records)
    suspects = [
        Suspect(
            client,
            final.get(client, full[client]),
            confidence(final.get(client, full[client]), len(clients), seen[client]),
            hits[client],
            seen[client],
            expected[client],
            tuple(evidence_epochs[client]),
            full[client],
        )
        for client in clients
    ]
    suspects.sort(key=lambda suspect: (-suspect.score, -suspect.raw_score, suspect.client))
    return Ranking(
        tuple(suspects), tuple(record.epoch for record in records), outside, evidence.stale
    )


@dataclass(frozen=True, slots=True)
class RevocationPolicy:
    """The automatic revocation policy (off unless asked for: ``roam suspects --revoke-above``).

    Revoke the clients ranked at or above ``confidence`` (best first), at most ``at_most`` per
    evaluation. Pure: the caller revokes what ``choose`` returns, then evaluates again on
    fresh reports (a revoked client is not ranked any more). The bound on ``at_most`` is the
    defence against framing (docs/insiders.md): an attacker who floods the servers of chosen
    victims can push their scores up; one revocation per evaluation, and the next evaluation
    on the reports that follow it, limit what a framing attack costs before an operator sees
    that revocations change nothing.
    """

    confidence: float
    at_most: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.confidence, float | int) or not 0 < self.confidence < 1:
            raise SuspectsError(
                f"the revocation confidence must be between 0 and 1, got {self.confidence!r}"
            )
        if isinstance(self.at_most, bool) or not isinstance(self.at_most, int):
            raise SuspectsError(f"revocations per run must be an integer, got {self.at_most!r}")
        if self.at_most < 1:
            raise SuspectsError(f"revocations per run must be at least 1, got {self.at_most}")

    def choose(self, ranking: Ranking) -> tuple[Suspect, ...]:
        """The suspects to revoke now: at or above the confidence, best first, with at least
        one epoch of evidence, at most ``at_most`` of them."""
        chosen = [
            suspect
            for suspect in ranking.suspects
            if suspect.hits > 0 and suspect.above(self.confidence)
        ]
        chosen.sort(key=lambda suspect: (-suspect.confidence, -suspect.score, suspect.client))
        return tuple(chosen[: self.at_most])


@dataclass(frozen=True, slots=True)
class _Record:
    epoch: int
    facts: EpochAssignment
    reported: frozenset[int]
    attacked: frozenset[int]
    rate: float  # r_e


def _explained_away(full: dict[int, float], records: list[_Record]) -> dict[int, float]:
    """The scores of the leading candidates once each plausible alternative is accounted for.

    An innocent client that happened to share the insider's server in most epochs has the
    insider's evidence. For a candidate ``c`` and each *alternative* ``d`` (another of the
    ``CANDIDATES`` highest scores, at least half of ``c``'s), ``c``'s score is recomputed over
    the epochs in which ``c`` and ``d`` had different servers; ``c`` keeps the smallest. The
    insider's evidence survives (its server is attacked when alone too); a look-alike's does
    not. Never above the full score, so the confidence bound still holds.
    """
    leading = sorted((c for c in full if full[c] > 0), key=lambda c: (-full[c], c))[:CANDIDATES]
    servers = {c: [record.facts.server_of(c) for record in records] for c in leading}
    final = {}
    for c in leading:
        best = full[c]
        for d in leading:
            if d == c or full[d] < full[c] / 2:
                continue
            hits, seen, expected = 0, 0, 0.0
            for record, mine, theirs in zip(records, servers[c], servers[d], strict=True):
                if mine == theirs or mine not in record.reported:
                    continue
                seen += 1
                expected += record.rate
                hits += mine in record.attacked
            best = min(best, score(hits, seen, expected))
        final[c] = best
    return final


# -- reports as JSON lines -------------------------------------------------------------------

REPORT_FIELDS = frozenset({"epoch", "server", *MEASURES})


def format_report(report: AttackReport, server: str) -> str:
    """The JSON line ``parse_report`` reads for ``report`` (``server`` as the deployment
    writes it): what a server shim appends for each epoch it was active in."""
    return json.dumps(
        {
            "epoch": report.epoch,
            "server": server,
            "dropped": report.dropped,
            "syn": report.syn,
            "violations": report.violations,
        }
    )


def parse_report(line: str | bytes, servers: Mapping[str, int], where: str) -> AttackReport:
    """One JSON line ``{"epoch": E, "server": "HOST:PORT", "dropped": D, "syn": S,
    "violations": V}`` (measures optional, at least one) into a report; ``where`` names the
    line in errors."""
    try:
        value = loads(line)
    except (ValueError, RecursionError) as error:
        raise SuspectsError(f"{where}: not a JSON object ({error})") from None
    if not isinstance(value, dict):
        raise SuspectsError(f"{where}: not a JSON object")
    unknown = sorted(set(value) - REPORT_FIELDS)
    if unknown:
        raise SuspectsError(f"{where}: unknown field {unknown[0]!r}")
    epoch = value.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= 1 << 32:
        raise SuspectsError(f"{where}: 'epoch' must be an integer in 1..2^32, got {epoch!r}")
    server = value.get("server")
    if not isinstance(server, str):
        raise SuspectsError(f"{where}: 'server' must be a HOST:PORT string")
    if server not in servers:
        raise SuspectsError(f"{where}: server {server} is not in the deployment's server list")
    if not any(name in value for name in MEASURES):
        raise SuspectsError(f"{where}: no measure (one of {', '.join(MEASURES)})")
    counts = {}
    for name in MEASURES:
        count = value.get(name, 0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < MAX_COUNT:
            raise SuspectsError(f"{where}: {name!r} must be a non-negative integer, got {count!r}")
        counts[name] = count
    return AttackReport(epoch, servers[server], **counts)
