"""The whole scenario of ``roam model``: every attack against every defence, the analytic
figures and insider isolation; its table, JSON and plot (docs/model.md)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labs.model import analytic, engine, isolation, schedule
from labs.model.params import ModelParams, validate

# Random streams: one per purpose, so that adding a scenario does not change the others.
STREAM_SCHEDULE = 1
STREAM_SCHEDULE_K1 = 2
STREAM_LAYOUT = 3
STREAM_ANALYTIC = 4
STREAM_ISOLATION = 5
STREAM_REQUESTS = 100


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


@dataclass(frozen=True)
class Defence:
    name: str
    layout: engine.Layout
    k: int


def scenarios(params: ModelParams, subset: tuple[int, ...]) -> list[engine.Attack]:
    """The attacks of the default table, in order."""
    attacks = [engine.Attack("none")]
    for flood in engine.FLOODS:
        attacks.append(engine.Attack("diluted", flood, retry_window=params.retry_window))
        if params.subset:
            attacks.append(
                engine.Attack("subset", flood, subset=subset, retry_window=params.retry_window)
            )
        attacks.extend(engine.Attack("follow", flood, delay=d) for d in params.delays)
    if params.insiders:
        flood = params.insider_flood
        attacks.append(engine.Attack("insider", flood, delay=params.insider_delay))
        attacks.append(engine.Attack("insider", flood, delay=params.insider_delay, revoke=True))
    return attacks


def defences(params: ModelParams, slot_times: np.ndarray) -> list[Defence]:
    layout_rng = rng_for(params.seed, STREAM_LAYOUT)
    home = layout_rng.permutation(params.clients) % params.servers
    result = [
        Defence("none", engine.Layout("none", params.servers, params.clients, slot_times), 1),
        Defence(
            "replication",
            engine.Layout("replication", params.servers, params.clients, slot_times, home=home),
            params.servers,
        ),
    ]
    ks = [1] if params.active == 1 else [1, params.active]
    for k in ks:
        stream = STREAM_SCHEDULE_K1 if k == 1 else STREAM_SCHEDULE
        sched = schedule.build(
            rng_for(params.seed, stream),
            servers=params.servers,
            k=k,
            clients=params.clients,
            m0=params.m,
            changes=params.m_changes,
            tick=params.tick,
            horizon=params.horizon,
        )
        layout = engine.Layout(
            "roaming", params.servers, params.clients, slot_times, schedule=sched
        )
        result.append(Defence(f"roaming k={k}", layout, k))
    return result


def _row(attack: engine.Attack, defence: Defence, outcome: engine.Outcome) -> dict[str, Any]:
    return {
        "attack": attack.kind,
        "label": attack.label(),
        "flood": attack.flood if attack.kind != "none" else "-",
        "delay_s": attack.delay if attack.kind in {"follow", "insider"} else None,
        "subset": len(attack.subset) if attack.kind == "subset" else None,
        "defence": defence.name,
        "k": defence.k,
        "offered": outcome.offered,
        "served": outcome.served,
        "served_fraction": outcome.served_fraction,
        "mean_s": _finite(outcome.mean()),
        "p50_s": _finite(outcome.percentile(50)),
        "p90_s": _finite(outcome.percentile(90)),
        "p99_s": _finite(outcome.percentile(99)),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def resources_of(params: ModelParams) -> engine.Resources:
    """The pool's capacities as ``params`` set them."""
    return engine.Resources(
        servers=params.servers,
        capacity=params.capacity,
        buffer=params.buffer,
        link_capacity=params.link_capacity,
        link_buffer=params.link_buffer,
        link_weight=params.link_weight,
    )


