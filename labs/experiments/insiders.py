"""An insider who leaks its schedule, found and cut off with k of N: ``roam lab insiders``.

One lab, one run (issue 17; docs/insiders.md):

* ``InsidersTopo``: servers ``s1..sN`` and clients ``c1..cC`` on one switched LAN whose links
  run at ``rate_mbit``, and an outsider ``o1`` (the attacker's bots) on an unshaped link: the
  bots have more capacity than one server's link, so a flood fills that link's queue.
* A deployment with ``k`` of ``N`` active (``roam init --active``), every client subscribed
  with a key lease (``--until-epoch``, ``--lease-epochs``: the servers extend its keys online,
  a few epochs ahead); real ``roam server`` shims in front of python's http.server, each
  running from its own copy of the deployment directory, and real ``roam client`` shims.
  Every client host fetches a small file through the VIP in a loop, each request timed.
* A no-attack phase of ``baseline_epochs``; then the insider (one of the clients) leaks its
  bundle and its saved state to the attacker in ``o1`` (``labs.experiments.insider_attack``),
  which computes the insider's server for each epoch with the project's schedule code and
  floods it with SYNs from the start of the epoch to its end.
* The operator: after every epoch, the servers' attack reports (each server appends one line
  per epoch it was active in to its directory's ``reports/``) are gathered into the
  operator's directory and ranked (``migrate.kernel.reports.evaluate``, the code of ``roam
  suspects``). Once the insider is first at the confidence asked for, the automatic policy
  runs once on a lab host: ``roam suspects DIR --revoke-above P`` (which revokes as ``roam
  revoke`` does: the list, then every server's control port).
* After the revocation the servers stop extending the insider's keys: the attacker keeps
  flooding the insider's server while the leaked keys last (at most ``lease_epochs``), then
  knows neither the epoch nor the server. An ``after`` phase measures the clients then.

Measured: legitimate clients' response times per phase (baseline, attack, the keys' leftover,
after), split by whether the client shared the insider's server in the request's epoch; the
epochs until the insider is ranked first, and first at the confidence; the revocation's epoch;
the insider's own requests per phase (none is served after the revocation); the attacker's
packets per phase.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs.errors import LabError
from labs.lab import Lab
from labs.params import LinkParams
from labs.roaming import RoamingLab, roam_argv
from labs.topologies import PoolTopo
from migrate.activeset import ActiveSchedule, check_active
from migrate.errors import ConfigError
from migrate.kernel.files import PUBLIC_FILE, write_private

SMALL = bytes(range(256)) * 8  # the 2 KiB the clients fetch
REPORT_LAG_S = 0.6  # after an epoch ends, until its servers' reports are written
PHASES = ("baseline", "attack", "leftover", "after")
# The agents run this checkout's code, whatever the installed package points at.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# A client's requests through the VIP, one at a time, until a Unix time: one JSON line each
# ({"at": start, "s": duration, "ok": bool, "error": str}), flushed as it goes.
CLIENT_AGENT = r"""
import hashlib, http.client, json, sys, time
vip, until, gap, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
digest, out = sys.argv[5], sys.argv[6]
with open(out, "a") as stream:
    while time.time() < until:
        began, t0 = time.time(), time.perf_counter()
        conn = http.client.HTTPConnection(vip, 80, timeout=timeout)
        try:
            conn.request("GET", "/small")
            response = conn.getresponse()
            body = response.read()
            ok = response.status == 200 and hashlib.sha256(body).hexdigest() == digest
            error = "" if ok else f"status {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            ok, error = False, type(exc).__name__
        finally:
            conn.close()
        line = {"at": began, "s": time.perf_counter() - t0, "ok": ok, "error": error}
        stream.write(json.dumps(line) + "\n")
        stream.flush()
        time.sleep(gap)
