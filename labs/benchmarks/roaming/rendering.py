"""The roaming benchmark's tables: figures (as ``--json`` prints them) to markdown text."""

from __future__ import annotations

import statistics
from typing import Any

from labs.benchmarks.relay import idle_and_runs_lines
from labs.benchmarks.roaming import BASELINES, SMALL_BYTES
from labs.benchmarks.roaming.analysis import sum_dicts


def trouble_lines(counts: dict[str, int], limit: int = 15) -> list[str]:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [f"- {count} x {line}" for line, count in ordered[:limit]]


# Roams whose app pause reaches this are listed with the client's step times (where it went).
SLOW_PAUSE_MS = 20.0  # the pause p99 issue 14 asks for: every roam above it is shown in detail


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def source_line(results: dict[str, Any]) -> list[str]:
    source = results.get("source")
    if not source:
        return []
    modified = source.get("modified") or []
    dirty = f"; modified tracked files: {', '.join(modified)}" if modified else " (clean tree)"
    return [f"Source: commit {source.get('commit')}{dirty}", ""]


def render_shims(results: dict[str, Any]) -> str:
    paths = results["paths"]
    bases = [base for base in BASELINES if base in paths]
    lines = [*source_line(results)]
    if all("client_to_service" in row for row in paths.values()):
        lines += _bulk_lines(paths, bases)
    lines += [
        "",
        f"Latency of a GET of a {SMALL_BYTES}-byte file from nginx (µs, p50 / p99; ratios of "
        "the p50s, round by round, then the median):",
        "",
        "| path | one keep-alive connection | new connection each | "
        + " | ".join(f"vs {base}: keep-alive / new" for base in bases)
        + " |",
        "|---|---|---|" + "---|" * len(bases),
    ]
    for name, row in paths.items():
        cells = [
            f"{row['latency'][kind]['p50']:.0f} / {row['latency'][kind]['p99']:.0f}"
            for kind in ("rr_us", "connect_us")
        ]
        versus = row.get("latency_vs", {})
        ratios = [
            " / ".join(_ratio(versus.get(base, {}).get(kind)) for kind in ("rr_us", "connect_us"))
            for base in bases
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | " + " | ".join(ratios) + " |")
    if all("client_to_service" in row for row in paths.values()):
        lines += idle_and_runs_lines(results["background_busy_pct"], paths)
    else:
        background = ", ".join(f"{value:.0f}" for value in results["background_busy_pct"])
        lines += ["", f"Machine busy before each round with the lab idle (% of one CPU): "
                  f"{background}"]  # fmt: skip
    idle = results.get("idle_shim_cpu_pct") or {}
    if idle:
        lines += ["", "Shims with no traffic at all (% of one CPU):"]
        for path, cpu in idle.items():
            lines.append(f"- {path}: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    for path, log in (results.get("shim_log") or {}).items():
        if log:
            lines += ["", f"Shim log of {path} (warnings, errors, connection resets):"]
            lines += trouble_lines(log)
    return "\n".join(lines)


def _bulk_lines(paths: dict[str, Any], bases: list[str]) -> list[str]:
    lines = [
        "| path | c->s Gbit/s | s->c Gbit/s | "
        + " | ".join(f"vs {base} c->s / s->c" for base in bases)
        + " |",
        "|---|---|---|" + "---|" * len(bases),
    ]
    for name, row in paths.items():
        up, down = row["client_to_service"], row["service_to_client"]
        ratios = " | ".join(
            f"{_ratio(up.get(f'vs_{base}'))} / {_ratio(down.get(f'vs_{base}'))}" for base in bases
        )
        lines.append(f"| {name} | {up['gbit_s']:.2f} | {down['gbit_s']:.2f} | {ratios} |")
    if all("http_service_to_client" in row for row in paths.values()):
        lines += _http_bulk_lines(paths, bases)
    lines += [
        "",
        "CPU during the bulk runs (% of one CPU; machine: 2 CPUs = 200) and TCP retransmissions",
        "(iperf3's sender count, median):",
        "",
        "| path | proxy processes c->s | proxy processes s->c | machine c->s / s->c | "
        "retransmits c->s / s->c |",
        "|---|---|---|---|---|",
    ]
    for name, row in paths.items():
        up, down = row["client_to_service"], row["service_to_client"]
        cpu = [
            ", ".join(f"{proc} {pct:.0f}" for proc, pct in cell["cpu_pct"].items()) or "-"
            for cell in (up, down)
        ]
        lines.append(
            f"| {name} | {cpu[0]} | {cpu[1]} | {up['machine_busy_pct']:.0f} / "
            f"{down['machine_busy_pct']:.0f} | {up['retransmits']:.0f} / "
            f"{down['retransmits']:.0f} |"
        )
    return lines


def _http_bulk_lines(paths: dict[str, Any], bases: list[str]) -> list[str]:
    lines = [
        "",
        "HTTP download through each path (curl, one keep-alive connection, the file several "
        "times; nginx's sendfile; ratios round by round, then the median):",
        "",
        "| path | HTTP s->c Gbit/s | " + " | ".join(f"vs {base}" for base in bases) + " | "
        "proxy processes |",
        "|---|---|" + "---|" * len(bases) + "---|",
    ]
    for name, row in paths.items():
        cell = row["http_service_to_client"]
        ratios = " | ".join(_ratio(cell.get(f"vs_{base}")) for base in bases)
        cpu = ", ".join(f"{proc} {pct:.0f}" for proc, pct in cell["cpu_pct"].items()) or "-"
        lines.append(f"| {name} | {cell['gbit_s']:.2f} | {ratios} | {cpu} |")
    return lines


def connections_row(row: dict[str, Any]) -> str:
    setup, after = row["setup"], row["after"]
    outcomes = ", ".join(f"{k} {v}" for k, v in row["ours"].items()) or "-"
    first = row["first_prepare_to_switch_s"]
    prepare = row["prepare_s"]
    get = after["get_ms"]
    return (
        f"| {row['n']} | {setup['opened']} ({setup['setup_s']:.1f}) | "
        f"{row['roam']['connections']} | {outcomes} | {row['pause_ms']:.1f} | "
        f"{row['pause_per_connection_ms']:.3f} | {row['switch_late_ms']:.0f} | "
        f"{'-' if first is None else f'{first:.2f}'} | "
        f"{prepare['p50']:.4f} / {prepare['max']:.4f} | {after['answered']}/{setup['opened']} | "
        f"{get['p50']:.2f} / {get['p99']:.2f} / {get['max']:.2f} | "
        f"{row.get('client_tcp', {}).get('PAWSEstab', '-')} |"
    )


def connections_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    return (
        f"opened {row['setup']['opened']} in {row['setup']['setup_s']:.1f} s, roam with "
        f"{row['roam']['connections']}: {row['ours']}, pause {row['pause_ms']:.1f} ms, "
        f"answered after {row['after']['answered']}, errors "
        f"{row['setup']['errors'] + row['after']['errors']}"
    )


def opening_line(row: dict[str, Any]) -> str:
    """New connections one after another (``measure_opening``), in one line."""
    get = row["get_ms"]
    outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items()) or "-"
    return (
        f"{row['opened']} opened, {row['failed']} failed, GET ms p50 {get['p50']:.2f} "
        f"p99 {get['p99']:.2f} max {get['max']:.1f}, {row['slow']} of 0.5 s or more, "
        f"{row['roams']} roams ({outcomes})"
    )


def regeneration_text(regeneration: dict[str, Any]) -> str:
    """One re-incarnation's regeneration: "2.1 MiB by range at 130.0 MiB" (the body offset
    the client had reached) or "0.1 MiB from the fresh point"."""
    read = f"{regeneration['regenerated'] / 2**20:.1f} MiB"
    if regeneration["regeneration"] == "range":
        offset = regeneration.get("body_offset") or 0
        return f"{read} by range at {offset / 2**20:.1f} MiB"
    return f"{read} from the fresh point"


def step_medians(steps: list[dict[str, float]]) -> str:
    """Each step's median over the roams that had it, in the order of the steps."""
    order: dict[str, list[float]] = {}
    for roam in steps:
        for step, at in roam.items():
            order.setdefault(step, []).append(at)
    return ", ".join(f"{step} {statistics.median(values):.1f}" for step, values in order.items())


def render_migration(results: dict[str, Any]) -> str:
    rtt = results["rtt_ms"]
    lines = [
        *source_line(results),
        f"Lab RTT c1 -> s1 (ping, 50): p50 {rtt['p50']:.3f} ms, p99 {rtt['p99']:.3f} ms",
        f"Live server shims: {' '.join(results.get('live_server_args') or ['(defaults)'])}",
        "",
        "| download | migration | goodput Mbit/s: 1 server / 3, no roam / roaming | "
        "roaming vs 1 server / vs no roam | roams | app pause p50 / p99 / max ms | "
        "app wait in the hand-over's steps p50 / p99 / max ms | "
        "shim pause_ms p50 / p99 / max | outcomes | breaks | client PAWS drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results["streams"].items():
        run, mode = key.split(" | ")
        app, shim = row["app_pause_ms"], row["shim_pause_ms"]
        shim_text, wait_text = (
            f"{v['p50']:.1f} / {v['p99']:.1f} / {v['max']:.1f}" if v.get("n") else "-"
            for v in (shim, row.get("handover_wait_ms", {}))
        )
        outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items()) or "-"
        still = "-" if row["still_mbit_s"] is None else f"{row['still_mbit_s']:.0f}"
        stalled = row["roams_inside_a_stall"]
        inside = f" ({stalled} inside an earlier stall)" if stalled else ""
        lines.append(
            f"| {run} | {mode} | {row['single_mbit_s']:.0f} / {still} / "
            f"{row['roaming_mbit_s']:.0f} | {_ratio(row['ratio'])} / "
            f"{_ratio(row['ratio_still'])} | {row['roams']}{inside} | "
            f"{app['p50']:.1f} / {app['p99']:.1f} / {app['max']:.1f} | {wait_text} | {shim_text} | "
            f"{outcomes} | {sum(row['breaks'])} | {row['client_tcp'].get('PAWSEstab', 0)} |"
        )
    files = sum(row["files"] for row in results["streams"].values())
    bad = sum(row["bad_files"] for row in results["streams"].values())
    mib = results.get("stream_mib", 64)
    lines += ["", f"Complete {mib} MiB files received and checked (sha256): {files}, wrong: {bad}"]
    lines += ["", "Per roam, app pause (ms), in order:"]
    for key, row in results["streams"].items():
        pauses = [p for run in row["runs"]["roaming"] for p in run["app_pause_ms"]]
        text = ", ".join("(in the stall before)" if p is None else f"{p:.1f}" for p in pauses)
        lines.append(f"- {key}: {text}")
    lines += ["", "Where a live pause goes: the client's steps, median ms from the freeze:"]
    for key, row in results["streams"].items():
        steps = [s for run in row["runs"]["roaming"] for s in run.get("roam_steps_ms", []) if s]
        if steps:
            lines.append(f"- {key}: {step_medians(steps)}")
        found = [g for run in row["runs"]["roaming"] for g in run.get("regenerations", [])]
        commits = [g["commit_ms"] for g in found if g.get("commit_ms")]
        if commits:
            lines.append(f"  the new server's COMMIT, ms from its arrival: {step_medians(commits)}")
    slow = [
        f"- {key}, roam {i + 1}: app {pause:.1f} ms, client steps (ms from the freeze) "
        + ", ".join(f"{step} {at}" for step, at in steps.items())
        + f"; gaps (start, length) ms from the switch: {gaps}"
        + (f"; servers (ms from the switch): {', '.join(near)}" if near else "")
        for key, row in results["streams"].items()
        for run in row["runs"]["roaming"]
        for i, (pause, steps, near, gaps) in enumerate(
            zip(
                run["app_pause_ms"],
                run.get("roam_steps_ms", []),
                run.get("server_near_switch", []),
                run.get("gaps_near_ms", []),
                strict=False,
            )
        )
        if pause is not None and pause >= SLOW_PAUSE_MS
    ]
    if slow:
        lines += ["", f"Roams with an app pause of {SLOW_PAUSE_MS:.0f} ms or more:", *slow]
    lines += ["", "Per roam, what the new server read to reach the client's position, in order:"]
    for key, row in results["streams"].items():
        found = [g for run in row["runs"]["roaming"] for g in run.get("regenerations", [])]
        if found:
            read = row["regenerated_bytes"]
            lines.append(
                f"- {key}: {', '.join(regeneration_text(g) for g in found)} "
                f"(p50 {read['p50'] / 2**20:.1f} MiB, p99 {read['p99'] / 2**20:.1f} MiB)"
            )
    recovery = [
        f"{key}: {row['recovery_ms']['p50']:.1f} ms ({', '.join(row['break_errors'])})"
        for key, row in results["streams"].items()
        if row["recovery_ms"]["n"]
    ]
    if recovery:
        lines += ["", "Reconnect: from noticing the break to data again (p50):"]
        lines += [f"- {line}" for line in recovery]
    for key, row in results["streams"].items():
        failed = sum_dicts(run.get("handoffs_not_migrated", {}) for run in row["runs"]["roaming"])
        if failed:
            lines += ["", f"Hand-overs that did not migrate, {key}:"]
            lines += trouble_lines(failed)
    if results.get("connections_error"):
        lines += ["", f"Connections not measured: {results['connections_error']}"]
    if results["connections"]:
        lines += [
            "",
            "| N | opened (setup s) | in the roam | outcomes | pause_ms | per connection ms | "
            "switch late ms | first PREPARE to switch s | prepare on new server s p50 / max | "
            "answered after the roam | GET ms p50 / p99 / max | client PAWS drops |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        notes = []
        for row in results["connections"]:
            if "error" in row:
                lines.append(f"| {row['n']} | failed: {row['error']} |||||||||||")
                continue
            lines.append(connections_row(row))
            errors = [*row["setup"]["errors"], *row["after"]["errors"]]
            if errors:
                notes.append(f"- N={row['n']}: " + "; ".join(errors))
            for when, roam in (("earlier", "an earlier roam"), ("later", "a later roam")):
                for line, count in (row.get(f"{when}_handoffs") or {}).items():
                    notes.append(f"- N={row['n']}, {roam}: {count} x {line}")
        if notes:
            lines += [
                "",
                "Errors the application saw, and the other hand-overs of its connections:",
                *notes,
            ]
    if results.get("opening"):
        lines += [
            "",
            f"New connections one after another for {results['opening_s']:g} s, live, a GET each:",
            "",
            "| deployment | opened | failed | GET ms p50 / p99 / max | of 0.5 s or more | "
            "roams | outcomes of the roams |",
            "|---|---|---|---|---|---|---|",
        ]
        for layout, row in results["opening"].items():
            get = row["get_ms"]
            outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items()) or "-"
            lines.append(
                f"| {'1 server, no roam' if layout == 'single' else 'roaming'} | {row['opened']} "
                f"| {row['failed']} | {get['p50']:.2f} / {get['p99']:.2f} / {get['max']:.1f} | "
                f"{row['slow']} | {row['roams']} | {outcomes} |"
            )
        for layout, row in results["opening"].items():
            if row["slow_at"] or row["errors"]:
                late = ", ".join(f"{at:.1f} s: {ms:.0f} ms" for at, ms in row["slow_at"])
                lines.append(f"- {layout}: slow at {late or '-'}; errors {row['errors'] or '-'}")
            if row["shim_log"]:
                lines += ["", f"Shim log, new connections, {layout}:"]
                lines += trouble_lines(row["shim_log"])
    for key, row in results["streams"].items():
        trouble = sum_dicts(run["shim_log"] for run in row["runs"]["roaming"])
        if trouble:
            lines += ["", f"Shim log, {key}, roaming (warnings, errors, connection resets):"]
            lines += trouble_lines(trouble)
    if results["connections"]:
        # The connection runs share one deployment: the last count covers them all.
        trouble = results["connections"][-1].get("shim_log") or {}
        if trouble:
            lines += ["", "Shim log, connections (warnings, errors, connection resets):"]
            lines += trouble_lines(trouble)
    return "\n".join(lines)
