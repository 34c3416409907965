"""The paper's Figure 2 on real processes: ``roam lab fig2``.

One ``PaperTopo`` lab (C and A behind R1, the R1-R2 bottleneck, S1 and S2 behind R2, every
link at 2 Mbit/s times the scale) serves every run. Each server host runs nginx twice, on
identical 1 MB files: on 127.0.0.1:8000, the unmodified service behind the server shim
(roaming modes), and on its own address, port 8080, reached directly (replication). Each run:

1. ``replication``: no shims. ``roaming-*``: a fresh deployment whose epochs from the
   experiment's start last 60 s (scaled) and alternate s1, s2, s1, ...
   (``labs.experiments.epochs``), ``roam server --allow-any-source --migration M`` on s1 and
   s2 and ``roam client --migration M`` on c. ``--allow-any-source``: the paper's servers
   cannot tell attack requests from legitimate ones, so the active server serves the
   attacker like a client; only the closed gate of the inactive server stops it.
2. The plans (``labs.experiments.poisson``; the same arrivals for every mode of a repeat) go to
   the client agent in c and the attacker agent in a (``labs.experiments.agents``); the
   follow attacker's targets come from the deployment's ``roam schedule``.
3. The run ends when every legitimate request has completed or failed; the attack (at most
   its 5 scaled minutes) is stopped then, since it can no longer change a response time.

Response times are reported in the paper's seconds (lab seconds times the scale).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labs.errors import LabError
from labs.experiments.deployment import Fig2Topo, FixedEpochRoaming
from labs.experiments.poisson import (
    VIP,
    Configuration,
    Epoch,
    PaperParams,
    Scaling,
    attack_targets,
    configurations,
    legit_targets,
    poisson_arrivals,
    roam_times,
    stream_rng,
)
from labs.experiments.report import (
    Record,
    acceptance,
    make_record,
    markdown_table,
    plot_fig2,
    write_csv,
    write_results_json,
)
from labs.lab import Lab
from labs.roaming import LISTEN_PORT, ShimProcess
from labs.services import start_nginx
from migrate.errors import ConfigError
from migrate.kernel.files import PUBLIC_FILE, write_private

REPLICATION_PORT = 8080
FILE_PATH = "/file"
START_DELAY_S = 4.0  # lab seconds from a new deployment to the experiment's start
AGENT_LEAD_S = 1.0  # replication: lab seconds from starting the agents to the experiment
SETTLE_S = 1.0  # lab seconds between runs: closed connections drain from the queues
QUICK_SCALE = 10.0
MAX_SCALE = 100.0
MAX_REPEAT = 100
# The agents run this checkout's code, whatever the installed package points at.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Fig2Options:
    out: Path
    scale: float = 1.0
    repeat: int = 1
    seed: int = 0
    points: tuple[Configuration, ...] = field(default_factory=lambda: tuple(configurations()))
    params: PaperParams = field(default_factory=PaperParams)
    # Client and attacker behaviour, in paper seconds:
    stall_timeout_s: float = 60.0  # no data that long: the client resumes on a new connection
    retry_delay_s: float = 1.0  # before a new attempt after an error
    request_timeout_s: float = 600.0  # a legitimate request gives up (failed: timeout)
    attack_connect_timeout_s: float = 30.0  # an attack request to a closed gate gives up
    keep_logs: bool = False  # copy every run's shim logs and agent files into out/logs

    def __post_init__(self) -> None:
        Scaling(self.scale)  # validates
        if not 1 <= self.scale <= MAX_SCALE:
            raise ConfigError(f"--scale must be in [1, {MAX_SCALE:g}], got {self.scale:g}")
        if isinstance(self.repeat, bool) or not 1 <= self.repeat <= MAX_REPEAT:
            raise ConfigError(f"--repeat must be in [1, {MAX_REPEAT}], got {self.repeat}")
        if not self.points:
            raise ConfigError("no configuration to run")
        for name in ("stall_timeout_s", "retry_delay_s", "request_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")


class Progress(Protocol):
    """What a runner reports while it runs (the CLI shows a rich progress bar)."""

    def start(self, total: int) -> None: ...

    def begin(self, label: str) -> None: ...

    def done(self, label: str, summary: str) -> None: ...


class NullProgress:
    def start(self, total: int) -> None:
        pass

    def begin(self, label: str) -> None:
        pass

    def done(self, label: str, summary: str) -> None:
        pass


# --- one run ------------------------------------------------------------------------------


@dataclass
class Run:
    point: Configuration
    repeat: int
    requests: list[dict[str, Any]]
    attack: dict[str, Any]
    roams: list[dict[str, Any]]
    shim_trouble: dict[str, int]
    epochs: list[dict[str, Any]]
    experiment_start: float

    def response_times_s(self, scale: float) -> list[float]:
        return [scale * float(r["response_s"]) for r in self.requests if r["ok"]]

    @property
    def failed(self) -> int:
        return sum(1 for r in self.requests if not r["ok"])

    def as_json(self, scale: float) -> dict[str, Any]:
        return {
            "mode": self.point.mode,
            "attack": self.point.attack,
            "discovery_delay_s": self.point.discovery_delay_s,
            "repeat": self.repeat,
            "experiment_start": self.experiment_start,
            "requests": [
                {
                    **r,
                    "at_s": round(scale * (float(r["at"]) - self.experiment_start), 3),
                    "response_paper_s": round(scale * float(r["response_s"]), 3)
                    if "response_s" in r
                    else None,
                    "start_lateness_ms": round(1000 * (float(r["started"]) - float(r["at"])), 1)
                    if "started" in r
                    else None,
                }
                for r in self.requests
            ],
            "attacker": self.attack,
            "client_roams": self.roams,
            "shim_trouble": self.shim_trouble,
            "epochs": self.epochs,
        }


def shim_trouble(pool: FixedEpochRoaming) -> dict[str, int]:
    """Warnings and errors in the shims' logs, counted by event and reason."""
    counts: dict[str, int] = {}
    for shim in [*pool.servers.values(), *pool.clients.values()]:
        for event in shim.events():
            if event.get("level") == "info":
                continue
            reason = str(event.get("reason") or event.get("status") or "")[:80]
            line = f"{shim.kind} {shim.host}: {event['event']} {reason}".rstrip()
            counts[line] = counts.get(line, 0) + 1
    return counts


