"""Results of the Figure 2 experiment: statistics, ``results.json``, CSV, a markdown table and
the plot. Pure apart from writing the files it is asked to write.

``results.json`` is a list with one record per mode, attack and discovery delay, with exactly
the fields of ``RESULT_FIELDS``: response times of the legitimate requests in the paper's
(unscaled) seconds, over every repeat; ``completed`` and ``failed`` count requests, so
``completed + failed`` is the number of legitimate requests issued. ``validate_results``
checks a parsed file against that schema.
"""

from __future__ import annotations

import csv
import io
import itertools
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labs.experiments.poisson import ATTACKS, MODES
from labs.stats import percentile
from migrate.errors import ConfigError
from migrate.kernel.files import PUBLIC_FILE, write_private

RESULT_FIELDS = (
    "mode",
    "attack",
    "discovery_delay_s",
    "mean_s",
    "median_s",
    "p95_s",
    "completed",
    "failed",
    "repeats",
)
_STAT_FIELDS = ("mean_s", "median_s", "p95_s")
_COUNT_FIELDS = ("completed", "failed", "repeats")

PAPER_NO_ATTACK_OVERHEAD = 0.14  # roaming's mean response time over replication's, no attack


def _number(value: float) -> float | int:
    """Whole numbers as integers (``"discovery_delay_s": 15``), others rounded."""
    return int(value) if float(value).is_integer() else round(value, 6)


@dataclass(frozen=True)
class Record:
    mode: str
    attack: str
    discovery_delay_s: float
    mean_s: float | None
    median_s: float | None
    p95_s: float | None
    completed: int
    failed: int
    repeats: int

    def as_json(self) -> dict[str, Any]:
        def stat(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "mode": self.mode,
            "attack": self.attack,
            "discovery_delay_s": _number(self.discovery_delay_s),
            "mean_s": stat(self.mean_s),
            "median_s": stat(self.median_s),
            "p95_s": stat(self.p95_s),
            "completed": self.completed,
            "failed": self.failed,
            "repeats": self.repeats,
        }


def make_record(
    mode: str,
    attack: str,
    discovery_delay_s: float,
    response_times_s: Sequence[float],
    failed: int,
    repeats: int,
) -> Record:
    """A record from the response times (paper seconds) of the completed requests."""
    times = list(response_times_s)
    return Record(
        mode=mode,
        attack=attack,
        discovery_delay_s=float(discovery_delay_s),
        mean_s=statistics.fmean(times) if times else None,
        median_s=statistics.median(times) if times else None,
        p95_s=percentile(times, 0.95) if times else None,
        completed=len(times),
        failed=failed,
        repeats=repeats,
    )


def validate_results(data: object) -> list[dict[str, Any]]:
    """Check a parsed ``results.json``; raise ``ConfigError`` naming the first problem."""
    if not isinstance(data, list):
        raise ConfigError("results.json must hold a list of records")
    seen = set()
    for number, record in enumerate(data):
        where = f"record {number}"
        if not isinstance(record, dict):
            raise ConfigError(f"{where} is not an object")
        if tuple(sorted(record)) != tuple(sorted(RESULT_FIELDS)):
            raise ConfigError(f"{where} has fields {sorted(record)}, not {sorted(RESULT_FIELDS)}")
        if record["mode"] not in MODES:
            raise ConfigError(f"{where}: unknown mode {record['mode']!r}")
        if record["attack"] not in ATTACKS:
            raise ConfigError(f"{where}: unknown attack {record['attack']!r}")
        delay = record["discovery_delay_s"]
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ConfigError(f"{where}: discovery_delay_s must be a non-negative number")
        if record["attack"] != "follow" and delay != 0:
            raise ConfigError(f"{where}: only follow attacks have a discovery delay")
        for name in _COUNT_FIELDS:
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {name} must be a non-negative integer")
        for name in _STAT_FIELDS:
            value = record[name]
            if value is None:
                if record["completed"]:
                    raise ConfigError(f"{where}: {name} is null with completed requests")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{where}: {name} must be a non-negative number or null")
        key = (record["mode"], record["attack"], delay)
        if key in seen:
            raise ConfigError(f"{where}: a second record for {key}")
        seen.add(key)
    return data


def write_results_json(records: Iterable[Record], path: Path) -> None:
    import json

    data = [record.as_json() for record in records]
    validate_results(data)
    write_private(path, json.dumps(data, indent=2) + "\n", PUBLIC_FILE)


def write_csv(records: Iterable[Record], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(RESULT_FIELDS))
    writer.writeheader()
    for record in records:
        row = record.as_json()
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_private(path, text.getvalue(), PUBLIC_FILE)


def _baseline(records: Sequence[Record], attack: str) -> Record | None:
    """Replication's record to compare a point with: the same attack, and for follow attacks
    the diluted one (replication has no active server to follow)."""
    wanted = "diluted" if attack == "follow" else attack
    for record in records:
        if record.mode == "replication" and record.attack == wanted:
            return record
    return None


