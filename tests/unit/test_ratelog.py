"""Rejection logging stays bounded whatever the rate, the gap or the clock does."""

import pytest

from migrate.kernel.eventlog import EventLog
from migrate.ratelog import OVERFLOW_KEY, RejectionLimiter


def test_first_of_each_key_in_full_then_one_count_per_period():
    limiter = RejectionLimiter(period_s=60, max_keys=8)
    logged = [
        limiter.record("update_rejected/AuthenticationError", 1000 + i * 0.001)[0]
        for i in range(10_000)
    ]
    assert logged.count(True) == 1
    assert limiter.record("update_rejected/MalformedMessageError", 1001)[0] is True
    # The period ends: the next rejection reports the counts of the last one, then is logged.
    first, summaries = limiter.record("update_rejected/AuthenticationError", 1061)
    assert first is True
    assert {(s.key, s.count) for s in summaries} == {("update_rejected/AuthenticationError", 9_999)}
    assert summaries[0].period_start == 1000


def test_a_period_that_ended_in_silence_is_reported_by_flush():
    limiter = RejectionLimiter(period_s=10)
    limiter.record("k", 5.0)
    limiter.record("k", 6.0)
    assert limiter.flush(14.9) == []
    [summary] = limiter.flush(15.0)
    assert (summary.key, summary.count, summary.period_end) == ("k", 1, 15.0)
    assert limiter.flush(100.0) == []  # reported once


def test_distinct_keys_are_bounded_in_memory_and_in_lines():
    limiter = RejectionLimiter(period_s=60, max_keys=4)
    lines = sum(limiter.record(f"error-{i}", 0.0)[0] for i in range(100_000))
    assert limiter.keys <= 5  # max_keys plus the shared overflow key
    assert lines == 5
    [overflow] = [s for s in limiter.flush(60.0) if s.key == OVERFLOW_KEY]
    assert overflow.count == 100_000 - 5


@pytest.mark.parametrize("gap", [1e-6, 59.999, 60.0, 3600.0, 86_400 * 365 * 100])
def test_any_gap_costs_one_step_and_loses_no_count(gap):
    limiter = RejectionLimiter(period_s=60)
    limiter.record("k", 1e9)
    limiter.record("k", 1e9)
    logged, summaries = limiter.record("k", 1e9 + gap)
    counted = sum(s.count for s in summaries) + sum(s.count for s in limiter.flush(1e9 + gap + 61))
    assert logged == (gap >= 60)
    assert counted == (1 if gap >= 60 else 2)


def test_a_clock_step_back_ends_the_period_and_reports_it():
    limiter = RejectionLimiter(period_s=60)
    limiter.record("k", 1000.0)
    limiter.record("k", 1001.0)
    logged, summaries = limiter.record("k", 500.0)  # the clock stepped back
    assert logged is True
    assert [(s.key, s.count) for s in summaries] == [("k", 1)]
    assert summaries[0].period_end >= summaries[0].period_start


def test_the_event_log_writes_a_bounded_number_of_lines(tmp_path):
    path = tmp_path / "client.jsonl"
    log = EventLog("client", path, stream=None)
    for i in range(5_000):
        error = "AuthenticationError" if i % 2 else "MalformedMessageError"
        log.rejection("update_rejected", now=10.0 + i * 0.001, error=error, source=f"o:{i}")
    log.flush_rejections(now=10.0 + 61)
    log.close()
    events = [line for line in path.read_text().splitlines() if line]
    assert len(events) == 4  # two first lines, two counts
    assert '"count": 2499' in events[2]
    assert '"count": 2499' in events[3]


def test_a_period_of_zero_logs_every_rejection():
    """The operator's choice (``--rejection-log-period 0``): no limit, nothing suppressed."""
    limiter = RejectionLimiter(period_s=0)
    for step in range(1000):
        logged, summaries = limiter.record("control_rejected/AuthenticationError", float(step))
        assert logged
        assert summaries == []
    assert limiter.flush(1e9) == []
    with pytest.raises(ValueError, match="period"):
        RejectionLimiter(period_s=-1)