def simulate_all(params: ModelParams) -> list[dict[str, Any]]:
    slot_times = np.arange(0.0, params.horizon, params.step)
    pick = rng_for(params.seed, STREAM_LAYOUT, 1)
    insiders = tuple(int(c) for c in pick.choice(params.clients, params.insiders, replace=False))
    subset = tuple(int(s) for s in pick.choice(params.servers, params.subset, replace=False))
    resources = resources_of(params)
    load = engine.Load(
        clients=params.clients,
        client_rate=params.client_rate,
        attack_rate=params.bots * params.bot_rate,
        insiders=insiders,
    )
    rows = []
    pool = defences(params, slot_times)
    for index, attack in enumerate(scenarios(params, subset)):
        for defence in pool:
            # Common random numbers: every defence sees the same requests of a scenario.
            outcome = engine.simulate(
                rng_for(params.seed, STREAM_REQUESTS, index),
                defence.layout,
                attack,
                resources,
                load,
                step=params.step,
                horizon=params.horizon,
                pause=params.pause,
                samples=params.samples,
            )
            row = _row(attack, defence, outcome)
            if attack.revoke:
                revoked = (
                    defence.layout.revoked_at(np.asarray(insiders))
                    if defence.layout.defence == "roaming"
                    else math.inf
                )
                row["revoked_at_s"] = _finite(revoked)
            rows.append(row)
    return rows


def analytic_figures(params: ModelParams) -> dict[str, list[dict[str, Any]]]:
    ms = list(dict.fromkeys([params.m, *(m for _, m in params.m_changes)]))
    ks = list(dict.fromkeys([1, params.active]))
    guesses = []
    outside = []
    for i, m in enumerate(ms):
        for j, k in enumerate(ks):
            rng = rng_for(params.seed, STREAM_ANALYTIC, i, j)
            guesses.append(
                analytic.guess_figure(
                    rng,
                    m=m,
                    k=k,
                    servers=params.servers,
                    epochs=params.analysis_epochs,
                    guesses=params.guesses,
                ).as_json()
            )
            if params.subset:
                outside.append(
                    analytic.outside_figure(
                        rng,
                        m=m,
                        k=k,
                        servers=params.servers,
                        subset=params.subset,
                        epochs=params.analysis_epochs,
                    ).as_json()
                )
    return {"guess": guesses, "outside": outside}


def isolation_figures(params: ModelParams) -> list[dict[str, Any]]:
    ks = sorted({*params.isolation_k, params.active})
    result = []
    for k in ks:
        epochs = [
            isolation.epochs_to_isolate(
                rng_for(params.seed, STREAM_ISOLATION, k, trial),
                servers=params.servers,
                k=k,
                clients=params.clients,
                insiders=params.insiders,
                max_epochs=params.isolation_epochs,
            )
            for trial in range(params.isolation_trials)
        ]
        found = [e for e in epochs if e is not None]
        result.append(
            {
                "k": k,
                "insiders": params.insiders,
                "clients": params.clients,
                "epochs": epochs,
                "median": statistics.median(found) if len(found) == len(epochs) else None,
                "min": min(found) if found else None,
                "max": max(found) if len(found) == len(epochs) else None,
            }
        )
    return result


def run_model(params: ModelParams) -> dict[str, Any]:
    """Every figure of the scenario, as one JSON-able dict (deterministic for a seed)."""
    validate(params)
    return {
        "params": params.as_json(),
        "scenarios": simulate_all(params),
        "analytic": analytic_figures(params),
        "isolation": isolation_figures(params),
    }


# --- presentation ----------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{1000 * value:.0f}" if value < 10 else f"{value:.1f}s"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per attack, three columns per defence."""
    names = list(dict.fromkeys(row["defence"] for row in result["scenarios"]))
    header = ["attack", "flood"]
    for name in names:
        header += [f"{name} served %", "p50 ms", "p99 ms"]
    rows: list[list[str]] = []
    grouped: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in result["scenarios"]:
        grouped.setdefault((row["label"], row["flood"]), {})[row["defence"]] = row
    for (label, flood), by_defence in grouped.items():
        line = [label, flood]
        for name in names:
            row = by_defence[name]
            line += [_pct(row["served_fraction"]), _ms(row["p50_s"]), _ms(row["p99_s"])]
        rows.append(line)
    return header, rows


