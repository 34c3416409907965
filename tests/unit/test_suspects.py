"""The insider-suspects ranking (migrate.suspects) over simulated weeks of k-of-N epochs."""

import math
import random
import statistics
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.activeset import ActiveSchedule, EpochAssignment
from migrate.endpoints import Endpoint
from migrate.hashchain import KeyChain
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams
from migrate.suspects import (
    AttackReport,
    Evidence,
    SuspectsError,
    Thresholds,
    confidence,
    parse_report,
    rank,
    score,
)

CONFIDENCE = 0.99
WEEK = 7 * 24 * 60  # epochs of one minute on average: a week
FLOOD = 50_000


@dataclass
class Run:
    isolated_at: int | None  # first epoch the insider is first and above the threshold
    false_alarms: list[tuple[int, int, float]]  # (epoch, innocent client, confidence)
    last: object


def simulate(
    seed: int,
    epochs: int,
    *,
    clients: int = 20,
    servers: int = 6,
    k: int = 3,
    insider: int | None = 7,
    detect: float = 0.9,
    noise: float = 0.05,
    missing: float = 0.05,
    framing: int = 0,
    evaluate_every: int = 1,
    dense_until: int = 80,
    window: int = 256,
) -> Run:
    """``epochs`` epochs of a deployment with ``k`` of ``servers`` active and ``clients``
    clients, one of them (``insider``) leaking its schedule to an attacker who floods the
    insider's server from the start of each epoch (seen with probability ``detect``), plus
    ``framing`` random servers of the pool, background noise (a server reports an attack with
    probability ``noise``) and lost reports (probability ``missing``)."""
    rng = random.Random(seed)
    endpoints = tuple(Endpoint.parse(f"10.3.0.{i + 1}:80") for i in range(servers))
    params = ScheduleParams(endpoints, 1.0, 0.0, MSchedule(6))
    active = ActiveSchedule(EpochSchedule(KeyChain(rng.randbytes(32), epochs), params), k)
    ids = list(range(1, clients + 1))
    cache: dict[int, EpochAssignment] = {}
    evidence = Evidence(servers, window, Thresholds(dropped=1000))
    run = Run(None, [], None)
    for epoch in range(1, epochs + 1):
        facts = active.assignment(epoch)
        cache[epoch] = facts
        cache.pop(epoch - window - 1, None)
        flooded = set(rng.sample(range(servers), framing))
        if insider is not None and rng.random() < detect:
            flooded.add(facts.server_of(insider))
        for server in range(servers):
            if rng.random() < missing:
                continue
            dropped = rng.randrange(50)  # background scanning of every gate
            if server in flooded:
                dropped += FLOOD
            if rng.random() < noise:
                dropped += 2000  # a burst that is not the insider's attack
            evidence.add(AttackReport(epoch, server, dropped=dropped))
        if epoch > dense_until and epoch % evaluate_every:
            continue
        ranking = rank(evidence, ids, cache.get)
        run.last = ranking
        top = ranking.suspects[0]
        for suspect in ranking.suspects:
            if suspect.client != insider and suspect.above(CONFIDENCE):
                run.false_alarms.append((epoch, suspect.client, suspect.confidence))
        if (
            run.isolated_at is None
            and insider is not None
            and top.client == insider
            and top.above(CONFIDENCE)
        ):
            run.isolated_at = epoch
    return run


def test_one_insider_among_20_is_ranked_first_within_25_epochs():
    epochs_to_isolate = []
    for seed in range(10):
        run = simulate(seed, 60)
        assert run.isolated_at is not None, seed
        assert run.false_alarms == [], seed
        epochs_to_isolate.append(run.isolated_at)
    assert max(epochs_to_isolate) <= 25
    print(f"epochs to isolate (k=3, N=6, 20 clients): {sorted(epochs_to_isolate)}")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32), insider=st.integers(1, 20))
def test_any_insider_is_isolated_and_stays_first(seed, insider):
    run = simulate(seed, 120, insider=insider, dense_until=40, evaluate_every=8)
    assert run.isolated_at is not None
    assert run.isolated_at <= 40
    assert run.false_alarms == []
    assert run.last.suspects[0].client == insider


def test_a_week_without_insider_raises_no_alarm():
    run = simulate(1, WEEK, insider=None, noise=0.1, evaluate_every=64, dense_until=0)
    assert run.false_alarms == []
    top = run.last.suspects[0]
    assert top.confidence < CONFIDENCE
    assert len(run.last.epochs) == 256  # the window: bounded however long it runs