"""


@dataclass(frozen=True)
class InsidersOptions:
    servers: int = 6
    active: int = 3
    clients: int = 5
    insider: int = 0  # 1-based client number; 0: the last client
    tick_s: float = 1.0  # m = 1: epochs of one or two ticks
    baseline_epochs: int = 6
    max_attack_epochs: int = 40
    after_epochs: int = 6
    lease_epochs: int = 4
    confidence: float = 0.99
    rate_mbit: float = 1.0
    flood_pps: float = 3000.0
    request_gap_s: float = 0.25
    request_timeout_s: float = 3.0
    out: Path | None = None  # results.json here
    plot: Path | None = None  # PNG plots here

    def __post_init__(self) -> None:
        def integer(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be an integer in {low}..{high}, got {value!r}")

        def number(name: str, flag: str, low: float, high: float) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{flag} must be a number, got {value!r}")
            if not math.isfinite(value) or not low < value <= high:
                raise ConfigError(f"{flag} must be in ({low:g}, {high:g}], got {value:g}")

        integer("servers", 2, 20)
        integer("clients", 2, 40)
        integer("insider", 0, self.clients)
        integer("baseline_epochs", 1, 200)
        integer("max_attack_epochs", 1, 500)
        integer("after_epochs", 1, 200)
        integer("lease_epochs", 1, 100)
        number("tick_s", "--tick", 0.2, 30.0)
        number("rate_mbit", "--rate-mbit", 0.0, 100.0)
        number("flood_pps", "--flood-pps", 0.0, 20_000.0)
        number("request_gap_s", "--request-gap", 0.0, 60.0)
        number("request_timeout_s", "request_timeout_s", 0.0, 60.0)
        number("confidence", "--confidence", 0.0, 1.0)
        if self.confidence >= 1:
            raise ConfigError(f"--confidence must be below 1, got {self.confidence:g}")
        try:
            check_active(self.active, self.servers)
        except ConfigError as error:
            raise ConfigError(f"--active: {error}") from None
        if self.active < 2:
            raise ConfigError(
                "--active must be at least 2: with k = 1 every client shares the one server, "
                "and no report can tell the insider apart"
            )

    @property
    def insider_host(self) -> str:
        return f"c{self.insider or self.clients}"

    def bound_s(self) -> float:
        """An upper bound on the run after the baseline (epochs last at most two ticks)."""
        epochs = self.max_attack_epochs + self.lease_epochs + 4 + self.after_epochs
        return epochs * 2 * self.tick_s + 60.0


class InsidersTopo(PoolTopo):
    """``PoolTopo`` whose outsiders (the attacker's bots) have unshaped links."""

    def build(self) -> None:
        lan = self.add_switch(self.SWITCH, subnet=self._subnet)
        for name in self.servers + self.clients:
            self.add_link(self.add_host(name), lan, self.params)
        for name in self.outsiders:
            self.add_link(self.add_host(name), lan, None)


@dataclass
class EpochRank:
    """The operator's ranking after one epoch of the attack."""

    epoch: int
    ended: float
    first: str  # the client ranked first
    insider_place: int  # 1: first
    insider_score: float
    insider_confidence: float
    strictly_first: bool  # the insider's score is above every other client's
    flagged: list[str]  # clients at or above the confidence


@dataclass
class InsidersResult:
    options: InsidersOptions
    insider: str
    clients: list[str]
    attack_epoch: int  # the first epoch flooded
    attack_start: float
    ranks: list[EpochRank]
    first_epoch: int | None  # ranked first (strictly) after this epoch
    confident_epoch: int | None  # first at the confidence after this epoch
    revoked: list[str]  # what the policy revoked
    revoked_at: float | None
    revoked_epoch: int | None
    dark_at: float | None  # the attacker's leaked keys ran out
    end: float
    requests: dict[str, list[dict[str, Any]]]  # host -> requests, each with epoch, phase, shared
    attacker: list[dict[str, Any]]
    attacked_after_revocation: int  # (epoch, server) reports over a threshold, once dark
    policy_output: str = ""
    problems: list[str] = field(default_factory=list)
    insider_shim_exited: bool = False
    lab: dict[str, Any] = field(default_factory=dict)  # id, namespaces, workdir (all removed)

    def epochs_to(self, epoch: int | None) -> int | None:
        return None if epoch is None else epoch - self.attack_epoch + 1

    def phase_of(self, when: float) -> str:
        if when < self.attack_start:
            return "baseline"
        if self.revoked_at is None or when < self.revoked_at:
            return "attack"
        if self.dark_at is None or when < self.dark_at:
            return "leftover"
        return "after"

    def summary(self) -> dict[str, Any]:
        """Response times per phase and group, and the insider's service per phase."""
        groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for host, requests in self.requests.items():
            for request in requests:
                if host == self.insider:
                    group = "insider"
                else:
                    group = "shared" if request["shared"] else "other"
                groups.setdefault(request["phase"], {}).setdefault(group, []).append(request)
        table: dict[str, dict[str, Any]] = {}
        for phase in PHASES:
            for group in ("other", "shared", "insider"):
                found = groups.get(phase, {}).get(group, [])
                if not found:
                    continue
                times = sorted(r["s"] for r in found if r["ok"])
                table.setdefault(phase, {})[group] = {
                    "requests": len(found),
                    "served": len(times),
                    "served_fraction": round(len(times) / len(found), 4),
                    "mean_ms": round(1000 * statistics.fmean(times), 1) if times else None,
                    "median_ms": round(1000 * statistics.median(times), 1) if times else None,
                    "p90_ms": round(1000 * times[int(0.9 * (len(times) - 1))], 1)
                    if times
                    else None,
                }
        sent = dict.fromkeys(PHASES, 0)
        for line in self.attacker:
            if "epoch" in line:
                sent[self.phase_of(float(line["start"]))] += int(line["sent"])
        return {"response": table, "attack_packets": sent}

    def as_json(self) -> dict[str, Any]:
        options = {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in self.options.__dict__.items()
        }
        return {
            "options": options,
            "insider": self.insider,
            "clients": self.clients,
            "attack_epoch": self.attack_epoch,
            "attack_start": self.attack_start,
            "epochs_to_first": self.epochs_to(self.first_epoch),
            "epochs_to_confidence": self.epochs_to(self.confident_epoch),
            "first_epoch": self.first_epoch,
            "confident_epoch": self.confident_epoch,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
            "revoked_epoch": self.revoked_epoch,
            "epochs_to_revocation": self.epochs_to(self.revoked_epoch),
            "seconds_to_revocation": None
            if self.revoked_at is None
            else round(self.revoked_at - self.attack_start, 2),
            "dark_at": self.dark_at,
            "attacked_after_revocation": self.attacked_after_revocation,
            "end": self.end,
            "summary": self.summary(),
            "ranks": [rank.__dict__ for rank in self.ranks],
            "attacker": self.attacker,
            "requests": self.requests,
            "policy_output": self.policy_output,
            "problems": self.problems,
            "insider_shim_exited": self.insider_shim_exited,
            "lab": self.lab,
        }


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]