def ratio_to_replication(record: Record, records: Sequence[Record]) -> float | None:
    base = _baseline(records, record.attack)
    if base is None or base.mean_s in (None, 0) or record.mean_s is None:
        return None
    return record.mean_s / base.mean_s


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(records: Sequence[Record]) -> str:
    """One row per record, with the mean against replication's (same attack; follow against
    replication under the diluted attack)."""
    lines = [
        "| mode | attack | discovery delay (s) | mean (s) | median (s) | p95 (s) "
        "| completed | failed | repeats | mean vs replication |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        ratio = ratio_to_replication(record, records)
        delay = f"{record.discovery_delay_s:g}" if record.attack == "follow" else "-"
        versus = "-" if ratio is None or record.mode == "replication" else f"{ratio - 1:+.0%}"
        lines.append(
            f"| {record.mode} | {record.attack} | {delay} | {_cell(record.mean_s)} "
            f"| {_cell(record.median_s)} | {_cell(record.p95_s)} | {record.completed} "
            f"| {record.failed} | {record.repeats} | {versus} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Goal:
    name: str
    met: bool | None  # None: not measured
    detail: str


def acceptance(records: Sequence[Record]) -> list[Goal]:
    """The issue's acceptance goals on the figures (nothing here is adjusted to meet them)."""
    by_key = {(r.mode, r.attack, r.discovery_delay_s): r for r in records}
    goals = []
    live_none = by_key.get(("roaming-live", "none", 0.0))
    rep_none = by_key.get(("replication", "none", 0.0))
    if live_none and rep_none and live_none.mean_s and rep_none.mean_s:
        over = live_none.mean_s / rep_none.mean_s - 1
        goals.append(
            Goal(
                "no attack: roaming-live mean within 5 % of replication",
                abs(over) <= 0.05,
                f"{over:+.1%} ({live_none.mean_s:.2f} s against {rep_none.mean_s:.2f} s; "
                f"the paper: +{PAPER_NO_ATTACK_OVERHEAD:.0%})",
            )
        )
    else:
        goals.append(Goal("no attack: roaming-live within 5 % of replication", None, "missing"))
    rep_diluted = by_key.get(("replication", "diluted", 0.0))
    attacked = [
        r
        for r in records
        if r.mode == "roaming-live" and r.attack in ("diluted", "follow") and r.mean_s is not None
    ]
    if rep_diluted and rep_diluted.mean_s is not None and attacked:
        losers = [r for r in attacked if r.mean_s is not None and r.mean_s >= rep_diluted.mean_s]
        goals.append(
            Goal(
                "under attack: roaming-live beats replication (diluted, every follow delay)",
                not losers,
                "all better"
                if not losers
                else "not better: "
                + ", ".join(
                    f"{r.attack} {r.discovery_delay_s:g} s ({_cell(r.mean_s)} s)" for r in losers
                ),
            )
        )
    else:
        goals.append(Goal("under attack: roaming-live beats replication", None, "missing"))
    follow = sorted(
        (r for r in attacked if r.attack == "follow"), key=lambda r: r.discovery_delay_s
    )
    if len(follow) >= 2:
        means = [r.mean_s for r in follow if r.mean_s is not None]
        falling = all(b < a for a, b in itertools.pairwise(means))
        goals.append(
            Goal(
                "follow: roaming-live's response time falls as the discovery delay grows",
                falling,
                ", ".join(f"{r.discovery_delay_s:g} s: {_cell(r.mean_s)} s" for r in follow),
            )
        )
    else:
        goals.append(Goal("follow: falls with the discovery delay", None, "missing"))
    return goals


# --- the plot -------------------------------------------------------------------------------

_COLOURS = {"replication": "tab:red", "roaming-reconnect": "tab:blue", "roaming-live": "tab:green"}
_STYLES = {"none": ":", "diluted": "--", "follow": "-"}
_ATTACK_NAMES = {"none": "no attack", "diluted": "diluted attack", "follow": "follow attack"}


def plot_fig2(
    records: Sequence[Record],
    path: Path,
    *,
    title: str = "",
    delays_s: Sequence[float] = (0, 15, 30, 45, 60),
    log_y: bool | None = None,
) -> None:
    """Figure 2(b)'s layout: mean response time of the legitimate requests against the
    attacker's discovery delay. Follow attacks are lines over the delay; attacks without a
    delay (none, diluted) are horizontal lines across it. One colour per mode, one line style
    per attack. ``log_y`` (default: when the means span more than a factor of 20)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [r.mean_s for r in records if r.mean_s]
    if log_y is None:
        log_y = bool(means) and max(means) / min(means) > 20
    low, high = (min(delays_s), max(delays_s)) if delays_s else (0.0, 60.0)
    figure, axes = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for mode in MODES:
        for attack in ("follow", "diluted", "none"):
            points = sorted(
                (r for r in records if r.mode == mode and r.attack == attack and r.mean_s),
                key=lambda r: r.discovery_delay_s,
            )
            if not points:
                continue
            label = f"{mode}, {_ATTACK_NAMES[attack]}"
            style: dict[str, Any] = {
                "color": _COLOURS[mode],
                "linestyle": _STYLES[attack],
                "linewidth": 1.8,
            }
            if attack == "follow":
                axes.plot(
                    [r.discovery_delay_s for r in points],
                    [r.mean_s or 0.0 for r in points],
                    marker="o",
                    label=label,
                    **style,
                )
            else:
                axes.plot(
                    [low, high],
                    [points[0].mean_s or 0.0] * 2,
                    label=label,
                    **style,
                )
    axes.set_xlabel("attacker's discovery delay after each roam (s)")
    axes.set_ylabel("mean response time of legitimate requests (s)")
    if log_y:
        axes.set_yscale("log")
    axes.set_xticks(list(delays_s))
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title or "Response time with and without attack (cf. the paper's Fig. 2(b))")
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def records_from_json(data: Iterable[Mapping[str, Any]]) -> list[Record]:
    return [
        Record(
            mode=str(r["mode"]),
            attack=str(r["attack"]),
            discovery_delay_s=float(r["discovery_delay_s"]),
            mean_s=None if r["mean_s"] is None else float(r["mean_s"]),
            median_s=None if r["median_s"] is None else float(r["median_s"]),
            p95_s=None if r["p95_s"] is None else float(r["p95_s"]),
            completed=int(r["completed"]),
            failed=int(r["failed"]),
            repeats=int(r["repeats"]),
        )
        for r in data
    ]
