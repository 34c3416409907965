"""The upload benchmark's pure parts: pacing, curl's output, per-upload rows, the table."""

from __future__ import annotations

from typing import Any

from labs.benchmarks.uploads import CASES, parse_curl, rate_for, render, summarise


def test_pacing_spreads_each_size_over_the_same_time() -> None:
    assert rate_for(8 * 1024 * 1024, 8.0) == "1024K"
    assert rate_for(1024 * 1024, 6.0) == "171K"
    assert rate_for(10, 100.0) == "1K"  # never 0 (curl would not limit at all)


def test_curl_output_is_parsed_or_refused() -> None:
    assert parse_curl("201 40000 6.001 8388608") == {
        "status": 201,
        "port": 40000,
        "seconds": 6.001,
        "sent": 8388608,
    }
    assert parse_curl("") is None
    assert parse_curl("201 40000 6.0") is None
    assert parse_curl("201 x 6.0 1") is None


def _handoff(
    port: int, outcome: str, replayed: int, pause: float, detail: str = ""
) -> dict[str, Any]:
    return {
        "event": "handoff",
        "port": port,
        "outcome": outcome,
        "bytes_replayed": replayed,
        "pause_ms": pause,
        "detail": detail,
    }


def test_a_row_counts_only_the_uploads_own_handoffs() -> None:
    upload = {"status": 201, "port": 40000, "seconds": 6.0, "completed": True, "error": ""}
    events = [
        _handoff(40000, "migrated", 1_000_000, 3.0),
        _handoff(40001, "migrated", 9_999_999, 90.0),  # another connection
        _handoff(40000, "migrated", 2_000_000, 5.0),
        _handoff(40000, "failed", 3_000_000, 20.0, "no answer to the prepare"),
    ]
    row = summarise(upload, events)
    assert row["roams"] == 3
    assert row["outcomes"] == {"migrated": 2, "failed": 1}
    assert row["replayed"] == [1_000_000, 2_000_000, 3_000_000]
    assert row["replayed_total"] == 6_000_000
    assert (row["pause_ms_median"], row["pause_ms_max"]) == (5.0, 20.0)
    assert row["failures"] == ["failed: no answer to the prepare"]
    quiet = summarise({**upload, "port": 1}, events)
    assert (quiet["roams"], quiet["replayed_total"], quiet["pause_ms_median"]) == (0, 0, None)


def test_the_table_gives_ratios_to_no_roaming_and_says_why_an_upload_failed() -> None:
    base = summarise({"port": 1, "seconds": 6.0, "completed": True, "error": ""}, [])
    roamed = summarise(
        {"port": 2, "seconds": 6.6, "completed": True, "error": ""},
        [_handoff(2, "migrated", 4_000_000, 4.0)],
    )
    failed = summarise(
        {"port": 3, "seconds": 3.0, "completed": False, "error": "curl: (56) reset"},
        [_handoff(3, "failed", 5_000_000, 9.0, "no answer to the prepare")],
    )
    results = {
        "source": {"commit": "abc"},
        "sizes_mib": [1, 8],
        "seconds": 6.0,
        "max_replay_mib": 72,
        "rate_kbit": 0,
        "cases": {
            CASES[0][0]: {"1": base, "8": base},
            CASES[1][0]: {"1": roamed, "8": failed},
        },
    }
    table = render(results)
    assert (
        "| 1 MiB | roaming | yes | 6.60 | 1.10x | 1 {'migrated': 1} | 4.0 | 4.0 | 4.0 / 4.0 |"
        in table
    )
    assert "| 8 MiB | roaming | no (curl: (56) reset; failed: no answer to the prepare)" in table
    assert "| 8 MiB | no roaming | yes | 6.00 | 1.00x | 0  | - | 0.0 | - |" in table
