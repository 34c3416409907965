"""``roam lab fig2`` and ``roam lab overhead``: the experiments of docs/results.md.

Registered under ``roam lab`` by ``roam_cli.commands.lab``. The experiments themselves are in
``labs.experiments``; labs are imported only when a command runs (every ``roam`` command
builds this parser).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from migrate.errors import ConfigError
from roam_cli.args import bounded_float, non_negative_int, positive_int, positive_seconds

# The same as labs.experiments.poisson's (a unit test checks): importing labs here would slow
# every roam command down.
MODES = ("replication", "roaming-reconnect", "roaming-live")
ATTACKS = ("none", "diluted", "follow")
DISCOVERY_DELAYS_S = (0.0, 15.0, 30.0, 45.0, 60.0)
QUICK_SCALE = 10.0
MAX_SCALE = 100.0


def _scale(text: str) -> float:
    return bounded_float(
        text, "a number", lambda v: 1 <= v <= MAX_SCALE, f"must be between 1 and {MAX_SCALE:g}"
    )


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [item for item in chosen if item not in allowed]
        if not chosen or unknown:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose among {', '.join(allowed)} (comma-separated)"
            )
        return tuple(dict.fromkeys(chosen))

    return parse


def _delays(text: str) -> tuple[float, ...]:
    values = {
        bounded_float(
            item, "a number of seconds", lambda v: v >= 0, "must be a non-negative number"
        )
        for item in text.split(",")
    }
    return tuple(sorted(values))


def register_experiments(commands: Any) -> None:
    """Add ``fig2`` and ``overhead`` to ``roam lab``'s subcommands."""
    fig2 = commands.add_parser(
        "fig2",
        help="reproduce the paper's Figure 2: response times under attack, against replication",
        description="The paper's experiment (section V) on real processes in a PaperTopo lab: "
        "20 legitimate requests for a 1 MB file from C (Poisson, mean 8 s), an attacker A "
        "(Poisson, mean 1 s, 5 minutes), 60 s epochs; modes replication, roaming-reconnect "
        "and roaming-live; attacks none, diluted and follow (discovery delays 0-60 s). Every "
        "time is divided and every rate multiplied by --scale. Writes results.json, "
        "results.csv, results.md, fig2.png and runs.json into --out. See docs/results.md.",
    )
    fig2.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    fig2.add_argument(
        "--scale",
        type=_scale,
        default=None,
        metavar="S",
        help="speed-up: link rates times S, times divided by S (default 1; --quick: 10)",
    )
    fig2.add_argument(
        "--repeat",
        type=positive_int,
        default=None,
        metavar="R",
        help="runs of every configuration, with other arrivals each (default 1)",
    )
    fig2.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="N", help="arrivals seed (default 0)"
    )
    fig2.add_argument(
        "--quick",
        action="store_true",
        help="every configuration once at scale 10 (explicit --scale/--repeat win)",
    )
    fig2.add_argument(
        "--modes",
        type=_choices(MODES),
        default=None,
        metavar="M,...",
        help=f"only these modes (default all: {','.join(MODES)})",
    )
    fig2.add_argument(
        "--attacks",
        type=_choices(ATTACKS),
        default=None,
        metavar="A,...",
        help=f"only these attacks (default all: {','.join(ATTACKS)})",
    )
    fig2.add_argument(
        "--delays",
        type=_delays,
        default=None,
        metavar="S,...",
        help="discovery delays of the follow attack, paper seconds (default 0,15,30,45,60)",
    )
    fig2.add_argument(
        "--requests",
        type=positive_int,
        default=None,
        metavar="N",
        help="legitimate requests per run (default 20, as in the paper)",
    )
    fig2.add_argument(
        "--keep-logs", action="store_true", help="copy every run's shim logs into DIR/logs"
    )
    fig2.set_defaults(handler=run_fig2)

    overhead = commands.add_parser(
        "overhead",
        help="measure what migration costs: pause per roam, goodput, checkpoint overhead",
        description="Live migration's costs in a lab: the pause of a download at each roam "
        "against the epoch length, goodput against the roam frequency, and the checkpoint "
        "period against the bytes of checkpoints and the bytes replayed at each roam. Writes "
        "overhead.json and plots into --out. See docs/results.md.",
    )
    overhead.add_argument("--out", required=True, type=Path, metavar="DIR")
    overhead.add_argument(
        "--seconds",
        type=positive_seconds,
        default=8.0,
        metavar="S",
        help="length of each measured download (default 8)",
    )
    overhead.add_argument(
        "--repeat", type=positive_int, default=1, metavar="R", help="runs of each point (default 1)"
    )
    overhead.set_defaults(handler=run_overhead)

    insiders = commands.add_parser(
        "insiders",
        help="k of N: an insider leaks its schedule, is ranked first and revoked (issue 17)",
        description="One lab run (docs/insiders.md): N servers with k active per epoch, "
        "several clients fetching through real client shims, one insider whose leaked keys "
        "aim a SYN flood at its own server from the start of every epoch. Prints the "
        "legitimate clients' response times in a no-attack phase, under the attack, and after "
        "the revocation; the epochs until 'roam suspects' ranks the insider first, and first at "
        "the confidence; the automatic policy (roam suspects --revoke-above) then revokes it "
        "and, once its leased keys run out, the attacker computes no server. Needs root.",
    )
    insiders.add_argument("--servers", type=positive_int, default=6, metavar="N", help="(6)")
    insiders.add_argument("--active", type=positive_int, default=3, metavar="K", help="(3)")
    insiders.add_argument("--clients", type=positive_int, default=5, metavar="C", help="(5)")
    insiders.add_argument(
        "--insider",
        type=positive_int,
        default=0,
        metavar="I",
        help="the insider is client cI (default: the last)",
    )
    insiders.add_argument(
        "--tick",
        type=positive_seconds,
        default=1.0,
        metavar="S",
        help="the schedule's tick; m = 1, so epochs last S or 2S seconds (default 1)",
    )
    insiders.add_argument(
        "--baseline-epochs", type=positive_int, default=6, metavar="E", help="no attack (6)"
    )
    insiders.add_argument(
        "--max-attack-epochs",
        type=positive_int,
        default=40,
        metavar="E",
        help="give up the ranking after E epochs of attack (40)",
    )
    insiders.add_argument(
        "--after-epochs",
        type=positive_int,
        default=6,
        metavar="E",
        help="epochs measured once the attacker's keys ran out (6)",
    )
    insiders.add_argument(
        "--lease-epochs",
        type=positive_int,
        default=4,
        metavar="L",
        help="clients hold keys L epochs ahead, extended online (4)",
    )
    insiders.add_argument(
        "--confidence",
        type=bounded_float_type(0, 1),
        default=0.99,
        metavar="P",
        help="the policy revokes at or above this confidence (0.99)",
    )
    insiders.add_argument(
        "--rate-mbit",
        type=bounded_float_type(0, 100),
        default=1.0,
        metavar="R",
        help="the servers' and clients' links (the attacker's is unshaped; default 1)",
    )
    insiders.add_argument(
        "--flood-pps",
        type=bounded_float_type(0, 20000),
        default=3000.0,
        metavar="P",
        help="SYNs per second at the insider's server (3000)",
    )
    insiders.add_argument(
        "--request-gap",
        type=positive_seconds,
        default=0.25,
        metavar="S",
        help="each client's pause between requests (0.25)",
    )
    insiders.add_argument("--out", type=Path, metavar="DIR", help="write DIR/results.json")
    insiders.add_argument("--plot", type=Path, metavar="DIR", help="write DIR/insiders.png")
    insiders.add_argument("--json", action="store_true", help="print the results as JSON")
    insiders.set_defaults(handler=run_insiders)