def test_a_week_of_random_floods_frames_nobody():
    # An attacker who floods two random servers of the pool every epoch, no insider.
    run = simulate(2, WEEK, insider=None, framing=2, evaluate_every=64, dense_until=0)
    assert run.false_alarms == []
    assert run.last.outside > 0  # floods of inactive servers are seen and counted


def test_an_insider_who_also_floods_random_servers_is_still_isolated():
    runs = [simulate(seed, 200, framing=2, evaluate_every=4, dense_until=80) for seed in range(5)]
    for run in runs:
        assert run.false_alarms == []
        assert run.isolated_at is not None
        assert run.isolated_at <= 80
    print(f"epochs to isolate with framing floods: {[run.isolated_at for run in runs]}")


def test_an_attack_on_every_server_identifies_nobody():
    run = simulate(3, 100, framing=6)
    assert run.isolated_at is None
    assert all(suspect.score == 0.0 for suspect in run.last.suspects)


def test_lost_and_noisy_reports_slow_but_do_not_stop_isolation():
    run = simulate(4, 150, detect=0.7, noise=0.15, missing=0.3)
    assert run.false_alarms == []
    assert run.isolated_at is not None
    assert run.isolated_at <= 120


def test_evidence_lists_the_epochs_of_the_hits():
    run = simulate(5, 40)
    top = run.last.suspects[0]
    assert top.client == 7
    assert len(top.evidence) == top.hits
    assert list(top.evidence) == sorted(top.evidence)
    assert top.hits > top.expected


# -- the pieces ------------------------------------------------------------------------------


def test_score_and_confidence():
    assert score(0, 0, 0.0) == 0.0
    assert score(3, 10, 5.0) == 0.0  # attacked less often than a random server
    assert score(10, 10, 10 / 3) == pytest.approx(10 * math.log(3))
    assert confidence(0.0, 20, 10) == 0.0
    g = math.log(20 * 10) + math.log(100)  # C * n * e^-G = 0.01
    assert confidence(g, 20, 10) == pytest.approx(0.99)


def test_evidence_is_bounded_and_keeps_the_larger_resent_counts():
    evidence = Evidence(servers=3, window=4)
    for epoch in range(1, 11):
        evidence.add(AttackReport(epoch, 0, dropped=5))
    assert evidence.epochs() == [7, 8, 9, 10]
    assert not evidence.add(AttackReport(6, 1, dropped=5000))
    assert evidence.stale == 7
    evidence.add(AttackReport(10, 1, dropped=5000))
    evidence.add(AttackReport(10, 1, dropped=10, syn=3))
    assert evidence.attacked(10) == {1}
    with pytest.raises(SuspectsError, match="server index 3"):
        evidence.add(AttackReport(10, 3, dropped=1))
    with pytest.raises(SuspectsError, match="window"):
        Evidence(servers=3, window=0)


def test_rank_refuses_bad_clients():
    evidence = Evidence(servers=3)
    with pytest.raises(SuspectsError, match="twice"):
        rank(evidence, [1, 1], lambda _e: None)
    with pytest.raises(SuspectsError, match="client id"):
        rank(evidence, [0], lambda _e: None)


SERVERS = {"10.0.0.1:80": 0, "10.0.0.2:80": 1}


def test_parse_report():
    report = parse_report('{"epoch": 3, "server": "10.0.0.2:80", "syn": 12}', SERVERS, "line 1")
    assert report == AttackReport(3, 1, syn=12)


@pytest.mark.parametrize(
    ("line", "text"),
    [
        ("nope", "line 9: not a JSON object"),
        ("[1]", "line 9: not a JSON object"),
        ('{"epoch": 0, "server": "10.0.0.1:80", "dropped": 1}', "'epoch' must be an integer"),
        ('{"epoch": true, "server": "10.0.0.1:80", "dropped": 1}', "'epoch' must be an integer"),
        ('{"epoch": 1, "server": "10.0.0.9:80", "dropped": 1}', "not in the deployment's"),
        ('{"epoch": 1, "server": 5, "dropped": 1}', "'server' must be a HOST:PORT"),
        ('{"epoch": 1, "server": "10.0.0.1:80"}', "no measure"),
        ('{"epoch": 1, "server": "10.0.0.1:80", "dropped": -1}', "'dropped' must be a non-neg"),
        ('{"epoch": 1, "server": "10.0.0.1:80", "syn": 1.5}', "'syn' must be a non-negative"),
        ('{"epoch": 1, "server": "10.0.0.1:80", "dropped": 1, "x": 2}', "unknown field 'x'"),
        ('{"epoch": 1, "epoch": 2, "server": "10.0.0.1:80", "dropped": 1}', "'epoch' given twice"),
        ("[" * 100_000, "line 9: not a JSON object"),
    ],
)
def test_malformed_reports_are_named(line, text):
    with pytest.raises(SuspectsError, match=text) as caught:
        parse_report(line, SERVERS, "line 9")
    assert "\n" not in str(caught.value)