class InsidersRun:
    """The lab's deployment, agents and operator; ``run`` does the experiment."""

    def __init__(self, lab: Lab, options: InsidersOptions, say: Callable[[str], None]) -> None:
        self.lab = lab
        self.options = options
        self.say = say
        self.roaming = RoamingLab(
            lab,
            tick=options.tick_s,
            m=1,
            active=options.active,
            migration="reconnect",
            service="http",
            content={"small": SMALL},
            server_dirs=True,
            start_delay=3.0,
            # Keys a few epochs ahead, extended online: after a revocation, what the insider
            # holds (and leaked) runs out within the lease.
            subscribe_options={
                "until-epoch": str(options.lease_epochs + 4),
                "lease-epochs": str(options.lease_epochs),
            },
        )
        self.agents: dict[str, tuple[subprocess.Popen[Any], Path]] = {}
        self.attacker: subprocess.Popen[Any] | None = None
        self.attacker_out = self.roaming.workdir / "attacker.jsonl"

    # -- pieces ----------------------------------------------------------------------------

    def schedule(self) -> ActiveSchedule:
        from migrate.kernel.deployment import DeploymentDir
        from migrate.schedule import EpochSchedule

        # The lab changes neither the threat level nor the anchor: the deployment's schedule.
        directory = DeploymentDir(self.roaming.deployment_dir)
        deployment = directory.deployment()
        chain = directory.secret().chain(deployment.chain_length)
        return ActiveSchedule(EpochSchedule(chain, deployment.schedule_params()), deployment.active)

    def gather_reports(self) -> None:
        """Copy the servers' report files (their complete lines) into the operator's
        directory, where ``roam suspects DIR`` reads them."""
        target = self.roaming.deployment_dir / "reports"
        target.mkdir(mode=0o700, exist_ok=True)
        for host in self.roaming.server_hosts:
            for source in (self.roaming.server_dir(host) / "reports").glob("*.jsonl"):
                text = source.read_text(encoding="ascii")
                write_private(target / source.name, text[: text.rfind("\n") + 1])

    def start_agents(self, until: float) -> None:
        import hashlib

        digest = hashlib.sha256(SMALL).hexdigest()
        for host in self.roaming.client_hosts:
            out = self.roaming.workdir / f"requests-{host}.jsonl"
            argv = [
                sys.executable,
                "-c",
                CLIENT_AGENT,
                str(self.roaming.vip),
                str(until),
                str(self.options.request_gap_s),
                str(self.options.request_timeout_s),
                digest,
                str(out),
            ]
            process = self.lab[host].popen(argv, stdout=subprocess.DEVNULL)
            self.agents[host] = (process, out)

    def start_attacker(self, from_epoch: int, until: float) -> None:
        host = self.options.insider_host
        bundle = self.roaming.bundle_path(host)
        budget = int(self.options.flood_pps * (until - time.time())) + 1
        with open(self.roaming.workdir / "attacker.stderr", "wb") as stderr:
            self.attacker = self.lab["o1"].popen(
                [
                    sys.executable,
                    "-m",
                    "labs.experiments.insider_attack",
                    "--bundle",
                    str(bundle),
                    "--state",
                    f"{bundle}.state",
                    "--source",
                    str(self.lab["o1"].address),
                    "--pps",
                    str(self.options.flood_pps),
                    "--max-packets",
                    str(budget),
                    "--until",
                    str(until),
                    "--from-epoch",
                    str(from_epoch),
                    "--out",
                    str(self.attacker_out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=str(PROJECT_ROOT),
            )

    def attacker_failed(self) -> str | None:
        if self.attacker is None or self.attacker.poll() is None:
            return None
        if self.attacker.returncode == 0:
            return None
        text = (self.roaming.workdir / "attacker.stderr").read_text(errors="replace")
        tail = text.strip().splitlines()[-1:] or ["no output"]
        return f"the attacker exited with {self.attacker.returncode}: {tail[0]}"

    def stop_agents(self) -> None:
        processes = [process for process, _ in self.agents.values()]
        if self.attacker is not None:
            processes.append(self.attacker)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def rank_after(self, epoch: int, ended: float, insider: str) -> EpochRank:
        from migrate.kernel.reports import evaluate

        self.gather_reports()
        evaluation = evaluate(self.roaming.deployment_dir)
        suspects = evaluation.ranking.suspects
        names = evaluation.names
        place = next(i for i, s in enumerate(suspects, 1) if names[s.client] == insider)
        mine = suspects[place - 1]
        others = [s.score for s in suspects if names[s.client] != insider]
        return EpochRank(
            epoch=epoch,
            ended=round(ended, 6),
            first=names[suspects[0].client],
            insider_place=place,
            insider_score=round(mine.score, 4),
            insider_confidence=round(mine.confidence, 6),
            strictly_first=mine.score > max(others, default=0.0),
            flagged=[names[s.client] for s in suspects if s.above(self.options.confidence)],
        )

    # -- the experiment ----------------------------------------------------------------------

    def run(self) -> InsidersResult:
        options, roaming = self.options, self.roaming
        insider = options.insider_host
        self.say(
            f"starting {options.servers} servers (k = {options.active}), "
            f"{options.clients} clients (insider {insider}), the attacker's host"
        )
        roaming.start()
        roaming.wait_for_schedule(0.2)
        schedule = self.schedule()
        now = time.time()
        current = schedule.schedule.epoch_at(now).index
        attack_epoch = current + options.baseline_epochs
        attack_start = schedule.schedule.epoch(attack_epoch).start
        until = attack_start + options.bound_s()
        self.start_agents(until)
        self.start_attacker(attack_epoch, until)
        self.say(
            f"no attack until epoch {attack_epoch} ({attack_start - now:.1f} s); then the "
            f"insider's leaked schedule aims a flood of {options.flood_pps:g} SYN/s at its server"
        )

        ranks: list[EpochRank] = []
        first_epoch = confident_epoch = None
        epoch = attack_epoch
        while epoch < attack_epoch + options.max_attack_epochs:
            ended = schedule.schedule.epoch(epoch).end
            time.sleep(max(0.0, ended + REPORT_LAG_S - time.time()))
            problem = self.attacker_failed()
            if problem:
                raise LabError(problem)
            rank = self.rank_after(epoch, ended, insider)
            ranks.append(rank)
            if first_epoch is None and rank.strictly_first:
                first_epoch = epoch
            self.say(
                f"after epoch {epoch} (attack epoch {epoch - attack_epoch + 1}): first "
                f"{rank.first}, insider place {rank.insider_place}, confidence "
                f"{rank.insider_confidence:.4f}"
            )
            if rank.insider_place == 1 and rank.insider_confidence >= options.confidence:
                confident_epoch = epoch
                break
            epoch += 1

        revoked: list[str] = []
        revoked_at = revoked_epoch = None
        policy_output = ""
        if confident_epoch is not None:
            # The automatic policy, once, as an operator's timer would run it: on a lab host
            # that reaches the servers' control ports (not the insider's, not the attacker's).
            operator = next(h for h in roaming.client_hosts if h != insider)
            self.gather_reports()
            result = self.lab[operator].run(
                roam_argv(
                    "suspects",
                    str(roaming.deployment_dir),
                    "--revoke-above",
                    str(options.confidence),
                    "--json",
                ),
                timeout=60,
            )
            if result.returncode != 0:
                raise LabError(f"roam suspects --revoke-above failed: {result.stderr.strip()}")
            revoked = list(json.loads(result.stdout)["revoked"])
            revoked_at = time.time()
            revoked_epoch = schedule.schedule.epoch_at(revoked_at).index
            policy_output = result.stderr
            self.say(
                f"the policy revoked {', '.join(revoked) or 'nobody'} in epoch {revoked_epoch}"
            )

        dark_at = None
        if revoked_at is not None:
            # The leaked keys last at most the lease (and the epoch the revocation came in).
            deadline = time.time() + 2 * options.tick_s * (options.lease_epochs + 4) + 5
            while time.time() < deadline and dark_at is None:
                lines = [
                    line
                    for line in _complete_lines(self.attacker_out)
                    if "no_key" in line and line["no_key"] >= revoked_at
                ]
                if lines:
                    dark_at = float(lines[0]["no_key"])
                    self.say(f"the leaked keys ran out {dark_at - revoked_at:.1f} s later")
                else:
                    time.sleep(0.2)
            if dark_at is None:
                self.say("the attacker still computes the insider's server (keys not run out)")
        after_from = time.time()
        last = schedule.schedule.epoch_at(after_from).index + options.after_epochs
        self.say(f"measuring {options.after_epochs} more epochs")
        time.sleep(max(0.0, schedule.schedule.epoch(last).end - time.time()))
        end = time.time()
        self.stop_agents()
        self.gather_reports()
        attacked_after = 0
        if dark_at is not None:
            attacked_after = self.attacked_since(dark_at, schedule)
        requests = self.requests(schedule, insider, attack_start, revoked_at, dark_at)
        from labs.faults import shim_problems

        return InsidersResult(
            options=options,
            insider=insider,
            clients=list(roaming.client_hosts),
            attack_epoch=attack_epoch,
            attack_start=attack_start,
            ranks=ranks,
            first_epoch=first_epoch,
            confident_epoch=confident_epoch,
            revoked=revoked,
            revoked_at=revoked_at,
            revoked_epoch=revoked_epoch,
            dark_at=dark_at,
            end=end,
            requests=requests,
            attacker=_complete_lines(self.attacker_out),
            attacked_after_revocation=attacked_after,
            policy_output=policy_output,
            # The insider's shim stops once its keys run out: what the revocation is for.
            problems=[
                problem
                for problem in shim_problems(roaming)
                if not (problem.startswith(f"client {insider}:") and "last epoch held" in problem)
            ],
            insider_shim_exited=not roaming.clients[insider].running(),
        )

    def attacked_since(self, since: float, schedule: ActiveSchedule) -> int:
        """(epoch, server) reports over the default thresholds for epochs that began after
        ``since``: what the servers saw once the attacker knew nothing."""
        from migrate.suspects import Thresholds, parse_report

        names = {str(s): i for i, s in enumerate(schedule.servers)}
        thresholds = Thresholds()
        count = 0
        for path in (self.roaming.deployment_dir / "reports").glob("*.jsonl"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                report = parse_report(line, names, f"{path} line {number}")
                if schedule.schedule.epoch(report.epoch).start >= since and thresholds.attacked(
                    report
                ):
                    count += 1
        return count

    def requests(
        self,
        schedule: ActiveSchedule,
        insider: str,
        attack_start: float,
        revoked_at: float | None,
        dark_at: float | None,
    ) -> dict[str, list[dict[str, Any]]]:
        ids = {host: self.roaming.client_id(host) for host in self.roaming.client_hosts}
        found: dict[str, list[dict[str, Any]]] = {}
        for host, (_, path) in self.agents.items():
            rows = []
            for line in _complete_lines(path):
                at = float(line["at"])
                epoch = schedule.schedule.epoch_at(at).index
                mine = schedule.assigned(epoch, ids[host])
                theirs = schedule.assigned(epoch, ids[insider])
                if at < attack_start:
                    phase = "baseline"
                elif revoked_at is None or at < revoked_at:
                    phase = "attack"
                elif dark_at is None or at < dark_at:
                    phase = "leftover"
                else:
                    phase = "after"
                rows.append(
                    {
                        "at": round(at, 6),
                        "s": round(float(line["s"]), 6),
                        "ok": bool(line["ok"]),
                        "error": line["error"],
                        "epoch": epoch,
                        "server": str(mine),
                        "shared": mine == theirs,
                        "phase": phase,
                    }
                )
            found[host] = rows
        return found


def run_insiders(
    options: InsidersOptions, say: Callable[[str], None] = lambda line: None
) -> InsidersResult:
    if os.geteuid() != 0:
        raise ConfigError("roam lab insiders builds network namespaces: run it as root")
    topo = InsidersTopo(
        servers=options.servers,
        clients=options.clients,
        outsiders=1,
        params=LinkParams(rate_mbit=options.rate_mbit),
    )
    with Lab(topo) as lab:
        info = {"id": str(lab.id), "namespaces": lab.namespaces, "workdir": str(lab.workdir)}
        experiment = InsidersRun(lab, options, say)
        try:
            result = experiment.run()
        finally:
            experiment.stop_agents()
            experiment.roaming.stop()
        result.lab = info
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        write_private(
            options.out / "results.json", json.dumps(result.as_json(), indent=1) + "\n", PUBLIC_FILE
        )
    if options.plot is not None:
        plot_insiders(result, options.plot)
    return result


# --- output -------------------------------------------------------------------------------


def report_lines(result: InsidersResult) -> list[str]:
    """What ``roam lab insiders`` prints."""
    options = result.options
    summary = result.summary()
    lines = [
        f"N = {options.servers}, k = {options.active}, {options.clients} clients, insider "
        f"{result.insider}, epochs of {options.tick_s:g}-{2 * options.tick_s:g} s; attack from "
        f"epoch {result.attack_epoch} ({options.flood_pps:g} SYN/s at the insider's server, "
        f"links {options.rate_mbit:g} Mbit/s)",
        "",
        "legitimate clients' response times (ms), by phase and by whether the client shared "
        "the insider's server in that epoch:",
        f"  {'phase':<9} {'group':<8} {'requests':>8} {'served':>7} {'mean':>8} {'median':>8} "
        f"{'p90':>8}",
    ]
    for phase, groups in summary["response"].items():
        for group, row in groups.items():

            def ms(value: float | None) -> str:
                return "-" if value is None else f"{value:.0f}"

            lines.append(
                f"  {phase:<9} {group:<8} {row['requests']:>8} "
                f"{100 * row['served_fraction']:>6.1f}% {ms(row['mean_ms']):>8} "
                f"{ms(row['median_ms']):>8} {ms(row['p90_ms']):>8}"
            )
    lines.append("")
    first = result.epochs_to(result.first_epoch)
    confident = result.epochs_to(result.confident_epoch)
    lines.append(
        "insider ranked first (score above every other client) after "
        + (f"{first} attack epochs (epoch {result.first_epoch})" if first else "no epoch")
    )
    if confident is not None and result.revoked_at is not None:
        lines.append(
            f"insider first with confidence >= {options.confidence} after E = {confident} attack "
            f"epochs (epoch {result.confident_epoch}); the policy (roam suspects --revoke-above "
            f"{options.confidence}) revoked {', '.join(result.revoked) or 'nobody'} in attack "
            f"epoch {result.epochs_to(result.revoked_epoch)}, "
            f"{result.revoked_at - result.attack_start:.1f} s after the attack began"
        )
    else:
        lines.append(
            f"insider not at confidence {options.confidence} within {options.max_attack_epochs} "
            "attack epochs: nobody revoked"
        )
    flagged = sorted({name for rank in result.ranks for name in rank.flagged} - {result.insider})
    lines.append(f"innocent clients ever flagged: {', '.join(flagged) or 'none'}")
    packets = summary["attack_packets"]
    if result.dark_at is not None and result.revoked_at is not None:
        lines.append(
            "after the revocation: the leaked keys ran out "
            f"{result.dark_at - result.revoked_at:.1f} s later ({packets['leftover']} SYNs "
            "sent meanwhile); from then the attacker "
            f"computed no server ({packets['after']} SYNs), {result.attacked_after_revocation} "
            "server-epochs reported attacked"
        )
    insider_after = summary["response"].get("after", {}).get("insider")
    if insider_after:
        lines.append(
            f"the insider after its revocation: {insider_after['served']} of "
            f"{insider_after['requests']} requests served"
            + ("; its shim stopped when its keys ran out" if result.insider_shim_exited else "")
        )
    if result.problems:
        lines.append("shim problems: " + "; ".join(result.problems[:5]))
    return lines


def plot_insiders(result: InsidersResult, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    origin = result.attack_start
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for group, colour in (("other", "tab:blue"), ("shared", "tab:red"), ("insider", "black")):
        points = [
            (r["at"] - origin, 1000 * r["s"] if r["ok"] else None)
            for host, rows in result.requests.items()
            for r in rows
            if (host == result.insider) == (group == "insider")
            and (group == "insider" or r["shared"] == (group == "shared"))
        ]
        served = [(x, y) for x, y in points if y is not None]
        failed = [x for x, y in points if y is None]
        label = {
            "other": "clients on other servers",
            "shared": "clients sharing the insider's server",
            "insider": "the insider",
        }[group]
        if served:
            top.scatter(*zip(*served, strict=True), s=6, color=colour, label=label)
        if failed:
            top.scatter(failed, [1] * len(failed), s=14, marker="x", color=colour)
    top.set_yscale("log")
    top.set_ylabel("response time (ms); x: failed")
    top.legend(loc="upper left", fontsize=8)
    xs = [rank.ended - origin for rank in result.ranks]
    bottom.plot(xs, [rank.insider_confidence for rank in result.ranks], marker="o", label="insider")
    bottom.axhline(result.options.confidence, color="grey", linestyle="--", label="policy")
    bottom.set_ylabel("confidence (roam suspects)")
    bottom.set_xlabel("seconds since the attack began")
    bottom.legend(loc="lower right", fontsize=8)
    for axis in (top, bottom):
        axis.axvline(0, color="tab:red", linewidth=0.8)
        if result.revoked_at is not None:
            axis.axvline(result.revoked_at - origin, color="tab:green", linewidth=0.8)
        if result.dark_at is not None:
            axis.axvline(result.dark_at - origin, color="tab:purple", linewidth=0.8)
    top.set_title(
        f"Insider isolation: N = {result.options.servers}, k = {result.options.active}, "
        f"{result.options.clients} clients (red: attack, green: revoked, purple: keys ran out)"
    )
    figure.tight_layout()
    figure.savefig(directory / "insiders.png", dpi=120)
    plt.close(figure)
