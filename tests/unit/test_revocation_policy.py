"""The automatic revocation policy (``roam suspects --revoke-above``): the pure decision, and
the command that applies it to the operator's list."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrate.kernel.deployment import DeploymentDir
from migrate.suspects import Ranking, RevocationPolicy, Suspect, SuspectsError
from tests.unit.cli import run

from .test_cli_suspects import CLIENTS, INSIDER, deployment, flood_reports  # noqa: F401


def suspect(client: int, confidence: float, score: float = 1.0, hits: int = 5) -> Suspect:
    return Suspect(client, score, confidence, hits, 10, 3.0, tuple(range(hits)), score)


def ranking(*suspects: Suspect) -> Ranking:
    ordered = sorted(suspects, key=lambda s: (-s.score, s.client))
    return Ranking(tuple(ordered), tuple(range(1, 11)), 0, 0)


def test_nobody_below_the_confidence_is_revoked() -> None:
    policy = RevocationPolicy(0.99)
    assert policy.choose(ranking(suspect(1, 0.98), suspect(2, 0.5), suspect(3, 0.0))) == ()


def test_the_best_suspect_at_or_above_the_confidence_is_revoked() -> None:
    policy = RevocationPolicy(0.99)
    chosen = policy.choose(ranking(suspect(1, 0.2, 0.5), suspect(7, 0.99, 12.0)))
    assert [s.client for s in chosen] == [7]


def test_at_most_n_per_run_best_first() -> None:
    suspects = [suspect(c, 0.999 - c / 1000, 20.0 - c) for c in range(1, 6)]
    assert [s.client for s in RevocationPolicy(0.99).choose(ranking(*suspects))] == [1]
    chosen = RevocationPolicy(0.99, at_most=3).choose(ranking(*suspects))
    assert [s.client for s in chosen] == [1, 2, 3]


def test_a_client_without_a_hit_is_never_revoked() -> None:
    assert RevocationPolicy(0.5).choose(ranking(suspect(4, 0.9, hits=0))) == ()


@pytest.mark.parametrize(
    ("confidence", "at_most", "text"),
    [
        (0.0, 1, "between 0 and 1"),
        (1.0, 1, "between 0 and 1"),
        (0.99, 0, "at least 1"),
        (0.99, True, "must be an integer"),
    ],
)
def test_bad_parameters_are_refused(confidence: float, at_most: int, text: str) -> None:
    with pytest.raises(SuspectsError, match=text):
        RevocationPolicy(confidence, at_most)


@given(
    st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 50), st.integers(0, 10)),
        max_size=30,
    ),
    st.floats(0.01, 0.999),
    st.integers(1, 5),
)
def test_the_choice_is_a_bounded_set_of_those_above(
    rows: list[tuple[float, float, int]], threshold: float, at_most: int
) -> None:
    suspects = [suspect(i + 1, c, g, h) for i, (c, g, h) in enumerate(rows)]
    chosen = RevocationPolicy(threshold, at_most).choose(ranking(*suspects))
    above = [s for s in suspects if s.confidence >= threshold and s.hits > 0]
    assert len(chosen) == min(at_most, len(above))
    assert all(s in above for s in chosen)
    # Nobody left out is more confident than someone chosen.
    if chosen:
        lowest = min(s.confidence for s in chosen)
        assert all(s.confidence <= lowest for s in above if s not in chosen)


def test_the_command_revokes_the_insider_and_nobody_else(deployment, tmp_path, capsys):  # noqa: F811
    reports = flood_reports(deployment, 5, range(1, 31), tmp_path / "reports.jsonl")
    argv = ["suspects", str(deployment), "--reports", str(reports)]
    status, out, err = run(capsys, *argv, "--revoke-above", "0.99", "--no-notify")
    assert (status, err) == (0, "")
    assert f"policy: revoking {INSIDER} (confidence" in out
    assert f"revoked {INSIDER}:" in out
    listed = DeploymentDir(deployment).clients(DeploymentDir(deployment).secret()).clients
    assert [c.name for c in listed if c.revoked] == [INSIDER]
    # Run again: the insider is no longer ranked, nobody else is above the threshold.
    status, out, err = run(capsys, *argv, "--revoke-above", "0.99", "--no-notify", "--json")
    assert status == 0
    document = json.loads(out)
    assert document["revoked"] == []
    assert len(document["suspects"]) == CLIENTS - 1


def test_without_the_policy_nobody_is_revoked(deployment, tmp_path, capsys):  # noqa: F811
    reports = flood_reports(deployment, 5, range(1, 31), tmp_path / "reports.jsonl")
    status, out, _ = run(capsys, "suspects", str(deployment), "--reports", str(reports))
    assert status == 0
    assert "SUSPECT" in out
    assert "revoking" not in out
    listed = DeploymentDir(deployment).clients(DeploymentDir(deployment).secret()).clients
    assert not any(c.revoked for c in listed)


def test_below_the_threshold_the_command_says_nobody_was_revoked(deployment, tmp_path, capsys):  # noqa: F811
    reports = flood_reports(deployment, 5, range(1, 4), tmp_path / "reports.jsonl")
    argv = ["suspects", str(deployment), "--reports", str(reports), "--revoke-above", "0.99"]
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert "no client at or above confidence 0.99: nobody revoked" in out


def test_policy_options_without_the_policy_are_one_line_errors(deployment, tmp_path, capsys):  # noqa: F811
    reports = flood_reports(deployment, 5, range(1, 4), tmp_path / "reports.jsonl")
    for extra in (["--revoke-at-most", "2"], ["--no-notify"]):
        argv = ["suspects", str(deployment), "--reports", str(reports), *extra]
        status, out, err = run(capsys, *argv)
        assert status != 0
        assert out == ""
        assert err.count("\n") == 1
        assert "go with --revoke-above P" in err