@dataclass(frozen=True)
class Placed:
    """An epoch's assignment given explicitly (for hand-built cases)."""

    active: tuple[int, ...]
    placement: dict[int, int]

    def server_of(self, client: int) -> int:
        return self.placement[client]


def test_a_look_alike_of_the_insider_is_not_flagged_until_they_part():
    # Clients 1 and 2 share the attacked server for 12 epochs: identical evidence. Either could
    # be the insider, so neither may be flagged (their full score alone would say 0.9999).
    evidence = Evidence(servers=3)
    placed = {}
    for epoch in range(1, 13):
        placed[epoch] = Placed((0, 1, 2), {1: epoch % 3, 2: epoch % 3, 3: (epoch + 1) % 3})
        for server in range(3):
            flooded = server == epoch % 3
            evidence.add(AttackReport(epoch, server, dropped=FLOOD if flooded else 0))
    ranking = rank(evidence, [1, 2, 3], placed.get)
    one, two = ranking.suspects[0], ranking.suspects[1]
    assert {one.client, two.client} == {1, 2}
    assert one.raw_score == pytest.approx(12 * math.log(3))
    assert confidence(one.raw_score, 3, 12) > CONFIDENCE
    assert not one.above(CONFIDENCE)
    assert not two.above(CONFIDENCE)
    # Then they part: only client 1's server is attacked.
    for epoch in range(13, 25):
        placed[epoch] = Placed((0, 1, 2), {1: epoch % 3, 2: (epoch + 1) % 3, 3: (epoch + 1) % 3})
        for server in range(3):
            flooded = server == epoch % 3
            evidence.add(AttackReport(epoch, server, dropped=FLOOD if flooded else 0))
    ranking = rank(evidence, [1, 2, 3], placed.get)
    assert ranking.suspects[0].client == 1
    assert ranking.suspects[0].above(CONFIDENCE)
    assert not any(suspect.above(CONFIDENCE) for suspect in ranking.suspects[1:])


def measure(name: str, runs: int = 100, epochs: int = 200, **options) -> str:
    """One row of docs/insiders.md's table: epochs to isolate over ``runs`` seeds."""
    found, missed, alarms = [], 0, 0
    for seed in range(runs):
        run = simulate(seed, epochs, dense_until=epochs, **options)
        if run.isolated_at is None:
            missed += 1
        else:
            found.append(run.isolated_at)
        alarms += bool(run.false_alarms)
    found.sort()
    median = f"{statistics.median(found):.0f}" if found else "-"
    p90 = found[min(len(found) - 1, int(0.9 * len(found)))] if found else "-"
    top = found[-1] if found else "-"
    return f"| {name} | {median} | {p90} | {top} | {missed} | {alarms} |"


if __name__ == "__main__":  # PYTHONPATH=. python -m tests.unit.test_suspects
    print("| case | median E | 90th pct | max | not isolated in 200 | runs with a false alarm |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("k=3, clean (seen 1, no noise, no loss)", {"detect": 1.0, "noise": 0.0, "missing": 0.0}),
        ("k=3, default (seen 0.9, noise 0.05, loss 0.05)", {}),
        ("k=3, + 2 random servers flooded per epoch", {"framing": 2}),
        (
            "k=3, weak (seen 0.7, noise 0.15, loss 0.3)",
            {"detect": 0.7, "noise": 0.15, "missing": 0.3},
        ),
        ("k=2, default", {"k": 2}),
        ("k=6 (all servers), default", {"k": 6}),
        ("k=3, 100 clients, default (40 runs)", {"clients": 100, "runs": 40}),
    ]
    for name, options in rows:
        print(measure(name, **options), flush=True)
    alarms, runs = 0, 0
    for seed in range(20):
        for options in ({"noise": 0.1}, {"framing": 2}):
            week = simulate(
                100 + seed, WEEK, insider=None, evaluate_every=16, dense_until=0, **options
            )
            alarms, runs = alarms + bool(week.false_alarms), runs + 1
    print(f"{runs} weeks without insider: {alarms} with a false alarm")
