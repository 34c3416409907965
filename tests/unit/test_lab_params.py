"""LinkParams: every invalid value is refused with a one-line ConfigError."""

from __future__ import annotations

import math

import pytest

from labs import ConfigError, LinkParams
from labs.shaping import loss_ruleset


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_mbit": 0}, "rate_mbit must be in"),
        ({"rate_mbit": -1}, "rate_mbit must be in"),
        ({"rate_mbit": 1e9}, "rate_mbit must be in"),
        ({"rate_mbit": math.inf}, "rate_mbit must be finite"),
        ({"rate_mbit": "20"}, "rate_mbit must be a number"),
        ({"rate_mbit": True}, "rate_mbit must be a number"),
        ({"burst_kb": 10}, "burst_kb needs rate_mbit"),
        ({"rate_mbit": 10, "burst_kb": 0}, "burst_kb must be in"),
        ({"delay_ms": -1}, "delay_ms must be in"),
        ({"delay_ms": math.nan}, "delay_ms must be finite"),
        ({"loss_pct": -0.5}, "loss_pct must be in"),
        ({"loss_pct": 100.5}, "loss_pct must be in"),
        ({"loss_pct": 0.001}, "multiple of 0.01"),
        ({"queue_packets": 10}, "queue_packets needs rate_mbit or delay_ms"),
        ({"rate_mbit": 10, "queue_packets": 0}, "queue_packets must be in"),
        ({"rate_mbit": 10, "queue_packets": 2.5}, "queue_packets must be an integer"),
        ({"disable_offloads": "yes"}, "disable_offloads must be a bool"),
    ],
)
def test_invalid_values_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        LinkParams(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith("invalid link parameters: ")


def test_defaults_shape_nothing_and_keep_offloads() -> None:
    params = LinkParams()
    assert not params.shapes_traffic
    assert not params.offloads_off
    assert params.burst_bytes is None
    assert params.loss_per_10000 == 0


def test_shaping_turns_offloads_off_unless_told_otherwise() -> None:
    assert LinkParams(rate_mbit=20).offloads_off
    assert LinkParams(loss_pct=1).offloads_off
    assert not LinkParams(rate_mbit=20, disable_offloads=False).offloads_off
    assert LinkParams(disable_offloads=True).offloads_off


def test_burst_defaults_to_ten_ms_of_the_rate_but_at_least_two_frames() -> None:
    assert LinkParams(rate_mbit=20).burst_bytes == 25_000
    assert LinkParams(rate_mbit=0.1).burst_bytes == 2 * 1514
    assert LinkParams(rate_mbit=20, burst_kb=64).burst_bytes == 64_000


def test_loss_resolution_is_hundredths_of_a_percent() -> None:
    assert LinkParams(loss_pct=10).loss_per_10000 == 1000
    assert LinkParams(loss_pct=0.3).loss_per_10000 == 30  # 0.1 * 3 is not exactly 0.3
    assert LinkParams(loss_pct=100).loss_per_10000 == 10000


def test_loss_ruleset_drops_arriving_ipv4_in_one_table() -> None:
    ruleset = loss_ruleset("roam_1_abcd", {"eth1": 1000, "eth0": 250})
    assert ruleset.startswith("table netdev roam_1_abcd {")
    assert ruleset.count("chain loss_") == 2
    assert ruleset.index("loss_eth0") < ruleset.index("loss_eth1")
    assert 'hook ingress device "eth1"' in ruleset
    assert "meta protocol ip numgen random mod 10000 < 1000 counter drop" in ruleset
