"""The roaming benchmark's analysis: pure functions from measurements (client samples, shim
events, counters) to figures; no lab, no I/O, tested in tests/unit/test_roaming_benchmark.py."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from labs.benchmarks.roaming import BASELINES, GAP_FLOOR_S
from labs.stats import p50_p99


def median_ratio(runs: Sequence[float], bases: Sequence[float]) -> float | None:
    """Median of the per-round ratios ``runs[i] / bases[i]`` (rounds with a zero base left
    out): robust to background load drifting between rounds."""
    ratios = [run / base for run, base in zip(runs, bases, strict=True) if base]
    return statistics.median(ratios) if ratios else None


def ping_times(output: str) -> list[float]:
    """Round-trip times (ms) of every reply in ``ping`` output."""
    return [float(value) for value in re.findall(r"time=([\d.]+) ms", output)]


def netstat_counters(text: str) -> dict[str, int]:
    """``/proc/net/netstat`` (or ``snmp``) as ``{"TcpExt.PAWSEstab": n, ...}``."""
    counters: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        prefix, _, keys = names.partition(":")
        _, _, numbers = values.partition(":")
        for key, value in zip(keys.split(), numbers.split(), strict=False):
            try:
                counters[f"{prefix}.{key}"] = int(value)
            except ValueError:
                continue
    return counters


def roam_pauses(
    gaps: Sequence[Sequence[float]],
    switches: Sequence[float],
    *,
    freeze_s: Sequence[float] | None = None,
    after_s: float = 1.5,
    floor_s: float = GAP_FLOOR_S,
) -> list[float | None]:
    """For each switch time, the longest interval without data that overlaps its window: from
    its freeze (``freeze_s[i]`` before the switch) less 0.1 s until ``after_s`` after the
    switch, or until the next roam's window starts. ``gaps`` are (last data, next data) pairs
    longer than ``floor_s``. A gap counts for the first roam whose window it overlaps only: a
    roam that began (froze) or switched inside an earlier roam's stall gets ``None``; a window
    that no gap overlaps gets ``floor_s`` (an upper bound)."""
    count = len(switches)
    order = sorted(range(count), key=lambda i: switches[i])
    freezes = [switches[i] - (freeze_s[i] if freeze_s else 0.0) for i in range(count)]
    starts = [min(freezes[i], switches[i]) - 0.1 for i in range(count)]
    owner: dict[int, int] = {}
    for rank, index in enumerate(order):
        end = switches[index] + after_s
        if rank + 1 < count:
            end = min(end, max(switches[index], starts[order[rank + 1]]))
        for number, (first, last) in enumerate(gaps):
            if number not in owner and last >= starts[index] and first < end:
                owner[number] = index
    result: list[float | None] = []
    for index in range(count):
        mine = [last - first for n, (first, last) in enumerate(gaps) if owner.get(n) == index]
        inside = any(
            first <= freezes[index] <= last or first <= switches[index] <= last
            for n, (first, last) in enumerate(gaps)
            if n in owner and owner[n] != index
        )
        result.append(None if inside else max(mine) if mine else floor_s)
    return result


def handover_waits(
    gaps: Sequence[Sequence[float]], steps: Sequence[tuple[float, float]]
) -> list[float]:
    """For each hand-over's own steps (``(freeze, go_sent)`` times), the longest interval
    without data that overlaps them, whole; 0.0 where the application never waited longer
    than the gaps' floor meanwhile (its receive buffer bridged the hand-over). Unlike
    ``roam_pauses`` (the longest gap anywhere from 0.1 s before the freeze to well after the
    switch, an upper bound), a gap of the application's own away from the steps (a paced
    client's next request, every file) does not count."""
    return [
        max((last - first for first, last in gaps if first <= done and last >= frozen), default=0.0)
        for frozen, done in steps
    ]


def events_of(events: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event.get("event") == name]