def run_fig2(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from roam_cli.extras import require

    require("matplotlib", "scapy")  # the figure comes at the end of an hour's run

    from labs.experiments.fig2 import Fig2Options, run_fig2
    from labs.experiments.poisson import PaperParams, configurations
    from labs.experiments.report import acceptance, markdown_table

    scale = args.scale if args.scale is not None else (QUICK_SCALE if args.quick else 1.0)
    repeat = args.repeat if args.repeat is not None else 1
    points = configurations(
        modes=args.modes or MODES,
        delays_s=args.delays or DISCOVERY_DELAYS_S,
        attacks=args.attacks or ATTACKS,
    )
    if not points:
        raise ConfigError("these --modes and --attacks leave nothing to run")
    params = PaperParams()
    if args.requests is not None:
        params = replace(params, legit_requests=args.requests)
    options = Fig2Options(
        out=args.out,
        scale=scale,
        repeat=repeat,
        seed=args.seed,
        points=tuple(points),
        params=params,
        keep_logs=args.keep_logs,
    )
    with _RichProgress() as progress:
        records = run_fig2(options, progress)
    print(markdown_table(records))
    for goal in acceptance(records):
        verdict = "met" if goal.met else "NOT met" if goal.met is False else "not measured"
        print(f"{verdict}: {goal.name} ({goal.detail})")
    print(f"written: {args.out}/results.json, results.csv, results.md, fig2.png, runs.json")
    return 0


def run_overhead(args: argparse.Namespace) -> int:
    from roam_cli.extras import require

    require("matplotlib", "scapy")
    from labs.experiments.overhead import OverheadOptions, run_overhead

    with _RichProgress() as progress:
        summary = run_overhead(
            OverheadOptions(out=args.out, seconds=args.seconds, repeat=args.repeat), progress
        )
    print(summary)
    return 0


def bounded_float_type(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        return bounded_float(
            text, "a number", lambda v: low < v <= high, f"must be in ({low:g}, {high:g}]"
        )

    return parse


def run_insiders(args: argparse.Namespace) -> int:
    import json
    import sys

    from roam_cli.extras import require

    require("scapy", *(("matplotlib",) if args.plot else ()))
    from labs.experiments.insiders import InsidersOptions, report_lines, run_insiders

    options = InsidersOptions(
        servers=args.servers,
        active=args.active,
        clients=args.clients,
        insider=args.insider,
        tick_s=args.tick,
        baseline_epochs=args.baseline_epochs,
        max_attack_epochs=args.max_attack_epochs,
        after_epochs=args.after_epochs,
        lease_epochs=args.lease_epochs,
        confidence=args.confidence,
        rate_mbit=args.rate_mbit,
        flood_pps=args.flood_pps,
        request_gap_s=args.request_gap,
        out=args.out,
        plot=args.plot,
    )

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_insiders(options, say)
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print("\n".join(report_lines(result)))
    return 0


class _RichProgress:
    """A rich progress bar over the experiment's runs (plain lines when not on a terminal)."""

    def __enter__(self) -> _RichProgress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("starting the lab", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def begin(self, label: str) -> None:
        self.progress.update(self.task, description=label)

    def done(self, label: str, summary: str) -> None:
        self.progress.console.print(f"{label}: {summary}")
        self.progress.advance(self.task)
