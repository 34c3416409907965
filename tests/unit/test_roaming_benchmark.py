"""The roaming benchmark's pure parts: statistics, parsers, per-roam pauses, tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from labs.benchmarks.roaming import GAP_FLOOR_S
from labs.benchmarks.roaming.__main__ import main as roaming_main
from labs.benchmarks.roaming.analysis import (
    analyse_stream,
    handover_waits,
    median_ratio,
    netstat_counters,
    ping_times,
    regenerations,
    roam_pauses,
    summarise_shims,
    summarise_streams,
)
from labs.benchmarks.roaming.clients import _Arrivals, parse_head
from labs.benchmarks.roaming.rendering import opening_line, render_migration, render_shims
from labs.stats import nearest_rank, p50_p99


def test_percentiles_by_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert nearest_rank(samples, 0.5) == 51.0
    assert nearest_rank(samples, 0.99) == 100.0
    assert nearest_rank([], 0.5) == 0.0
    assert p50_p99([3.0, 1.0, 2.0]) == {"p50": 2.0, "p99": 3.0, "n": 3}


def test_ratios_are_taken_round_by_round() -> None:
    # round 2 ran on a busy machine: both slower, the ratio unchanged; a zero base is skipped
    assert median_ratio([8.0, 4.0, 9.0], [10.0, 5.0, 10.0]) == pytest.approx(0.8)
    assert median_ratio([1.0], [0.0]) is None


def test_ping_times() -> None:
    output = (
        "64 bytes from 10.0.1.1: icmp_seq=1 ttl=64 time=0.052 ms\n"
        "64 bytes from 10.0.1.1: icmp_seq=2 ttl=64 time=0.110 ms\n"
        "rtt min/avg/max/mdev = 0.052/0.081/0.110/0.029 ms\n"
    )
    assert ping_times(output) == [0.052, 0.110]


def test_netstat_counters_pair_header_and_value_lines() -> None:
    text = (
        "TcpExt: SyncookiesSent PAWSEstab\nTcpExt: 0 7\nTcp: RtoAlgorithm RetransSegs\nTcp: 1 42\n"
    )
    counters = netstat_counters(text)
    assert counters["TcpExt.PAWSEstab"] == 7
    assert counters["Tcp.RetransSegs"] == 42


def test_parse_head() -> None:
    head = b"HTTP/1.1 206 Partial Content\r\nServer: nginx\r\nContent-Length: 1234"
    assert parse_head(head) == (206, 1234)


def test_arrivals_keep_only_gaps_above_the_floor() -> None:
    arrivals = _Arrivals(0.001)
    for when in (10.0, 10.0005, 10.2, 10.2002):
        arrivals.add(when, 100)
    assert arrivals.bytes == 400
    assert arrivals.receives == 4
    assert arrivals.gaps == [(10.0005, 10.2)]


def test_a_roam_gets_the_longest_gap_around_its_switch() -> None:
    gaps = [(9.0, 9.01), (10.0, 10.03), (10.05, 10.06), (12.0, 12.5)]
    pauses = roam_pauses(gaps, [10.02, 15.0], freeze_s=[0.05, 0.0], after_s=1.0)
    assert pauses[0] == pytest.approx(0.03)
    assert pauses[1] == GAP_FLOOR_S  # nothing overlaps its window: an upper bound


def test_a_stall_spanning_several_roams_counts_once() -> None:
    gaps = [(10.0, 15.0)]
    pauses = roam_pauses(gaps, [10.03, 11.0, 12.0], after_s=1.5)
    assert pauses[0] == pytest.approx(5.0)
    assert pauses[1:] == [None, None]


def test_a_roam_that_froze_inside_an_earlier_stall_is_not_counted_again() -> None:
    # the stall ends just before the second roam's switch, but it froze inside the stall
    gaps = [(10.0, 11.99), (12.1, 12.102)]
    pauses = roam_pauses(gaps, [10.03, 12.0], freeze_s=[0.03, 0.04], after_s=1.5)
    assert pauses == [pytest.approx(1.99), None]


def test_a_window_ends_where_the_next_roams_window_starts() -> None:
    # the gap after the second switch belongs to it, not to the first roam
    gaps = [(10.0, 10.01), (10.6, 10.9)]
    pauses = roam_pauses(gaps, [10.005, 10.7], after_s=1.5)
    assert pauses[0] == pytest.approx(0.01)
    assert pauses[1] == pytest.approx(0.3)


def stream(gaps: list[tuple[float, float]], breaks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "first": 1.0,
        "last": 30.0,
        "gaps": gaps,
        "breaks": breaks,
        "mbit_s": 64.0,
        "bytes": 10,
        "files": 2,
        "bad_files": 0,
    }


def test_analyse_stream_matches_switches_roams_and_breaks() -> None:
    events = [
        {"event": "switch", "ts": 0.5, "epoch": 1},  # before the download: ignored
        {"event": "roam", "ts": 10.0, "epoch": 5, "pause_ms": 30.0, "outcomes": {"migrated": 1}},
        {"event": "switch", "ts": 10.0, "epoch": 5},
        {"event": "roam", "ts": 20.0, "epoch": 7, "pause_ms": 40.0, "outcomes": {"migrated": 1}},
        {"event": "switch", "ts": 20.0, "epoch": 7},
    ]
    breaks = [{"last_data": 9.9, "detected": 9.95, "data_again": 9.953, "error": "X: y"}]
    result = analyse_stream(stream([(9.97, 10.01), (19.96, 21.0)], breaks), events, 0.0)
    assert result["roams"] == 2
    assert result["app_pause_ms"] == [pytest.approx(40.0), pytest.approx(1040.0)]
    assert result["shim_pause_ms"] == [30.0, 40.0]
    assert result["outcomes"] == {"migrated": 2}
    assert result["recovery_ms"] == [pytest.approx(3.0)]
    assert result["break_errors"] == ["X"]


def test_the_wait_in_a_hand_over_is_the_gap_that_overlaps_its_own_steps() -> None:
    """A paced client's own gap between files, 50 ms before the freeze, is the roam's pause
    (an upper bound) but not a wait in the hand-over; a receive buffer that bridges the steps
    is no wait at all; a gap that starts in the steps counts whole, however long after."""
    gaps = [(9.90, 9.906), (10.001, 10.0042), (19.0, 19.005), (30.003, 30.5)]
    steps = [(10.0, 10.003), (20.0, 20.003), (30.0, 30.003)]
    assert handover_waits(gaps, steps) == pytest.approx([0.0032, 0.0, 0.497])
    events = [
        {"event": "roam", "ts": 10.0, "epoch": 5, "pause_ms": 3.0,
         "steps_ms": {"frozen": 0.2, "switched": 2.8, "go_sent": 3.0}},
        {"event": "switch", "ts": 10.0028, "epoch": 5},
    ]  # fmt: skip
    result = analyse_stream(stream([(9.95, 9.956), (10.001, 10.0042)], []), events, 0.0)
    assert result["app_pause_ms"] == [pytest.approx(6.0)]
    assert result["handover_wait_ms"] == [pytest.approx(3.2)]


def test_regenerations_are_the_new_servers_reincarnations_during_the_download_in_order() -> None:
    events = [
        {"event": "reincarnated", "ts": 12.0, "regeneration": "fresh point", "regenerated": 900},
        {"event": "reincarnated", "ts": 1.0, "regeneration": "range", "regenerated": 5},
        {"event": "prepared", "ts": 10.5},
        {"event": "reincarnated", "ts": 10.0, "regeneration": "range", "regenerated": 3 << 20,
         "body_offset": 200 << 20, "commit_ms": {"regenerated": 0.4, "restored": 0.6}},
        {"event": "reincarnated", "ts": 30.0, "regeneration": "range", "regenerated": 7},
    ]  # fmt: skip
    found = regenerations(events, 2.0, 20.0)
    assert found == [
        {
            "regeneration": "range",
            "regenerated": 3 << 20,
            "body_offset": 200 << 20,
            "commit_ms": {"regenerated": 0.4, "restored": 0.6},
        },
        {"regeneration": "fresh point", "regenerated": 900, "body_offset": None, "commit_ms": {}},
    ]


def bulk_run(gbit_s: float) -> dict[str, Any]:
    return {
        "gbit_s": gbit_s,
        "retransmits": 3,
        "cpu_pct": {"server shim": 40.0},
        "machine_busy_pct": 150.0,
    }


def test_shims_summary_and_table() -> None:
    latency = {"rr_us": {"p50": 30.0, "p99": 60.0}, "connect_us": {"p50": 90.0, "p99": 200.0}}
    bulk = {
        "direct": {
            "client_to_service": [bulk_run(10.0), bulk_run(5.0)],
            "service_to_client": [bulk_run(10.0), bulk_run(10.0)],
        },
        "shims-live": {
            "client_to_service": [bulk_run(8.0), bulk_run(4.0)],
            "service_to_client": [bulk_run(2.0), bulk_run(3.0)],
        },
    }
    paths = summarise_shims(bulk, {"direct": [latency] * 2, "shims-live": [latency] * 2})
    assert paths["shims-live"]["client_to_service"]["vs_direct"] == pytest.approx(0.8)
    assert paths["shims-live"]["service_to_client"]["vs_direct"] == pytest.approx(0.25)
    text = render_shims(
        {
            "paths": paths,
            "background_busy_pct": [5.0],
            "idle_shim_cpu_pct": {"shims-live": {"server shim": 1.0}},
            "shim_log": {"shims-live": {"client c1: capture_lost_packets": 3}},
        }
    )
    assert "| shims-live | 6.00 | 2.50 | 0.80x / 0.25x |" in text
    assert "- 3 x client c1: capture_lost_packets" in text


def test_shims_http_downloads_get_their_own_table_with_ratios_per_round() -> None:
    latency = {"rr_us": {"p50": 30.0, "p99": 60.0}, "connect_us": {"p50": 90.0, "p99": 200.0}}

    def directions(up: float, down: float, http: list[float]) -> dict[str, Any]:
        return {
            "client_to_service": [bulk_run(up)] * len(http),
            "service_to_client": [bulk_run(down)] * len(http),
            "http_service_to_client": [bulk_run(value) for value in http],
        }

    bulk = {
        "direct": directions(10.0, 10.0, [8.0, 4.0]),
        "shims-live": directions(8.0, 2.0, [4.0, 3.0]),
    }
    paths = summarise_shims(bulk, {"direct": [latency] * 2, "shims-live": [latency] * 2})
    # 4/8 and 3/4 round by round, not 3.5/6 of the medians.
    assert paths["shims-live"]["http_service_to_client"]["vs_direct"] == pytest.approx(0.625)
    text = render_shims({"paths": paths, "background_busy_pct": [5.0]})
    assert "| shims-live | 3.50 | 0.62x | server shim 40 |" in text
    assert "| shims-live | 8.00 | 2.00 | 0.80x / 0.20x |" in text  # the iperf3 table stays


def test_shims_latency_is_compared_with_the_baselines_round_by_round():
    def latency(rr: float, connect: float) -> dict[str, Any]:
        return {"rr_us": {"p50": rr, "p99": 2 * rr}, "connect_us": {"p50": connect, "p99": 0.0}}

    runs = {
        "direct": [latency(20.0, 50.0), latency(40.0, 100.0)],
        "haproxy": [latency(40.0, 100.0), latency(80.0, 100.0)],
        "shims-live": [latency(48.0, 150.0), latency(96.0, 130.0)],
    }
    bulk: dict[str, dict[str, list[dict[str, Any]]]] = {
        p: {"client_to_service": [], "service_to_client": []} for p in runs
    }  # --latency-only
    paths = summarise_shims(bulk, runs)
    assert paths["shims-live"]["latency_vs"]["haproxy"]["rr_us"] == pytest.approx(1.2)
    assert paths["shims-live"]["latency_vs"]["haproxy"]["connect_us"] == pytest.approx(1.4)
    assert paths["shims-live"]["latency_vs"]["direct"]["rr_us"] == pytest.approx(2.4)
    text = render_shims({"paths": paths, "background_busy_pct": [5.0]})
    assert "| shims-live | 72 / 144 | 140 / 0 | 2.40x / 2.15x | 1.20x / 1.40x |" in text
    assert "Gbit/s" not in text


def stream_run(mbit_s: float, pauses: list[float | None]) -> dict[str, Any]:
    return {
        "mbit_s": mbit_s,
        "files": 3,
        "bad_files": 0,
        "roams": len(pauses),
        "roams_inside_a_stall": pauses.count(None),
        "app_pause_ms": pauses,
        "shim_pause_ms": [30.0] * len(pauses),
        "outcomes": {"migrated": len(pauses)},
        "breaks": 0,
        "break_errors": [],
        "recovery_ms": [],
        "client_tcp": {"PAWSEstab": 2},
        "shim_log": {"server s2: reincarnation_failed unverifiable": 1},
    }


def test_migration_summary_and_table() -> None:
    streams = {
        "paced 8 MiB/s | live": {
            "single": [stream_run(60.0, [])],
            "still": [stream_run(64.0, [])],
            "roaming": [stream_run(32.0, [31.0, 1000.0, None])],
        }
    }
    streams["paced 8 MiB/s | live"]["roaming"][0]["handover_wait_ms"] = [2.5, 0.0, 4.0]
    streams["paced 8 MiB/s | live"]["roaming"][0]["regenerations"] = [
        {"regeneration": "range", "regenerated": 3 << 20, "body_offset": 200 << 20},
        {"regeneration": "fresh point", "regenerated": 1 << 19, "body_offset": None},
    ]
    summary = summarise_streams(streams)
    row = summary["paced 8 MiB/s | live"]
    assert row["ratio_still"] == pytest.approx(0.5)
    assert row["app_pause_ms"]["n"] == 2
    assert row["roams_inside_a_stall"] == 1
    connection = {
        "n": 100,
        "setup": {"opened": 100, "setup_s": 0.1, "errors": []},
        "roam": {"connections": 100},
        "ours": {"migrated": 100},
        "pause_ms": 50.0,
        "pause_per_connection_ms": 0.5,
        "switch_late_ms": 60.0,
        "first_prepare_to_switch_s": 2.0,
        "prepare_s": {"p50": 0.003, "p99": 0.005, "n": 100, "max": 0.005},
        "after": {
            "answered": 99,
            "errors": ["TimeoutError: timed out"],
            "get_ms": {"p50": 0.3, "p99": 4.0, "max": 3900.0},
        },
        "client_tcp": {"PAWSEstab": 3},
        "shim_log": {},
        "earlier_handoffs": {"epoch 3 migrated: ": 100},
        "later_handoffs": {"epoch 9 late: the window of epoch 9 closed 0.1 s ago": 7},
    }
    text = render_migration(
        {
            "rtt_ms": {"p50": 0.05, "p99": 0.09, "n": 50, "max": 0.1},
            "streams": summary,
            "connections": [connection],
            "stream_mib": 256,
        }
    )
    assert "Complete 256 MiB files received" in text
    assert "- paced 8 MiB/s | live: 3.0 MiB by range at 200.0 MiB, 0.5 MiB from the fresh" in text
    assert row["regenerated_bytes"]["n"] == 2
    assert "from the fresh point (p50 3.0 MiB, p99 3.0 MiB)" in text
    assert "| paced 8 MiB/s | live | 60 / 64 / 32 | 0.53x / 0.50x | 3 (1 inside" in text
    assert "31.0, 1000.0, (in the stall before)" in text
    assert "| 1000.0 / 1000.0 / 1000.0 | 2.5 / 4.0 / 4.0 | 30.0 / 30.0 / 30.0 |" in text
    assert "| 100 | 100 (0.1) | 100 | migrated 100 | 50.0 | 0.500 |" in text
    assert "| 0.30 / 4.00 / 3900.00 | 3 |" in text
    assert "TimeoutError: timed out" in text
    assert "- N=100, an earlier roam: 100 x epoch 3 migrated: " in text
    # What broke connections after the measured roam: the roams while the GETs ran.
    assert "- N=100, a later roam: 7 x epoch 9 late: the window of epoch 9 closed" in text
    assert "- 1 x server s2: reincarnation_failed unverifiable" in text


def opening_run(slow_at: list[list[float]], roams: int) -> dict[str, Any]:
    return {
        "opened": 1000 - len(slow_at),
        "failed": 0,
        "errors": [],
        "get_ms": {
            "p50": 0.95,
            "p99": 4.9,
            "n": 1000,
            "max": max((ms for _, ms in slow_at), default=9.5),
        },
        "slow": len(slow_at),
        "slow_at": slow_at,
        "roams": roams,
        "outcomes": {"migrated": roams} if roams else {},
        "shim_log": {},
    }


def test_new_connections_get_a_table_naming_those_that_waited() -> None:
    """``--opening``: one row per deployment, and when each slow connection began."""
    text = render_migration(
        {
            "rtt_ms": {"p50": 0.05, "p99": 0.09, "n": 50, "max": 0.1},
            "streams": {},
            "connections": [],
            "opening_s": 30.0,
            "opening": {
                "single": opening_run([], 0),
                "roaming": opening_run([[4.25, 1028.1], [9.5, 1003.0]], 27),
            },
        }
    )
    assert "New connections one after another for 30 s, live, a GET each:" in text
    assert "| 1 server, no roam | 1000 | 0 | 0.95 / 4.90 / 9.5 | 0 | 0 | - |" in text
    assert "| roaming | 998 | 0 | 0.95 / 4.90 / 1028.1 | 2 | 27 | migrated 27 |" in text
    assert "- roaming: slow at 4.2 s: 1028 ms, 9.5 s: 1003 ms; errors -" in text
    assert "- single:" not in text
    assert opening_line(opening_run([[1.0, 1001.0]], 3)) == (
        "999 opened, 0 failed, GET ms p50 0.95 p99 4.90 max 1001.0, 1 of 0.5 s or more, "
        "3 roams (migrated 3)"
    )


def test_overload_table_names_each_runs_breaks_and_the_median() -> None:
    from labs.benchmarks.roaming.overload import not_moved, render_overload

    events = [
        {"event": "handoff", "outcome": "migrated", "detail": ""},
        {"event": "handoff", "outcome": "closed", "detail": "ended before the hand-over"},
        {"event": "handoff", "outcome": "deferred", "detail": "no answer to the prepare; held"},
        {"event": "handoff", "outcome": "deferred", "detail": "no answer to the prepare; held"},
        {"event": "roam", "connections": 3},
    ]
    assert not_moved(events) == {"deferred: no answer to the prepare; held": 2}
    run = {
        "connections": 1000, "broken": 3, "broken_by_kind": {"ConnectionAbortedError": 3},
        "gets": 100, "answered": 97, "get_ms": {"p50": 5.0, "p99": 90.0}, "roams": 22,
        "largest_roam": 990, "not_moved": {"deferred: no answer to the prepare; held": 2},
        "pause_ms": {"p50": 120.0, "p99": 410.5}, "shim_cpu_s": 61.2, "cells_sent": 14000,
    }  # fmt: skip
    baseline = {"broken": 0, "gets": 100, "answered": 100, "get_ms": {"p50": 2.0}}
    text = render_overload({"baseline": baseline, "runs": [run, {**run, "broken": 0}]})
    assert "one server, no roam: 0 broken, 100 of 100 GETs answered" in text
    assert (
        "1 | 22 (990) | 3 {'ConnectionAbortedError': 3} | 97/100 | 5.0 / 90.0 | 120.0 / 410.5 "
        "| 61.2 | 14000 |"
    ) in text
    assert "2 deferred: no answer to the prepare; held" in text
    assert text.endswith("broken per run, sorted: [0, 3]; median 1.5")


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--connections", "1,x"], "not a comma-separated list of counts: '1,x'"),
        (["--connections", "0"], "each count must be in [1, 15000]"),
        (["--connections", "20000"], "each count must be in [1, 15000]"),
        (["--connections-tick", "0.1"], "--connections-tick must be in [0.5, 60]"),
        (["--opening", "1"], "--opening must be 0 or in [2, 600]"),
        (["--opening", "-3"], "--opening must be 0 or in [2, 600]"),
    ],
)
def test_bad_connection_options_are_refused_in_one_line_before_any_lab(
    argv: list[str],
    complaint: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("labs.benchmarks.roaming.__main__.os.geteuid", lambda: 0)
    with pytest.raises(SystemExit) as exit_:
        roaming_main(["migration", *argv])
    assert exit_.value.code == 2
    assert complaint in capsys.readouterr().err


def test_overload_refuses_a_missing_log_directory_in_one_line_before_any_lab(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("labs.benchmarks.roaming.__main__.os.geteuid", lambda: 0)
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as exit_:
        roaming_main(["overload", "--keep-logs", str(missing)])
    assert exit_.value.code == 2
    assert f"--keep-logs: {missing} is not a directory" in capsys.readouterr().err