def analyse_stream(
    stream: dict[str, Any], client_events: Sequence[dict[str, Any]], stall_timeout: float
) -> dict[str, Any]:
    """Per-roam pauses of one download: the application's (from its receive time stamps) and
    the shim's (``roam`` events), matched to the client shim's ``switch`` events that fell
    inside the download."""
    first, last = stream["first"], stream["last"]
    switches = [e for e in events_of(client_events, "switch") if first < e["ts"] < last]
    roams = {e["epoch"]: e for e in events_of(client_events, "roam")}
    leads = []
    shim_pauses: list[float] = []
    steps: list[dict[str, float]] = []
    outcomes: dict[str, int] = {}
    for switch in switches:
        roam = roams.get(switch.get("epoch"))
        steps.append((roam or {}).get("steps_ms", {}))
        pause_ms = roam.get("pause_ms") if roam else None
        if pause_ms is not None:
            shim_pauses.append(float(pause_ms))
        leads.append((pause_ms or 0.0) / 1000)
        for outcome, count in (roam or {}).get("outcomes", {}).items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    pauses = roam_pauses(
        stream["gaps"],
        [s["ts"] for s in switches],
        freeze_s=leads,
        after_s=max(1.5, stall_timeout + 1.0),
    )
    app = [pause for pause in pauses if pause is not None]
    own = [
        (s["ts"] - step["switched"] / 1000, s["ts"] + (step["go_sent"] - step["switched"]) / 1000)
        for s, step in zip(switches, steps, strict=True)
        if "switched" in step and "go_sent" in step
    ]
    failed: dict[str, int] = {}
    for event in events_of(client_events, "handoff"):
        if first < event["ts"] < last and event["outcome"] not in ("migrated", "closed"):
            line = f"{event['outcome']}: {str(event.get('detail', ''))[:200]}"
            failed[line] = failed.get(line, 0) + 1
    breaks = stream["breaks"]
    recovery = [1000 * (b["data_again"] - b["detected"]) for b in breaks if "data_again" in b]
    return {
        "roams": len(switches),
        "app_pause_ms": [None if value is None else round(1000 * value, 3) for value in pauses],
        "roams_inside_a_stall": pauses.count(None),
        "app_pause": {k: v * 1000 if k != "n" else v for k, v in p50_p99(app).items()},
        "app_pause_max_ms": 1000 * max(app, default=0.0),
        "handover_wait_ms": [round(1000 * v, 3) for v in handover_waits(stream["gaps"], own)],
        "shim_pause_ms": shim_pauses,
        "roam_steps_ms": steps,  # per roam: the client's steps, ms from the freeze
        "switch_ts": [s["ts"] for s in switches],
        # Per roam, the gaps of 50 ms or more near it: (start, length) in ms from the switch.
        "gaps_near_ms": [
            [
                (round(1000 * (first - s["ts"]), 1), round(1000 * (last - first), 1))
                for first, last in stream["gaps"]
                if last - first >= 0.05 and s["ts"] - 0.2 <= last and first <= s["ts"] + 1.5
            ]
            for s in switches
        ],
        "shim_pause": p50_p99(shim_pauses),
        "outcomes": outcomes,
        "handoffs_not_migrated": failed,
        "breaks": len(breaks),
        "break_errors": sorted({b["error"].split(":")[0] for b in breaks}),
        "recovery_ms": recovery,
    }


def regenerations(
    server_events: Iterable[dict[str, Any]], first: float, last: float
) -> list[dict[str, Any]]:
    """What each new server regenerated to re-incarnate a connection between ``first`` and
    ``last`` (its ``reincarnated`` events, in order): how (``range`` or ``fresh point``), how
    many service bytes it read to reach the client's position (``regenerated``), and how far
    into the response body the client was (``body_offset``, for a range). The cost a hand-over
    must keep independent of the response's length."""
    found = sorted(
        (e for e in server_events if e.get("event") == "reincarnated" and first <= e["ts"] <= last),
        key=lambda e: e["ts"],
    )
    return [
        {
            "regeneration": e.get("regeneration"),
            "regenerated": e.get("regenerated", 0),
            "body_offset": e.get("body_offset"),
            "commit_ms": e.get("commit_ms") or {},
        }
        for e in found
    ]


