"""The migration port's per-client meter (issue 12, finding 3), over simulated time."""

import pytest

from migrate.admission import (
    MAX_PENDING_PER_CLIENT,
    REGENERATE_BURST_BYTES,
    REGENERATE_RATE,
    REPLAY_BURST_BYTES,
    SERVICE_BURST_S,
    SERVICE_RATE,
    MigrationMeter,
    OverBudgetError,
    TokenBucket,
)
from tests.unit.budget import bounded_step

INSIDER, VICTIM = 1, 2


def admit(meter, client, port, now, replay=100, regenerate=1000, rate_kbit=0, address=None):
    key = (address or f"10.0.0.{client}", port)
    meter.admit(
        client,
        key,
        replay_bytes=replay,
        regenerate_bytes=regenerate,
        rate_kbit=rate_kbit,
        now=now,
    )
    return key


def test_one_client_holds_at_most_the_cap_and_another_is_unaffected():
    meter = MigrationMeter(max_pending=4)
    for port in range(4):
        admit(meter, INSIDER, 40000 + port, now=0.0)
    with pytest.raises(OverBudgetError, match="holds 4 pending preparations"):
        admit(meter, INSIDER, 40100, now=0.0)
    assert meter.pending_of(INSIDER) == 4
    # The same key again (a retry or a refresh) is no new preparation.
    admit(meter, INSIDER, 40000, now=0.1)
    assert meter.pending_of(INSIDER) == 4
    # Another client's preparations are not counted against the insider's cap.
    for port in range(4):
        admit(meter, VICTIM, 40000 + port, now=0.0)
    assert meter.pending_of(VICTIM) == 4
    # A released preparation frees its place.
    meter.release(("10.0.0.1", 40001))
    admit(meter, INSIDER, 40100, now=0.2)
    assert meter.pending_of(INSIDER) == 4


def test_the_default_cap_leaves_room_for_a_client_moving_a_thousand_connections():
    meter = MigrationMeter()
    for port in range(1000):
        admit(meter, VICTIM, 30000 + port, now=0.0)
    assert meter.pending_of(VICTIM) == 1000 <= MAX_PENDING_PER_CLIENT


def test_a_key_held_by_one_client_is_refused_to_another():
    meter = MigrationMeter()
    key = admit(meter, VICTIM, 40000, now=0.0, address="10.0.0.9")
    with pytest.raises(OverBudgetError, match="another client"):
        admit(meter, INSIDER, 40000, now=0.0, address="10.0.0.9")
    assert meter.owner(key) == VICTIM
    meter.release(key)
    assert meter.owner(key) is None


def test_regeneration_claims_beyond_the_budget_are_refused_and_refill_over_time():
    meter = MigrationMeter()
    # A claim of 2^63 bytes received (the client chooses s2c_received): refused outright.
    with pytest.raises(OverBudgetError, match="regeneration budget"):
        admit(meter, INSIDER, 40000, now=0.0, regenerate=2**63)
    assert meter.pending_of(INSIDER) == 0
    admit(meter, INSIDER, 40000, now=0.0, regenerate=REGENERATE_BURST_BYTES)
    with pytest.raises(OverBudgetError, match="regeneration budget"):
        admit(meter, INSIDER, 40001, now=0.0, regenerate=REGENERATE_RATE)
    # One second later, one second's worth is back.
    admit(meter, INSIDER, 40001, now=1.0, regenerate=REGENERATE_RATE)
    # Extensions (refresh, COMMIT) are charged too.
    with pytest.raises(OverBudgetError):
        meter.extend(INSIDER, replay_bytes=0, regenerate_bytes=REGENERATE_RATE, now=1.0)


def test_replay_bytes_follow_the_rate_contract():
    meter = MigrationMeter()
    rate_kbit = 800  # 100 kB/s
    admit(meter, INSIDER, 40000, now=0.0, replay=REPLAY_BURST_BYTES, rate_kbit=rate_kbit)
    with pytest.raises(OverBudgetError, match="replay budget"):
        admit(meter, INSIDER, 40001, now=0.5, replay=60_000, rate_kbit=rate_kbit)
    admit(meter, INSIDER, 40001, now=0.6, replay=60_000, rate_kbit=rate_kbit)


def test_service_time_in_debt_refuses_new_preparations_until_paid_back():
    meter = MigrationMeter()
    admit(meter, INSIDER, 40000, now=0.0)
    meter.used_service(INSIDER, SERVICE_BURST_S + 10.0, now=0.0)
    paid_back = 10.0 / SERVICE_RATE
    with pytest.raises(OverBudgetError, match="service time"):
        admit(meter, INSIDER, 40001, now=paid_back * 0.9)
    admit(meter, VICTIM, 40001, now=paid_back * 0.9)  # the victim is not in anybody's debt
    admit(meter, INSIDER, 40001, now=paid_back * 1.1)


@pytest.mark.parametrize(
    "gap", [1.0, 3600.0, 86400.0 * 7, 86400.0 * 365 * 100, -3600.0, -86400.0 * 365]
)
def test_buckets_take_any_gap_or_clock_step_in_constant_time(gap):
    bucket = TokenBucket.full(100.0, 1.0, now=1000.0)
    bucket.take(100.0, now=1000.0)
    with bounded_step(f"a refill after {gap:+.0f} s"):  # counted work, not a stopwatch
        bucket.refill(1000.0 + gap)
    if gap > 0:
        assert bucket.level == min(100.0, gap)
    else:
        # A clock stepping back refills nothing and takes nothing; time then runs on from it.
        assert bucket.level == 0.0
        bucket.refill(1000.0 + gap + 5.0)
        assert bucket.level == 5.0


def test_a_week_of_preparations_keeps_memory_bounded():
    meter = MigrationMeter(max_pending=8)
    now, held, refused = 0.0, [], 0
    for step in range(20_000):
        now += 30.0  # a week in 30 s steps
        try:
            held.append(admit(meter, INSIDER, 1 + step % 65535, now=now))
        except OverBudgetError:
            refused += 1
            meter.release(held.pop(0))  # the oldest expires
        assert meter.pending_of(INSIDER) <= 8
    assert refused > 0
    assert len(meter.owners) <= 8
    assert len(meter.clients) == 1