class Experiment:
    """The lab, its services, and one run after another."""

    def __init__(self, lab: Lab, options: Fig2Options, data: bytes) -> None:
        self.lab = lab
        self.options = options
        self.scaling = Scaling(options.scale)
        self.params = options.params
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.pool = FixedEpochRoaming(
            lab,
            tick=self.scaling.to_lab(self.params.epoch_s),
            service="nginx",
            content={FILE_PATH.lstrip("/"): data},
            start_delay=START_DELAY_S,
            stretch_epochs=self.stretch_epochs(),
        )
        self.servers = list(self.pool.server_hosts)
        for host in self.servers:
            self.pool.start_service(host)
            root = self.pool.workdir / f"www-{host}"
            start_nginx(lab[host], root, port=REPLICATION_PORT, address=lab[host].address)
        self.agent_dir = self.pool.workdir / "agents"
        self.agent_dir.mkdir(exist_ok=True)
        self._runs = 0

    def stretch_epochs(self) -> int:
        """Fixed epochs enough for the attack and a minute after it."""
        return math.ceil((self.params.attack_duration_s + 60.0) / self.params.epoch_s) + 1

    def lab_s(self, paper_s: float) -> float:
        return self.scaling.to_lab(paper_s)

    def run(self, point: Configuration, repeat: int) -> Run:
        options, params = self.options, self.params
        seed = options.seed
        legit_at = poisson_arrivals(
            stream_rng(seed, repeat, "legit"), params.legit_mean_gap_s, count=params.legit_requests
        )
        targets = legit_targets(
            point.mode, len(legit_at), stream_rng(seed, repeat, "replica"), self.servers
        )
        attack_at = (
            []
            if point.attack == "none"
            else poisson_arrivals(
                stream_rng(seed, repeat, "attack"),
                params.attack_mean_gap_s,
                until_s=params.attack_duration_s,
            )
        )
        pool = self.pool
        roaming = point.mode != "replication"
        if roaming:
            migration = "live" if point.mode == "roaming-live" else "reconnect"
            pool.redeploy(migration, "--allow-any-source")
            start = pool.experiment_start
            epochs_json = pool.experiment_epochs(pool.stretch_epochs + 30)
            epochs = [
                Epoch(
                    self.scaling.to_paper(float(e["start"]) - start),
                    pool.host_of(str(e["server"])),
                )
                for e in epochs_json
            ]
        else:
            pool.stop_shims()
            start = round(time.time() + AGENT_LEAD_S + 0.5, 3)
            epochs_json = []
            epochs = []
        victims = attack_targets(
            point.attack,
            attack_at,
            stream_rng(seed, repeat, "split"),
            servers=self.servers,
            epochs=epochs,
            delay_s=point.discovery_delay_s,
        )
        port = LISTEN_PORT if roaming else REPLICATION_PORT
        reconnect_at = []
        if point.mode == "roaming-reconnect":
            # the old server drops its connections when its gate closes, delta + gamma after
            # the boundary: that is when the paper's client reconnects
            cut = pool.delta + pool.gamma
            reconnect_at = [start + self.lab_s(t) + cut for t in roam_times(epochs)]
        legit_plan = {
            "path": FILE_PATH,
            "file_bytes": len(self.data),
            "sha256": self.sha256,
            "timeout_s": self.lab_s(options.request_timeout_s),
            "stall_timeout_s": self.lab_s(options.stall_timeout_s),
            "retry_delay_s": self.lab_s(options.retry_delay_s),
            "reconnect_at": reconnect_at,
            "requests": [
                {
                    "index": index,
                    "at": start + self.lab_s(at),
                    "target": target,
                    "host": str(pool.vip) if target == VIP else str(self.lab[target].address),
                    "port": port,
                }
                for index, (at, target) in enumerate(zip(legit_at, targets, strict=True))
            ],
        }
        attack_plan = {
            "path": FILE_PATH,
            "end": start + self.lab_s(params.attack_duration_s),
            "connect_timeout_s": self.lab_s(options.attack_connect_timeout_s),
            "abandon_on_retarget": point.attack == "follow",
            "arrivals": [
                [start + self.lab_s(at), str(self.lab[victim].address), port]
                for at, victim in zip(attack_at, victims, strict=True)
            ],
        }
        legit_out, legit_proc = self._agent("c", "legit", legit_plan)
        attack_out, attack_proc = (
            self._agent("a", "attack", attack_plan) if attack_at else (None, None)
        )
        try:
            bound = (
                start
                + self.lab_s(max(legit_at, default=0.0) + options.request_timeout_s)
                + 30.0
                - time.time()
            )
            try:
                legit_proc.wait(timeout=max(1.0, bound))
            except subprocess.TimeoutExpired:
                legit_proc.send_signal(signal.SIGTERM)
                legit_proc.wait(timeout=30)
        finally:
            if attack_proc is not None and attack_proc.poll() is None:
                attack_proc.send_signal(signal.SIGTERM)
                try:
                    attack_proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    attack_proc.kill()
                    attack_proc.wait(timeout=10)
        requests = self._read(legit_out, "client")["requests"]
        attack = self._read(attack_out, "attacker") if attack_out is not None else {}
        roams = [
            {k: e.get(k) for k in ("ts", "epoch", "server", "connections", "outcomes", "pause_ms")}
            for shim in pool.clients.values()
            for e in shim.events()
            if e["event"] == "roam"
        ]
        trouble = shim_trouble(pool)
        shims = [*pool.servers.values(), *pool.clients.values()]
        pool.stop_shims()
        if options.keep_logs:
            agent_files = [legit_out, *([attack_out] if attack_out else [])]
            self._keep_logs(point, repeat, shims, agent_files)
        time.sleep(SETTLE_S)
        return Run(
            point=point,
            repeat=repeat,
            requests=requests,
            attack=attack,
            roams=roams,
            shim_trouble=trouble,
            epochs=epochs_json,
            experiment_start=start,
        )

    def _keep_logs(
        self,
        point: Configuration,
        repeat: int,
        shims: Sequence[ShimProcess],
        agent_files: Sequence[Path],
    ) -> None:
        """Copy the shims' logs and the agents' plans and results of this run."""
        import shutil

        name = f"{point.label} r{repeat + 1}".replace(" / ", "-").replace(" ", "-")
        target = self.options.out / "logs" / name
        target.mkdir(parents=True, exist_ok=True)
        for shim in shims:
            for path in (shim.log_json, shim.stderr_path):
                if path.exists():
                    shutil.copy(path, target / path.name)
        for out in agent_files:
            for path in (out, out.with_name(out.name.replace(".out.json", ".plan.json"))):
                if path.exists():
                    shutil.copy(path, target / path.name)

    def _agent(
        self, host: str, role: str, plan: dict[str, Any]
    ) -> tuple[Path, subprocess.Popen[Any]]:
        self._runs += 1
        stem = self.agent_dir / f"{self._runs:03d}-{role}"
        plan_path = stem.with_suffix(".plan.json")
        out_path = stem.with_suffix(".out.json")
        write_private(plan_path, json.dumps(plan))
        with open(stem.with_suffix(".stderr"), "wb") as stderr:
            process = self.lab[host].popen(
                [
                    sys.executable,
                    "-m",
                    "labs.experiments.agents",
                    role,
                    "--plan",
                    str(plan_path),
                    "--out",
                    str(out_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=str(PROJECT_ROOT),
            )
        return out_path, process

    def _read(self, path: Path, what: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            stderr = path.with_name(path.name.replace(".out.json", ".stderr"))
            text = stderr.read_text(errors="replace") if stderr.exists() else ""
            tail = text.strip().splitlines()[-1:]
            raise LabError(
                f"the {what} agent wrote no results ({error}): {' '.join(tail) or 'no output'}"
            ) from None
        return data


# --- the whole experiment -----------------------------------------------------------------


def aggregate(runs: Sequence[Run], points: Sequence[Configuration], scale: float) -> list[Record]:
    records = []
    for point in points:
        mine = [run for run in runs if run.point == point]
        times = [t for run in mine for t in run.response_times_s(scale)]
        failed = sum(run.failed for run in mine)
        records.append(
            make_record(point.mode, point.attack, point.discovery_delay_s, times, failed, len(mine))
        )
    return records


def summary_line(run: Run, scale: float) -> str:
    times = run.response_times_s(scale)
    mean = sum(times) / len(times) if times else float("nan")
    return f"mean {mean:.1f} s, {len(times)} completed, {run.failed} failed"


def run_fig2(options: Fig2Options, progress: Progress | None = None) -> list[Record]:
    """Run every configuration ``repeat`` times and write the results into ``options.out``."""
    import os

    progress = progress or NullProgress()
    if os.geteuid() != 0:
        raise ConfigError("roam lab fig2 builds network namespaces: run it as root")
    options.out.mkdir(parents=True, exist_ok=True)
    data = random.Random(f"fig2-file:{options.seed}").randbytes(options.params.file_bytes)
    runs: list[Run] = []
    started = time.time()
    total = len(options.points) * options.repeat
    progress.start(total)
    topo = Fig2Topo(scale=options.scale, rate_mbit=options.params.rate_mbit)
    with Lab(topo) as lab:
        lab_info = {"id": str(lab.id), "namespaces": lab.namespaces, "workdir": str(lab.workdir)}
        experiment = Experiment(lab, options, data)
        for repeat in range(options.repeat):
            for point in options.points:
                label = f"{point.label} (repeat {repeat + 1}/{options.repeat})"
                progress.begin(label)
                run = experiment.run(point, repeat)
                runs.append(run)
                progress.done(label, summary_line(run, options.scale))
        experiment.pool.stop()
    records = aggregate(runs, options.points, options.scale)
    write_outputs(options, records, runs, time.time() - started, lab_info)
    return records


def write_outputs(
    options: Fig2Options,
    records: Sequence[Record],
    runs: Sequence[Run],
    elapsed_s: float,
    lab_info: dict[str, Any],
) -> None:
    out = options.out
    write_results_json(records, out / "results.json")
    write_csv(records, out / "results.csv")
    goals = acceptance(records)
    table = markdown_table(records)
    goal_lines = [
        f"- {'met' if g.met else 'not met' if g.met is False else 'not measured'}: "
        f"{g.name} ({g.detail})"
        for g in goals
    ]
    write_private(
        out / "results.md",
        f"# Figure 2, scale {options.scale:g}, {options.repeat} repeat(s), seed {options.seed}\n\n"
        f"Response times of the legitimate requests in the paper's seconds.\n\n{table}\n"
        + "\n".join(goal_lines)
        + "\n",
        PUBLIC_FILE,
    )
    plot_fig2(
        records,
        out / "fig2.png",
        title=f"Fig. 2(b) reproduced: scale {options.scale:g}, "
        f"{options.repeat} repeat(s), {options.params.legit_requests} requests each",
    )
    details = {
        "scale": options.scale,
        "repeat": options.repeat,
        "seed": options.seed,
        "elapsed_s": round(elapsed_s, 1),
        "lab": lab_info,
        "params": {
            "legit_requests": options.params.legit_requests,
            "legit_mean_gap_s": options.params.legit_mean_gap_s,
            "attack_mean_gap_s": options.params.attack_mean_gap_s,
            "attack_duration_s": options.params.attack_duration_s,
            "epoch_s": options.params.epoch_s,
            "file_bytes": options.params.file_bytes,
            "rate_mbit": options.params.rate_mbit,
            "stall_timeout_s": options.stall_timeout_s,
            "retry_delay_s": options.retry_delay_s,
            "request_timeout_s": options.request_timeout_s,
            "attack_connect_timeout_s": options.attack_connect_timeout_s,
        },
        "runs": [run.as_json(options.scale) for run in runs],
    }
    write_private(out / "runs.json", json.dumps(details, indent=1) + "\n", PUBLIC_FILE)