def summarise_shims(
    bulk: dict[str, dict[str, list[dict[str, Any]]]], latency: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Medians per path and direction, ratios per round against each baseline."""
    paths: dict[str, Any] = {}
    for path, directions in bulk.items():
        row: dict[str, Any] = {}
        for direction, runs in directions.items():
            if not runs:
                continue  # --latency-only
            speeds = [run["gbit_s"] for run in runs]
            cell: dict[str, Any] = {
                "gbit_s": statistics.median(speeds),
                "runs_gbit_s": [round(value, 2) for value in speeds],
                "retransmits": statistics.median(run["retransmits"] for run in runs),
                "machine_busy_pct": statistics.median(run["machine_busy_pct"] for run in runs),
                "cpu_pct": {
                    name: statistics.median(run["cpu_pct"][name] for run in runs)
                    for name in runs[0]["cpu_pct"]
                },
            }
            for base in BASELINES:
                if base in bulk:
                    base_speeds = [run["gbit_s"] for run in bulk[base][direction]]
                    cell[f"vs_{base}"] = median_ratio(speeds, base_speeds)
            row[direction] = cell
        row["latency"] = {
            kind: {
                q: statistics.median(run[kind][q] for run in latency[path]) for q in ("p50", "p99")
            }
            for kind in ("rr_us", "connect_us")
        }
        # The p50 against each baseline's, round by round, then the median.
        row["latency_vs"] = {
            base: {
                kind: median_ratio(
                    [run[kind]["p50"] for run in latency[path]],
                    [run[kind]["p50"] for run in latency[base]],
                )
                for kind in ("rr_us", "connect_us")
            }
            for base in BASELINES
            if base in latency
        }
        paths[path] = row
    return paths


def summarise_streams(streams: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per (run, mode): goodput single and roaming (median over rounds, ratio per round) and
    the pauses of all roams of all rounds."""
    summary: dict[str, Any] = {}
    for key, layouts in streams.items():
        single, roaming = layouts["single"], layouts["roaming"]
        still = layouts.get("still", [])
        app = [p for run in roaming for p in run["app_pause_ms"] if p is not None]
        shim = [p for run in roaming for p in run["shim_pause_ms"]]
        waits = [p for run in roaming for p in run.get("handover_wait_ms", [])]
        speeds = [r["mbit_s"] for r in roaming]
        summary[key] = {
            "single_mbit_s": statistics.median(r["mbit_s"] for r in single),
            "still_mbit_s": statistics.median(r["mbit_s"] for r in still) if still else None,
            "roaming_mbit_s": statistics.median(speeds),
            "ratio": median_ratio(speeds, [r["mbit_s"] for r in single]),
            "ratio_still": median_ratio(speeds, [r["mbit_s"] for r in still]) if still else None,
            "roams": sum(r["roams"] for r in roaming),
            "roams_inside_a_stall": sum(r["roams_inside_a_stall"] for r in roaming),
            "app_pause_ms": {**p50_p99(app), "max": max(app, default=0.0)},
            "shim_pause_ms": {**p50_p99(shim), "max": max(shim, default=0.0)},
            "handover_wait_ms": {**p50_p99(waits), "max": max(waits, default=0.0)},
            "outcomes": sum_dicts(r["outcomes"] for r in roaming),
            "breaks": [r["breaks"] for r in roaming],
            "single_breaks": [r["breaks"] for r in single],
            "break_errors": sorted({e for r in roaming for e in r["break_errors"]}),
            "recovery_ms": p50_p99(v for r in roaming for v in r["recovery_ms"]),
            "bad_files": sum(r["bad_files"] for r in [*single, *still, *roaming]),
            "files": sum(r["files"] for r in [*single, *still, *roaming]),
            "client_tcp": sum_dicts(r["client_tcp"] for r in roaming),
            "regenerated_bytes": p50_p99(
                g["regenerated"] for r in roaming for g in r.get("regenerations", [])
            ),
            "single_client_tcp": sum_dicts(r["client_tcp"] for r in single),
            "runs": {"single": single, "still": still, "roaming": roaming},
        }
    return summary


def sum_dicts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for item in dicts:
        for key, value in item.items():
            total[key] = total.get(key, 0) + value
    return total
