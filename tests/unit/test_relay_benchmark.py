"""The relay benchmark's pure parts: HAProxy config, percentiles, per-round ratios, table."""

from __future__ import annotations

from typing import Any

import pytest

from labs.benchmarks.relay import _median_row, _percentiles, haproxy_config, render


def test_haproxy_config_is_tcp_splice_auto_to_loopback() -> None:
    config = haproxy_config([("10.0.1.1", 6002, 5201), ("10.0.1.1", 6003, 7000)])
    assert "mode tcp" in config
    assert "option splice-auto" in config
    forced = haproxy_config([("10.0.1.1", 6002, 5201)], ["option splice-request"])
    assert "option splice-request" in forced
    assert "splice-auto" not in forced
    assert "bind 10.0.1.1:6002" in config
    assert "server service 127.0.0.1:5201" in config
    assert "server service 127.0.0.1:7000" in config


def test_percentiles() -> None:
    assert _percentiles([]) == {"p50": 0.0, "p99": 0.0}
    samples = [float(i) for i in range(1, 101)]
    assert _percentiles(samples) == {"p50": 51.0, "p99": 100.0}


def run(gbit_s: float) -> dict[str, Any]:
    return {
        "gbit_s": gbit_s,
        "retransmits": 0,
        "proxy_user_pct": 1.0,
        "proxy_system_pct": 2.0,
        "machine_busy_pct": 150.0,
        "machine_cpu_s_per_gb": 1.2,
    }


def test_ratios_are_taken_round_by_round() -> None:
    # round 2 ran on a busy machine: both paths slower, the ratio unchanged
    direct = [run(10.0), run(5.0), run(10.0)]
    relay = [run(8.0), run(4.0), run(9.0)]
    row = _median_row(relay, {"direct": direct})
    assert row["gbit_s"] == 8.0
    assert row["vs_direct"] == pytest.approx(0.8)
    assert row["runs_gbit_s"] == [8.0, 4.0, 9.0]


def test_render_has_both_tables() -> None:
    latency = {"rr_us": {"p50": 10.0, "p99": 20.0}, "connect_us": {"p50": 100.0, "p99": 300.0}}
    direct = [run(10.0)]
    row = {
        "client_to_service": _median_row(direct, {"direct": direct}),
        "service_to_client": _median_row(direct, {"direct": direct}),
        "latency": latency,
        "latency_one_cpu": latency,
    }
    text = render({"paths": {"direct": row}, "background_busy_pct": [12.0]})
    assert "| direct | 10.00 | 10.00 | 1.00x / 1.00x | - / - | - / - |" in text
    assert "| direct | - | - | 150 / 150 | 1.20 / 1.20 |" in text
    assert "| direct | 10 / 20 | 100 / 300 | 10 / 20 | 100 / 300 |" in text