def analytic_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["figure", "m", "k", "analytic", "simulated", "samples"]
    rows = []
    for g in result["analytic"]["guess"]:
        rows.append(
            [
                "guess time and server, k/(2^m N)",
                str(g["m"]),
                str(g["k"]),
                f"{g['analytic']:.3e}",
                f"{g['simulated']:.3e}",
                f"{g['hits']} hits / {g['trials']}",
            ]
        )
    for o in result["analytic"]["outside"]:
        rows.append(
            [
                f"time outside {o['subset']} attacked, (N-M)/N",
                str(o["m"]),
                str(o["k"]),
                f"{o['analytic']:.4f}",
                f"{o['simulated']:.4f}",
                f"{o['epochs']} epochs",
            ]
        )
    return header, rows


def isolation_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["k", "insiders", "clients", "epochs to isolate (median)", "min-max", "trials"]
    rows = []
    for i in result["isolation"]:
        spread = "-" if i["min"] is None else f"{i['min']}-{i['max'] if i['max'] else '>'}"
        median = "not isolated" if i["median"] is None else f"{i['median']:g}"
        rows.append(
            [
                str(i["k"]),
                str(i["insiders"]),
                str(i["clients"]),
                median,
                spread,
                ", ".join("-" if e is None else str(e) for e in i["epochs"]),
            ]
        )
    return header, rows


def _main_title(result: dict[str, Any]) -> str:
    offered = result["scenarios"][0]["offered"] if result["scenarios"] else 0
    return (
        f"legitimate requests under attack: share served of {offered:,.0f} offered, "
        "response-time percentiles"
    )


def render_text(result: dict[str, Any]) -> str:
    """Plain-text tables (what ``roam model`` prints; rich is used when available)."""
    blocks = []
    for title, (header, rows) in (
        (_main_title(result), table_rows(result)),
        ("analytic against simulated", analytic_rows(result)),
        ("insider isolation", isolation_rows(result)),
    ):
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def print_tables(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but the model does not need it
        print(render_text(result))
        return
    console = Console(width=200)
    for title, (header, rows) in (
        (_main_title(result), table_rows(result)),
        ("analytic against simulated", analytic_rows(result)),
        ("insider isolation", isolation_rows(result)),
    ):
        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < 2 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    """Served share and p99 per attack and defence; isolation against k (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row["defence"] for row in result["scenarios"]))
    labels = list(dict.fromkeys(f"{r['label']} ({r['flood']})" for r in result["scenarios"]))
    fig, axes = plt.subplots(3, 1, figsize=(12, 13))
    width = 0.8 / len(names)
    x = np.arange(len(labels))
    for i, name in enumerate(names):
        rows = [r for r in result["scenarios"] if r["defence"] == name]
        served = [100 * r["served_fraction"] for r in rows]
        p99 = [r["p99_s"] if r["p99_s"] is not None else np.nan for r in rows]
        axes[0].bar(x + i * width, served, width, label=name)
        axes[1].bar(x + i * width, p99, width, label=name)
    for ax, ylabel in ((axes[0], "legitimate requests served (%)"), (axes[1], "p99 (s)")):
        ax.set_xticks(x + width * (len(names) - 1) / 2, labels, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    iso = [i for i in result["isolation"] if i["min"] is not None]
    axes[2].errorbar(
        [i["k"] for i in iso],
        [i["median"] if i["median"] is not None else np.nan for i in iso],
        yerr=[
            [(i["median"] or i["min"]) - i["min"] for i in iso],
            [(i["max"] or i["min"]) - (i["median"] or i["min"]) for i in iso],
        ],
        marker="o",
        capsize=4,
    )
    axes[2].set_xlabel("k active servers")
    axes[2].set_ylabel("epochs to isolate the insiders")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
