"""What live migration costs: ``roam lab overhead``.

One ``PaperTopo`` lab at scale 10 (20 Mbit/s links, as ``roam lab fig2 --quick``), nginx on
127.0.0.1:8000 of s1 and s2 behind ``roam server``, ``roam client`` on c, a fresh deployment
per run with the protocol's own schedule (``m = 1``: epochs of one or two ticks, each on a
random server, so about every other boundary is a roam). Three studies:

* **pause per roam against epoch length**: a client in c downloads a large file through the
  VIP for ``seconds``, time-stamping every gap between receives; the pause of a roam is the
  longest gap from just before the client shim's switch to a second after it. Ticks of
  0.25, 0.5, 1 and 2 s, in live and in reconnect mode (the paper's prototype: the client
  resumes with a Range request at each roam).
* **goodput against roam frequency**: the same downloads; roams per second are counted from
  the client shim's switches, goodput against a deployment that never roams (same shims).
* **checkpoint period against overhead and replay**: live mode, tick 0.5 s,
  ``--checkpoint-period`` 0.1 to 2 s, two workloads: the download, and a keep-alive loop of
  64 KiB GETs. Checkpoint carriers are counted on c's interface (tcpdump, TCP option 253
  first: how the server shim builds them) and in the servers' status; the bytes the client
  replays and the bytes the new server regenerates per roam come from the shims' events.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labs.experiments.deployment import Fig2Topo, FixedEpochRoaming
from labs.experiments.fig2 import PROJECT_ROOT, NullProgress, Progress
from labs.lab import Lab
from labs.roaming import LISTEN_PORT
from migrate.errors import ConfigError
from migrate.kernel.files import PUBLIC_FILE, write_private

SCALE = 10.0
TICKS_S = (0.25, 0.5, 1.0, 2.0)
NO_ROAM_TICK_S = 100_000.0
CHECKPOINT_PERIODS_S = (0.1, 0.25, 0.5, 1.0, 2.0)
CHECKPOINT_TICK_S = 0.5
MIB = 1024 * 1024
SMALL_BYTES = 64 * 1024
PAUSE_BEFORE_S = 0.3  # a roam's pause may begin this long before the switch (the freeze)
PAUSE_AFTER_S = 1.0
CARRIER_FILTER = ["tcp", "src", "port", str(LISTEN_PORT), "and", "tcp[20]", "==", "253"]


@dataclass(frozen=True)
class OverheadOptions:
    out: Path
    seconds: float = 8.0
    repeat: int = 1
    ticks_s: tuple[float, ...] = TICKS_S
    periods_s: tuple[float, ...] = CHECKPOINT_PERIODS_S

    def __post_init__(self) -> None:
        if not math.isfinite(self.seconds) or not 2 <= self.seconds <= 600:
            raise ConfigError(f"--seconds must be in [2, 600], got {self.seconds:g}")
        if not 1 <= self.repeat <= 20:
            raise ConfigError(f"--repeat must be in [1, 20], got {self.repeat}")


# --- pure analysis --------------------------------------------------------------------------


def roam_pauses(gaps: Sequence[Sequence[float]], switches: Sequence[float]) -> list[float]:
    """For each switch, the longest receive gap overlapping ``[switch - PAUSE_BEFORE_S,
    switch + PAUSE_AFTER_S]`` (0 if none: the download never stopped)."""
    pauses = []
    for switch in switches:
        low, high = switch - PAUSE_BEFORE_S, switch + PAUSE_AFTER_S
        overlapping = [end - start for start, end in gaps if end >= low and start <= high]
        pauses.append(max(overlapping, default=0.0))
    return pauses


def pcap_frames(data: bytes) -> tuple[int, int]:
    """Number of packets and their bytes on the wire (original lengths) in a pcap file."""
    if len(data) < 24:
        return 0, 0
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError("not a pcap file")
    record = struct.Struct(endian + "IIII")
    offset, packets, total = 24, 0, 0
    while offset + record.size <= len(data):
        _sec, _frac, included, original = record.unpack_from(data, offset)
        offset += record.size + included
        if offset > len(data):
            break
        packets += 1
        total += original
    return packets, total


def summarise(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "p90": None, "max": None, "mean": None}
    ordered = sorted(values)
    return {
        "n": len(values),
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


# --- runs -----------------------------------------------------------------------------------


class Overhead:
    def __init__(self, lab: Lab, options: OverheadOptions) -> None:
        self.lab = lab
        self.options = options
        rng = random.Random("overhead")
        # more than a run can download at the links' rate
        link_bytes_per_s = 2.0 * SCALE * 1e6 / 8
        self.big = rng.randbytes(max(32 * MIB, int(1.5 * options.seconds * link_bytes_per_s)))
        self.small = rng.randbytes(SMALL_BYTES)
        self.pool = FixedEpochRoaming(
            lab,
            service="nginx",
            content={"big": self.big, "small": self.small},
            start_delay=3.0,
            fixed=False,
        )
        for host in self.pool.server_hosts:
            self.pool.start_service(host)
        self.agent_dir = self.pool.workdir / "agents"
        self.agent_dir.mkdir(exist_ok=True)
        self._count = 0

    def deploy(self, migration: str, tick: float, *extra: str) -> None:
        pool = self.pool
        pool.tick = tick
        pool.first_switch_after = self.options.seconds + 30 if tick >= NO_ROAM_TICK_S else 0.0
        pool.redeploy(migration, *extra)
        time.sleep(max(0.0, pool.experiment_start - time.time()) + 0.3)

    def agent(self, role: str, plan: dict[str, Any]) -> dict[str, Any]:
        self._count += 1
        stem = self.agent_dir / f"{self._count:03d}-{role}"
        plan_path, out = stem.with_suffix(".plan.json"), stem.with_suffix(".out.json")
        write_private(plan_path, json.dumps(plan))
        argv = [sys.executable, "-m", "labs.experiments.agents", role]
        argv += ["--plan", str(plan_path), "--out", str(out)]
        process = self.lab["c"].popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(PROJECT_ROOT)
        )
        try:
            _, stderr = process.communicate(timeout=self.options.seconds + 60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
        if not out.exists():
            raise ConfigError(f"the {role} agent failed: {stderr.decode(errors='replace')[-300:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def roam_times(self, seconds: float) -> list[float]:
        """Boundaries where the server changes, from the schedule, over the next run."""
        pool = self.pool
        epochs = pool.experiment_epochs(int(seconds / pool.tick) + 8)
        return [
            float(later["start"])
            for earlier, later in itertools.pairwise(epochs)
            if later["server"] != earlier["server"]
        ]

    def client_events(self, name: str) -> list[dict[str, Any]]:
        return [e for s in self.pool.clients.values() for e in s.events() if e["event"] == name]

    def server_events(self, name: str) -> list[dict[str, Any]]:
        return [e for s in self.pool.servers.values() for e in s.events() if e["event"] == name]

    def server_live_status(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for shim in self.pool.servers.values():
            try:
                live = json.loads(shim.status_path.read_text()).get("live") or {}
            except (OSError, ValueError):
                continue
            for key, value in live.items():
                if isinstance(value, int):
                    totals[key] = totals.get(key, 0) + value
        return totals

    def stream(self, migration: str, tick: float) -> dict[str, Any]:
        """One download through the VIP across roams (or none)."""
        seconds = self.options.seconds
        self.deploy(migration, tick)
        pool = self.pool
        reconnect = []
        if migration == "reconnect":
            reconnect = [t + pool.delta + pool.gamma for t in self.roam_times(seconds)]
        result = self.agent(
            "stream",
            {
                "host": str(pool.vip),
                "port": LISTEN_PORT,
                "path": "/big",
                "file_bytes": len(self.big),
                "duration_s": seconds,
                "reconnect_at": reconnect,
                "stall_timeout_s": 2.0,
            },
        )
        switches = [
            float(e["ts"])
            for e in self.client_events("switch")
            if result["first"] < float(e["ts"]) < result["last"]
        ]
        roams = [
            e for e in self.client_events("roam") if result["first"] < e["ts"] < result["last"]
        ]
        intact = hashlib.sha256(self.big[: result["bytes"]]).hexdigest() == result["sha256"]
        pool.stop_shims()
        elapsed = result["last"] - result["first"]
        pauses = roam_pauses(result["gaps"], switches)
        return {
            "migration": migration,
            "tick_s": tick if tick < NO_ROAM_TICK_S else None,
            "seconds": round(elapsed, 3),
            "bytes": result["bytes"],
            "intact": intact,
            "goodput_mbit_s": 8 * result["bytes"] / elapsed / 1e6 if elapsed > 0 else 0.0,
            "roams": len(switches),
            "roams_per_s": len(switches) / elapsed if elapsed > 0 else 0.0,
            "pauses_ms": [round(1000 * p, 1) for p in pauses],
            "shim_pauses_ms": [e.get("pause_ms") for e in roams],
            "outcomes": _sum_outcomes(roams),
            "breaks": len(result["breaks"]),
        }

    def checkpoints(self, workload: str, period: float) -> dict[str, Any]:
        seconds = self.options.seconds
        self.deploy("live", CHECKPOINT_TICK_S, "--checkpoint-period", f"{period:g}")
        pool = self.pool
        capture_path = pool.workdir / f"carriers-{self._count}.pcap"
        path, data = ("/big", self.big) if workload == "download" else ("/small", self.small)
        plan = {
            "host": str(pool.vip),
            "port": LISTEN_PORT,
            "path": path,
            "file_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "duration_s": seconds,
            "stall_timeout_s": 2.0,
        }
        started = time.time()
        with self.lab["c"].capture(
            "eth0", capture_path, bpf_filter=CARRIER_FILTER, snaplen_bytes=128
        ):
            result = self.agent("stream" if workload == "download" else "requests", plan)
        elapsed = time.time() - started
        carriers, carrier_bytes = pcap_frames(capture_path.read_bytes())
        capture_path.unlink(missing_ok=True)
        roams = [e for e in self.client_events("roam") if e["ts"] >= started]
        prepared = [e for e in self.server_events("prepared") if e["ts"] >= started]
        reincarnated = [e for e in self.server_events("reincarnated") if e["ts"] >= started]
        status = self.server_live_status()
        pool.stop_shims()
        moved = [e for e in roams if e.get("connections")]
        replayed = [int(e.get("bytes_replayed") or 0) for e in moved]
        intact = (
            result.get("bad", 0) == 0
            if workload == "requests"
            else hashlib.sha256(data[: result["bytes"]]).hexdigest() == result["sha256"]
        )
        goodput = 8 * result["bytes"] / elapsed / 1e6 if elapsed > 0 else 0.0
        return {
            "workload": workload,
            "checkpoint_period_s": period,
            "seconds": round(elapsed, 3),
            "goodput_mbit_s": goodput,
            "intact": intact,
            "carriers": carriers,
            "carrier_bytes": carrier_bytes,
            "carrier_bytes_per_s": carrier_bytes / elapsed if elapsed > 0 else 0.0,
            "carrier_overhead_pct": 100 * carrier_bytes / result["bytes"]
            if result["bytes"]
            else None,
            "checkpoints_sent": status.get("checkpoints_sent"),
            "roams_with_connections": len(moved),
            "replayed_c2s_bytes_per_roam": statistics.fmean(replayed) if replayed else None,
            "regenerated_s2c_bytes_per_roam": (
                sum(int(e.get("regenerated") or 0) for e in prepared) / len(moved)
                if moved
                else None
            ),
            "unsent_bytes_per_roam": (
                sum(int(e.get("unsent") or 0) for e in reincarnated) / len(moved) if moved else None
            ),
            "outcomes": _sum_outcomes(roams),
            "breaks": len(result["breaks"]),
        }


def _sum_outcomes(roams: Sequence[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for roam in roams:
        for outcome, count in (roam.get("outcomes") or {}).items():
            total[outcome] = total.get(outcome, 0) + int(count)
    return total


def run_overhead(options: OverheadOptions, progress: Progress | None = None) -> str:
    """Run the three studies; write overhead.json, overhead.md and the plots into ``out``."""
    progress = progress or NullProgress()
    if os.geteuid() != 0:
        raise ConfigError("roam lab overhead builds network namespaces: run it as root")
    options.out.mkdir(parents=True, exist_ok=True)
    ticks = [*options.ticks_s, NO_ROAM_TICK_S]
    stream_points = [(m, t) for m in ("live", "reconnect") for t in ticks]
    checkpoint_points = [(w, p) for w in ("download", "requests") for p in options.periods_s]
    progress.start((len(stream_points) + len(checkpoint_points)) * options.repeat)
    streams: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    started = time.time()
    with Lab(Fig2Topo(scale=SCALE)) as lab:
        study = Overhead(lab, options)
        for _ in range(options.repeat):
            for migration, tick in stream_points:
                label = f"download, {migration}, " + (
                    "no roam" if tick >= NO_ROAM_TICK_S else f"tick {tick:g} s"
                )
                progress.begin(label)
                run = study.stream(migration, tick)
                streams.append(run)
                progress.done(
                    label,
                    f"{run['goodput_mbit_s']:.1f} Mbit/s, {run['roams']} roams, pauses "
                    f"median {summarise(run['pauses_ms'])['median'] or 0:.0f} ms",
                )
            for workload, period in checkpoint_points:
                label = f"checkpoints every {period:g} s, {workload}"
                progress.begin(label)
                run = study.checkpoints(workload, period)
                checkpoints.append(run)
                progress.done(
                    label,
                    f"{run['carrier_bytes_per_s']:.0f} B/s of carriers, replayed "
                    f"{run['replayed_c2s_bytes_per_roam'] or 0:.0f} B/roam",
                )
        study.pool.stop()
    results = {
        "scale": SCALE,
        "link_mbit": 2.0 * SCALE,
        "seconds": options.seconds,
        "repeat": options.repeat,
        "elapsed_s": round(time.time() - started, 1),
        "streams": streams,
        "checkpoints": checkpoints,
    }
    write_private(options.out / "overhead.json", json.dumps(results, indent=1) + "\n", PUBLIC_FILE)
    table = render_overhead(results)
    write_private(options.out / "overhead.md", table, PUBLIC_FILE)
    plot_overhead(results, options.out)
    return table


# --- reports --------------------------------------------------------------------------------


def stream_rows(streams: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, tick): pooled pauses and roams, median goodput, against no roam."""
    rows = []
    keys = sorted({(s["migration"], s["tick_s"] or math.inf) for s in streams})
    for migration, tick in keys:
        runs = [
            s for s in streams if s["migration"] == migration and (s["tick_s"] or math.inf) == tick
        ]
        base = [s for s in streams if s["migration"] == migration and s["tick_s"] is None]
        goodput = statistics.median(s["goodput_mbit_s"] for s in runs)
        base_goodput = statistics.median(s["goodput_mbit_s"] for s in base) if base else None
        pauses = [p for s in runs for p in s["pauses_ms"]]
        rows.append(
            {
                "migration": migration,
                "tick_s": None if tick == math.inf else tick,
                "mean_epoch_s": None if tick == math.inf else 1.5 * tick,
                "roams_per_s": statistics.fmean(s["roams_per_s"] for s in runs),
                "pause_ms": summarise(pauses),
                "goodput_mbit_s": goodput,
                "goodput_vs_no_roam": goodput / base_goodput if base_goodput else None,
                "intact": all(s["intact"] for s in runs),
                "outcomes": _sum_outcomes([{"outcomes": s["outcomes"]} for s in runs]),
            }
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_overhead(results: dict[str, Any]) -> str:
    lines = [
        f"# Migration overhead (links {results['link_mbit']:g} Mbit/s, runs of "
        f"{results['seconds']:g} s, {results['repeat']} repeat(s))",
        "",
        "## Pause per roam and goodput against epoch length",
        "",
        "| mode | tick (s) | mean epoch (s) | roams/s | pause median (ms) | pause p90 (ms) "
        "| pause max (ms) | goodput (Mbit/s) | vs no roam | intact | hand-overs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in stream_rows(results["streams"]):
        pause = row["pause_ms"]
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(row["outcomes"].items())) or "-"
        lines.append(
            f"| {row['migration']} | {_fmt(row['tick_s'], 'g') if row['tick_s'] else 'no roam'} "
            f"| {_fmt(row['mean_epoch_s'], '.2f')} | {row['roams_per_s']:.2f} "
            f"| {_fmt(pause['median'], '.0f')} | {_fmt(pause['p90'], '.0f')} "
            f"| {_fmt(pause['max'], '.0f')} | {row['goodput_mbit_s']:.2f} "
            f"| {_fmt(row['goodput_vs_no_roam'], '.1%')} | {'yes' if row['intact'] else 'NO'} "
            f"| {outcomes} |"
        )
    lines += [
        "",
        "## Checkpoint period against overhead and replay (live, tick 0.5 s)",
        "",
        "| workload | period (s) | goodput (Mbit/s) | carriers/s | carrier bytes/s "
        "| overhead | replayed c2s B/roam | regenerated s2c B/roam | intact | hand-overs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in results["checkpoints"]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(run["outcomes"].items())) or "-"
        rate = run["carriers"] / run["seconds"] if run["seconds"] else 0.0
        lines.append(
            f"| {run['workload']} | {run['checkpoint_period_s']:g} "
            f"| {run['goodput_mbit_s']:.2f} | {rate:.1f} | {run['carrier_bytes_per_s']:.0f} "
            f"| {_fmt(run['carrier_overhead_pct'], '.3f')} % "
            f"| {_fmt(run['replayed_c2s_bytes_per_roam'], '.0f')} "
            f"| {_fmt(run['regenerated_s2c_bytes_per_roam'], '.0f')} "
            f"| {'yes' if run['intact'] else 'NO'} | {outcomes} |"
        )
    return "\n".join(lines) + "\n"


def plot_overhead(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in stream_rows(results["streams"]) if r["tick_s"] is not None]
    colours = {"live": "tab:green", "reconnect": "tab:blue"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for migration in ("live", "reconnect"):
        mine = [r for r in rows if r["migration"] == migration]
        if not mine:
            continue
        epochs = [r["mean_epoch_s"] for r in mine]
        left.plot(
            epochs,
            [r["pause_ms"]["median"] or 0 for r in mine],
            marker="o",
            color=colours[migration],
            label=f"{migration}: median",
        )
        left.plot(
            epochs,
            [r["pause_ms"]["p90"] or 0 for r in mine],
            marker="^",
            linestyle="--",
            color=colours[migration],
            label=f"{migration}: p90",
        )
        right.plot(
            [r["roams_per_s"] for r in mine],
            [100 * (r["goodput_vs_no_roam"] or 0) for r in mine],
            marker="o",
            color=colours[migration],
            label=migration,
        )
    left.set_xlabel("mean epoch length (s)")
    left.set_ylabel("download pause at a roam (ms)")
    left.set_title("Pause per roam")
    left.set_xscale("log", base=2)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("roams per second")
    right.set_ylabel("goodput, % of the same shims without roams")
    right.set_title("Goodput against roam frequency")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "overhead-roams.png")
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for workload, colour in (("download", "tab:purple"), ("requests", "tab:orange")):
        mine = [r for r in results["checkpoints"] if r["workload"] == workload]
        if not mine:
            continue
        periods = [r["checkpoint_period_s"] for r in mine]
        left.plot(
            periods,
            [r["carrier_bytes_per_s"] for r in mine],
            marker="o",
            color=colour,
            label=workload,
        )
        right.plot(
            periods,
            [r["replayed_c2s_bytes_per_roam"] or 0 for r in mine],
            marker="o",
            color=colour,
            label=f"{workload}: replayed by the client (c2s)",
        )
        right.plot(
            periods,
            [r["regenerated_s2c_bytes_per_roam"] or 0 for r in mine],
            marker="^",
            linestyle="--",
            color=colour,
            label=f"{workload}: regenerated by the new server (s2c)",
        )
    left.set_xlabel("checkpoint period (s)")
    left.set_ylabel("checkpoint carriers on the wire (bytes/s)")
    left.set_xscale("log")
    left.set_title("Checkpoint overhead")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("checkpoint period (s)")
    right.set_ylabel("bytes per roam")
    right.set_xscale("log")
    right.set_yscale("symlog")
    right.set_title("Replayed and regenerated bytes")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "overhead-checkpoints.png")
    plt.close(figure)
