"""``roam model``: the internet-scale model of server roaming (labs.model, docs/model.md)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from migrate.errors import ConfigError
from roam_cli.args import (
    bounded_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def _delays(text: str) -> tuple[float, ...]:
    values = {
        bounded_float(item, "a number of seconds", lambda v: v >= 0, "must not be negative")
        for item in text.split(",")
    }
    return tuple(sorted(values))


def _flood(text: str) -> str:
    if text not in ("server", "link"):
        raise argparse.ArgumentTypeError(f"{text!r}: choose server or link")
    return text


def _ks(text: str) -> tuple[int, ...]:
    return tuple(sorted({positive_int(item) for item in text.split(",")}))


def _m_change(text: str) -> tuple[float, int]:
    at, sep, m = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not TIME:M (e.g. 1800:4)")
    return positive_float(at), positive_int(m)


# option -> (type, help). Their defaults are labs.model.params.ModelParams's (and QUICK's for
# --quick); DEFAULTS repeats them for --help only, because importing labs would slow every roam
# command down (a unit test checks that they agree).
OPTIONS: dict[str, tuple[Any, str]] = {
    "servers": (positive_int, "N, servers in the pool"),
    "clients": (positive_int, "subscribed legitimate clients"),
    "bots": (non_negative_int, "attacking bots"),
    "insiders": (non_negative_int, "M, clients that leak their server to the bots"),
    "active": (positive_int, "k, servers active at once (k of N)"),
    "client_rate": (non_negative_float, "requests/s per client"),
    "bot_rate": (non_negative_float, "requests/s per bot"),
    "capacity": (positive_float, "C, requests/s one server serves"),
    "buffer": (positive_int, "K, requests one server holds"),
    "link_capacity": (positive_float, "a server's access link, request-equivalents/s"),
    "link_buffer": (positive_int, "the access router's queue, request-equivalents"),
    "link_weight": (positive_float, "request-equivalents of link flood per bot request"),
    "m": (positive_int, "epochs last 1..2^m ticks"),
    "tick": (positive_float, "seconds per tick"),
    "horizon": (positive_float, "seconds simulated"),
    "step": (positive_float, "the queueing model's time slot, seconds"),
    "delays": (_delays, "follow attacks' discovery delays, seconds, comma-separated"),
    "subset": (non_negative_int, "servers of the subset attack (0: no subset attack)"),
    "pause": (non_negative_float, "seconds a moved client reaches no server after a roam"),
    "insider_delay": (non_negative_float, "seconds the insiders' bots lag behind"),
    "retry_window": (non_negative_float, "seconds bots retry a closed gate (diluted attacks)"),
    "insider_flood": (_flood, "the insiders' bots flood their servers (server) or links (link)"),
    "samples": (positive_int, "legitimate requests sampled per simulation"),
    "isolation_k": (_ks, "k values of the isolation figure, comma-separated"),
    "isolation_trials": (positive_int, "trials per k of the isolation figure"),
    "isolation_epochs": (positive_int, "epochs after which isolation is given up"),
    "analysis_epochs": (positive_int, "epochs per m of the analytic comparison"),
    "guesses": (positive_int, "the guessing attacker's guesses per epoch"),
}


DEFAULTS: dict[str, tuple[object, object]] = {
    "servers": (100, None),
    "clients": (10000, 1000),
    "bots": (100000, 10000),
    "insiders": (5, None),
    "active": (10, None),
    "client_rate": (0.02, None),
    "bot_rate": (0.1, None),
    "capacity": (500.0, 50.0),
    "buffer": (2000, 200),
    "link_capacity": (2000.0, 200.0),
    "link_buffer": (4000, 400),
    "link_weight": (10.0, None),
    "m": (6, None),
    "tick": (1.0, None),
    "horizon": (3600.0, 900.0),
    "step": (1.0, None),
    "delays": ((0.0, 5.0, 15.0, 30.0), None),
    "subset": (10, None),
    "pause": (0.05, None),
    "insider_delay": (0.0, None),
    "retry_window": (0.0, None),
    "insider_flood": ("server", None),
    "samples": (200000, 20000),
    "isolation_k": ((2, 5, 10, 20), None),
    "isolation_trials": (5, 3),
    "isolation_epochs": (2000, None),
    "analysis_epochs": (20000, 4000),
    "guesses": (200, 100),
}


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "model",
        help="internet-scale model: roaming vs replication vs no defence, insider isolation",
        description="A vectorised model (numpy) of a pool of N servers, subscribed clients, "
        "bots and insiders: diluted, subset, follow (discovery delay) and insider attacks as "
        "server- and link-oriented floods; k of N active servers; threat-level changes of m. "
        "Prints legitimate requests served and response-time percentiles under no defence, "
        "static replication and roaming; the paper's analytic figures next to simulated ones; "
        "epochs until the insiders rank above every innocent client. Deterministic for a "
        "--seed. Defaults: the issue's scenario (N=100, 10^4 clients, 10^5 bots). "
        "See docs/model.md.",
    )
    for name, (kind, text) in OPTIONS.items():
        default, quick_default = DEFAULTS[name]
        shown = _shown(default)
        if quick_default is not None:
            shown += f"; --quick: {_shown(quick_default)}"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=None,
            help=f"{text} (default {shown})",
        )
    parser.add_argument(
        "--m-change",
        dest="m_changes",
        type=_m_change,
        action="append",
        default=None,
        metavar="TIME:M",
        help="threat level: epochs starting at TIME or later use M (repeatable; "
        "default: m=4 from half the horizon)",
    )
    parser.add_argument("--no-m-change", action="store_true", help="keep m the whole horizon")
    parser.add_argument("--seed", type=non_negative_int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="a tenth of the scale, a quarter hour (seconds)"
    )
    parser.add_argument(
        "--fig2",
        action="store_true",
        help="instead: the model at the scale of 'roam lab fig2', next to the lab's figures",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG plot (matplotlib)")
    parser.set_defaults(handler=run_model_command)


def params_from(args: argparse.Namespace) -> Any:
    from labs.model.params import ModelParams, quick, validate, with_horizon

    base = quick() if args.quick else ModelParams()
    chosen = {
        f.name: getattr(args, f.name)
        for f in fields(ModelParams)
        if getattr(args, f.name, None) is not None
    }
    if args.no_m_change:
        chosen["m_changes"] = ()
    elif args.m_changes is not None:
        chosen["m_changes"] = tuple(args.m_changes)
    chosen["seed"] = args.seed
    return validate(with_horizon(base, **chosen))


def run_model_command(args: argparse.Namespace) -> int:
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise ConfigError(
            "roam model needs numpy: install the labs extra (pip install 'server-roaming[labs]')"
        ) from None
    if args.fig2:
        return _run_fig2(args)
    from labs.model.run import plot, print_tables, run_model

    params = params_from(args)
    started = time.monotonic()
    result = run_model(params)
    elapsed = time.monotonic() - started
    if args.plot is not None:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result)
        print(f"model: {elapsed:.1f} s" + (f"; plot in {args.plot}" if args.plot else ""))
    return 0


def _run_fig2(args: argparse.Namespace) -> int:
    from labs.model.fig2check import render, run_fig2

    points = run_fig2(seed=args.seed)
    if args.json:
        print(json.dumps({"fig2": [p.as_json() for p in points]}))
    else:
        print(render(points))
    return 0
