"""The server shim daemon: ``roam server --deployment DIR --listen IP:PORT --service HOST:PORT``.

Theory of operation: one shim runs in front of each replica of the unmodified service. It
computes the schedule from ``K_n`` like every other server and keeps four things in step with
it:

* the firewall gate (``proxy.rules``): open during this server's windows, closed otherwise;
  re-evaluated exactly at the window edges and epoch boundaries (``migrate.gating``);
* the relay (``proxy.relay``): owns the client-facing socket and splices bytes to the service,
  connecting from the client's own address so the service sees it;
* roaming updates (``migrate.updates``): sent periodically, with jitter, to every legitimate
  client's roaming port, by every server of the pool (so an observer cannot tell the active
  server by who sends them);
* group control (``migrate.control``): threat changes, reactive triggers and revocations from
  the operator or another server, validated, applied, acknowledged and persisted; and
  anti-entropy (``migrate.antientropy``): once per sync period, this server's revocations and
  strikes to every other server, and theirs merged here, so that a lost Revoke or a server
  that was down catches up.

Rate contracts are enforced by the gate (``limit rate over``, counted per client). The shim
reads the counters; a client that went over gets a strike and is blocked until the service
roams, and a second offence in a later epoch revokes it across the pool.

Everything created in the kernel is recorded in an instance record first and removed on exit,
on SIGTERM/SIGINT, and by ``roam cleanup`` after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrate.activeset import ActiveSchedule
from migrate.admission import MAX_PENDING_PER_CLIENT
from migrate.antientropy import SYNC_PERIOD_S
from migrate.channel import HEADER_BYTES, CounterFloor, Sealer
from migrate.checkpoint import MIGRATION_MODES, RANGE_BODIES, STREAM_HASHES
from migrate.codec import CODEC_CHOICES
from migrate.control import (
    OPERATOR,
    Ack,
    ControlChannel,
    Facts,
    Revoke,
    StateQuery,
    StateReport,
    Strike,
    Threat,
    Trigger,
)
from migrate.endpoints import Endpoint
from migrate.errors import ConfigError, ReplayedMessageError, RoamError
from migrate.gating import SCAN_LIMIT, GateState, gate_at, next_switch
from migrate.kernel import nft
from migrate.kernel.deployment import DeploymentDir
from migrate.kernel.eventlog import DaemonFiles, EventLog
from migrate.kernel.files import private_directory
from migrate.kernel.instances import Instance, sweep_dead
from migrate.kernel.metrics import MetricsServer, registry_of, server_families
from migrate.kernel.routing import TransparentReturnPath
from migrate.kernel.udp import bind_exclusive, datagram_socket
from migrate.pool import PoolState, ServerPool
from migrate.registration import ClientRecord
from migrate.replaystream import DEFAULT_MAX_REPLAY
from migrate.schedule import Epoch
from migrate.suspects import AttackReport, format_report
from migrate.updates import seal_update, update_sealer
from proxy import relay
from proxy.live import LiveMode
from proxy.live_relays import LIVE_RELAYS
from proxy.livecontext import LiveContext
from proxy.modes import MigrationMode, ReconnectMode
from proxy.rules import (
    GATE_DROPPED_COUNTER,
    SYN_COUNTER,
    Contract,
    GatePlan,
    contract_update_script,
    family_of,
    gate_table_body,
    gate_update_script,
)
from proxy.transparent import connect_plain, connect_transparent

Clock = Callable[[], float]
DEFAULT_CONTROL_PORT = 47475
DEFAULT_UPDATE_PERIOD = 2.0
CONTRACT_POLL_S = 0.5
STATUS_SOON_S = 0.2  # a status change between gate changes is written this soon (at most)


@dataclass(frozen=True)
class ServerOptions:
    deployment_dir: Path
    listen: Endpoint
    service: Endpoint
    migration: str = "reconnect"
    allow_any_source: bool = False
    capture_dropped: Path | None = None
    transparent: bool = True
    update_period: float = DEFAULT_UPDATE_PERIOD
    control_port: int = DEFAULT_CONTROL_PORT
    sync_period: float = SYNC_PERIOD_S
    state_path: Path | None = None
    status_path: Path | None = None
    codec: str = "auto"
    stream_hash: str = "sha256"  # the running hash of new connections (STREAM_HASHES)
    live_relay: str = "copy"  # how live connections are forwarded (proxy.live_relays)
    range_bodies: str = "hash"  # what checkpoints commit to of Range-capable bodies (RANGE_BODIES)
    checkpoint_period: float = 0.5
    migration_port: int = 47476
    max_pending_per_client: int = MAX_PENDING_PER_CLIENT
    max_replay: int = DEFAULT_MAX_REPLAY  # replay bytes per connection (migrate.replaystream)
    metrics: Endpoint | None = None  # serve Prometheus metrics at http://HOST:PORT/metrics


def check_choices(options: ServerOptions) -> None:
    """The command line offers only these values; a program building ``ServerOptions`` itself
    learns of a bad one here, by name, before anything is set up (a relay mode the pusher does
    not know would otherwise be taken for zero-copy)."""
    for name, value, choices in (
        ("migration", options.migration, MIGRATION_MODES),
        ("codec", options.codec, CODEC_CHOICES),
        ("stream_hash", options.stream_hash, STREAM_HASHES),
        ("live_relay", options.live_relay, LIVE_RELAYS),
        ("range_bodies", options.range_bodies, RANGE_BODIES),
    ):
        if value not in choices:
            raise ConfigError(f"{name} {value!r} is not one of: {', '.join(choices)}")


def default_state_path(directory: Path, index: int) -> Path:
    return directory / "state" / f"server-{index}.json"


def attack_reports_path(directory: Path, index: int) -> Path:
    """Where a server of a k-of-N deployment appends its per-epoch attack summaries (JSON
    lines, docs/protocol.md section 10), and where ``roam suspects DIR`` reads them."""
    return directory / "reports" / f"attacks-{index}.jsonl"


class ServerShim:
    def __init__(self, options: ServerOptions, log: EventLog, clock: Clock = time.time) -> None:
        check_choices(options)
        self.options = options
        # Where the relay connects, as ``connect`` takes it: formatted once, not per connection.
        self._service = (str(options.service.address), options.service.port)
        self.log = log
        self.clock = clock
        self._status_pending = False
        self._leaving_key: tuple[object, ...] | None = None
        self._leaving: float | None = None
        # k of N (PROTOCOL.md section 4): client id -> (schedule key, when it leaves here).
        self._client_leaving: dict[int, tuple[tuple[object, ...], float | None]] = {}
        directory = DeploymentDir(options.deployment_dir)
        self.deployment = directory.deployment()
        # With the sealed chain index (roam init), the schedule starts within 3 x 2^16 hashes.
        secret = directory.secret_with_index()
        self.secret = secret
        clients = directory.clients(secret)
        if options.listen not in self.deployment.servers:
            raise ConfigError(
                f"--listen {options.listen} is not in the deployment's server list "
                f"({', '.join(map(str, self.deployment.servers))})"
            )
        index = self.deployment.servers.index(options.listen)
        self.state_path = options.state_path or default_state_path(options.deployment_dir, index)
        self.files = DaemonFiles(self.state_path, options.status_path)
        state = None
        if self.state_path.exists():
            state = PoolState.decode(self.state_path.read_bytes())
        self.pool = ServerPool(self.deployment, secret, clients, options.listen, state)
        # Every sealer of this server starts above the floor its last run persisted and keeps
        # it ahead: no nonce is used twice under a key, even if the clock went back.
        self.counter_floor = CounterFloor(self.pool.state.counter_floor, self._save_counter_floor)
        self.control = ControlChannel(secret.group_key, self.deployment.deployment_id, index)
        self.control.sealer.keep_counters(self.counter_floor)
        self.sealers: dict[int, Sealer] = {
            client.client_id: update_sealer(
                client.channel_key, self.deployment.deployment_id, client.client_id, index
            ).keep_counters(self.counter_floor)
            for client in clients.clients
        }
        self.table = nft.instance_table_name("srv", os.getpid())
        self.family = family_of(options.listen)
        self.nflog_group = (os.getpid() % 60000) + 1 if options.capture_dropped else None
        self.instance: Instance | None = None
        self.relay_server: relay.RelayServer | None = None
        self.mode: MigrationMode | None = None
        self.gate: GateState | None = None
        self.plan: GatePlan | None = None
        # k of N: how many servers are active per epoch, and the clients this one admits now
        # (assigned to it in an epoch whose window is open); with k = 1, every legitimate one.
        self.k = self.deployment.active
        self.admitted: frozenset[int] = frozenset()
        # Attack reports (k > 1): the gate's counters at the running epoch's start, and the
        # contract violations seen per epoch.
        self.reports_path = attack_reports_path(options.deployment_dir, index)
        self._report_mark: tuple[int, int, int] | None = None  # (epoch, dropped, syns)
        self._violations: Counter[int] = Counter()
        self._report_tasks: set[asyncio.Task[None]] = set()
        self.epoch: int | None = None
        self.counters: dict[str, int] = {}
        self.updates_sent = 0
        self.control_rejected = 0  # group-control datagrams refused (logged bounded)
        # Group-control datagrams by "kind/verdict" (bounded: message classes x verdicts).
        self.control_messages: Counter[str] = Counter()
        self.gate_dropped: int | None = None  # read from the gate's counter at each scrape
        self.metrics: MetricsServer | None = None
        self._metrics_failure: str | None = None
        self.update_failures: dict[int, str] = {}  # client id -> kind of the last failure
        self._timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._control_transport: asyncio.DatagramTransport | None = None
        self._update_socket: socket.socket | None = None
        # Header of an applied message -> our answer and where it went: a replay is answered
        # there only (elsewhere, an attacker would reflect our answers at a victim).
        self._acks: dict[bytes, tuple[bytes, tuple[str, int]]] = {}
        self._sync_refused: dict[int, str] = {}  # server index -> last refusal logged

    # -- gate --------------------------------------------------------------------------------

    def _contracts(self) -> tuple[Contract, ...]:
        return tuple(
            Contract(client.client_id, client.address, client.rate_kbit)
            for client in self.pool.clients.clients
            if client.rate_kbit > 0
        )

    def _plan(self, gate: GateState) -> GatePlan:
        # Revoked and expired clients are left out; ``gate.epoch`` changes at each boundary and
        # the shim ticks there, so a client is dropped by every gate from the first epoch whose
        # key it does not hold.
        legitimate = self.pool.legitimate(gate.epoch)
        if self.k > 1:  # only the clients assigned to this server (PROTOCOL.md section 4)
            legitimate = [c for c in legitimate if c.client_id in self.admitted]
        blocked_ids = self.pool.blocked(gate.epoch)
        return GatePlan(
            listen=self.options.listen,
            open=gate.open,
            allowed=tuple(sorted({c.address for c in legitimate}, key=str)),
            allow_any_source=self.options.allow_any_source,
            blocked=tuple(
                sorted(
                    {c.address for c in self.pool.clients.clients if c.client_id in blocked_ids},
                    key=str,
                )
            ),
            contracts=self._contracts(),
            nflog_group=self.nflog_group,
            count_syns=self.k > 1,
        )

    def active_schedule(self) -> ActiveSchedule:
        """The running schedule with the deployment's k (cheap: a view, rebuilt at each use,
        since a roaming update or trigger may replace the pool's schedule)."""
        return ActiveSchedule(self.pool.schedule, self.k)

    def _gate_at(self, now: float) -> GateState:
        if self.k == 1:
            return gate_at(self.pool.schedule, self.options.listen, now)
        return GateState(*self.active_schedule().gate_at(self.options.listen, now))

    def _admit_now(self, now: float) -> frozenset[int]:
        """k of N: the clients this server admits at ``now``; sets ``self.admitted`` and
        returns the ones it admitted before and no longer does (their server is another)."""
        if self.k == 1:
            return frozenset()
        ids = [client.client_id for client in self.pool.clients.clients]
        admitted = self.active_schedule().admitted(self.options.listen, ids, now)
        gone = self.admitted - admitted
        self.admitted = admitted
        return gone

    def _install_gate(self) -> None:
        assert self.instance is not None
        now = self.clock()
        gate = self._gate_at(now)
        self._admit_now(now)
        plan = self._plan(gate)
        self.instance.add_table(self.family, self.table, gate_table_body(plan))
        self.gate, self.plan = gate, plan
        self.log.event("gate", open=gate.open, epoch=gate.epoch, active=gate.active)

    def _tick(self) -> None:
        # The counts of rejected datagrams of a period that has ended (bounded logging).
        self.log.flush_rejections()
        try:
            now = self.clock()
            gate = self._gate_at(now)
            gone = self._admit_now(now)
            current = self.pool.schedule.epoch(gate.epoch)
            if current.start <= now and current.index != self.epoch:
                self.epoch = current.index
                if self.k == 1:
                    self.log.event(
                        "epoch",
                        epoch=current.index,
                        server=str(current.server),
                        active=current.server == self.options.listen,
                        start=round(current.start, 6),
                        length=current.length,
                    )
                else:
                    self._log_set_epoch(current.index, current.start, current.length)
                    self._start_report(current.index)
            plan = self._plan(gate)
            if plan != self.plan:
                nft.apply(gate_update_script(self.table, plan))
                was_open = self.plan.open if self.plan else None
                self.plan = plan
                if plan.open != was_open:
                    self.log.event("gate", open=plan.open, epoch=gate.epoch, active=gate.active)
                    if not plan.open:
                        self._leave()
            if gone and plan.open:
                self._leave_clients(gone)
            self.gate = gate
            self._write_status()
            self._arm(min(gate.until, current.end if current.start <= now else current.start))
        except RoamError as error:
            self._fail(error)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, when - self.clock()) + 0.0005
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    @property
    def gate_open(self) -> bool:
        """Whether the gate lets the clients in now (before it is installed, nobody comes).

        A gate due to open counts as open: its window has opened and the tick that opens it
        has not run yet. A busy loop runs a datagram that came meanwhile before the timer (a
        COMMIT from a client whose clock is ahead, a few ms after the window opened), and
        that hand-over would fail for the tick's lateness alone. A gate due to close stays
        open until the tick closes it and leaves its connections
        (``MigrationPort.start_behind_closed_gate`` relies on it)."""
        if self.plan is None or self.plan.open:
            return True
        now = self.clock()
        if self.gate is None or now < self.gate.until:
            return False
        try:
            return self._gate_at(now).open
        except RoamError:
            return False  # the tick reports it

    def leaving_at(self) -> float | None:
        """When the service leaves this server, if it is the active one now.

        Asked every 20 ms by the checkpoint loop; the answer only changes with the epoch or
        the schedule, and finding it may scan thousands of epochs (a deployment where the
        service rarely or never moves, e.g. one server), so it is kept until then."""
        now = self.clock()
        schedule = self.pool.schedule
        found = self._epoch_key(now)
        if found is None:
            return None
        current, epoch_key = found
        key = (*epoch_key, current.server)
        if key == self._leaving_key:
            return self._leaving
        leaving: float | None = None
        if self.k > 1:
            leaving = self._set_leaving(current.index)
        elif current.server == self.options.listen:
            try:
                leaving = next_switch(schedule, now)[1]
            except RoamError:
                leaving = None
        self._leaving_key, self._leaving = key, leaving
        return leaving

    def _start_report(self, epoch: int) -> None:
        """At the start of ``epoch``: the summary of the epoch before it (off the loop: nft
        runs as a subprocess)."""
        task = asyncio.get_running_loop().create_task(self._report_attacks(epoch))
        self._report_tasks.add(task)
        task.add_done_callback(self._report_tasks.discard)

    async def _report_attacks(self, epoch: int) -> None:
        try:
            values = await asyncio.to_thread(nft.counters, self.family, self.table)
        except RoamError as error:
            self.log.event("attack_report_failed", level="warning", reason=str(error))
            self._report_mark = None  # that epoch's counts are lost, not misattributed
            return
        dropped = values.get(GATE_DROPPED_COUNTER, (0, 0))[0]
        syns = values.get(SYN_COUNTER, (0, 0))[0]
        mark, self._report_mark = self._report_mark, (epoch, dropped, syns)
        if mark is None or mark[0] >= epoch:
            return
        previous, dropped_before, syns_before = mark
        line = self.attack_report_line(
            previous,
            dropped - dropped_before,
            syns - syns_before,
            self._violations.pop(previous, 0),
        )
        if line is None:
            return
        try:
            self.reports_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.reports_path.open("a", encoding="ascii") as stream:
                stream.write(line + "\n")
        except OSError as error:
            self.log.event(
                "attack_report_failed",
                level="warning",
                path=str(self.reports_path),
                reason=error.strerror,
            )

    def attack_report_line(
        self, epoch: int, dropped: int, syns: int, violations: int
    ) -> str | None:
        """``epoch``'s summary as ``roam suspects`` reads it, if this server was in the
        epoch's active set (the counts of an epoch it was not active in say nothing about
        the clients assigned to it)."""
        me = self.deployment.servers.index(self.options.listen)
        if me not in self.active_schedule().indices(epoch):
            return None
        report = AttackReport(epoch, me, max(0, dropped), max(0, syns), violations)
        return format_report(report, str(self.options.listen))

    def _log_set_epoch(self, index: int, start: float, length: float) -> None:
        """k of N: the epoch's active set and the clients assigned to this server in it."""
        active = self.active_schedule()
        assignment = active.assignment(index)
        me = self.deployment.servers.index(self.options.listen)
        clients = self.pool.clients.clients
        self.log.event(
            "epoch",
            epoch=index,
            server=str(self.deployment.servers[assignment.active[0]]),
            active=me in assignment.active,
            set=[str(self.deployment.servers[i]) for i in assignment.active],
            assigned=sorted(c.name for c in clients if assignment.server_of(c.client_id) == me),
            start=round(start, 6),
            length=length,
        )

    def _leave_clients(self, client_ids: frozenset[int]) -> None:
        """k of N: these clients' server is another now, this one stays open: their
        connections moved on (live) or are dropped (reconnect); the others stay."""
        if self.mode is None:
            return
        addresses = {str(c.address) for c in self.pool.clients.clients if c.client_id in client_ids}
        if isinstance(self.mode, LiveMode):
            ended = self.mode.pusher.leave_clients(addresses)
        else:
            assert isinstance(self.mode, ReconnectMode)
            ended = self.mode.leave_clients(addresses)
        if ended:
            self.log.event(self.mode.leave_event, count=ended, clients=sorted(client_ids))

    def _set_leaving(self, current: int) -> float | None:
        """k of N: when this server leaves the active set, if it is a member now."""
        active = self.active_schedule()
        me = self.deployment.servers.index(self.options.listen)
        held = self.pool.schedule.chain.held_index
        if me not in active.indices(current):
            return None
        for index in range(current + 1, min(held, current + SCAN_LIMIT) + 1):
            if me not in active.indices(index):
                return self.pool.schedule.start_of(index)
        return None

    def _epoch_key(self, now: float) -> tuple[Epoch, tuple[object, ...]] | None:
        """The epoch at ``now`` and what a cached answer about it depends on (the schedule
        object, its parameters and anchor, the chain's held key, the epoch); None before the
        schedule's start."""
        schedule = self.pool.schedule
        try:
            current = schedule.epoch_at(now)
        except RoamError:
            return None
        key = (
            id(schedule),
            schedule.params,
            schedule.anchor,
            schedule.chain.held_index,
            current.index,
        )
        return current, key

    def client_leaving_at(self, client_id: int) -> float | None:
        """k of N: when client ``client_id``'s connections leave this server (its server
        changes), if this is its server now; kept until the epoch or the schedule changes
        (asked every 20 ms per connection by the checkpoint loop)."""
        now = self.clock()
        found = self._epoch_key(now)
        if found is None:
            return None
        key = found[1]
        cached = self._client_leaving.get(client_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            leaving = self.active_schedule().client_leaving(self.options.listen, client_id, now)
        except RoamError:
            leaving = None
        if len(self._client_leaving) > 4 * len(self.pool.clients.clients) + 64:
            self._client_leaving.clear()
        self._client_leaving[client_id] = (key, leaving)
        return leaving

    def _leave(self) -> None:
        """The gate closed behind the service. Live mode: the connections moved on, close them
        without a word. Reconnect mode (the paper's prototype): drop them."""
        if self.mode is not None:
            ended = self.mode.leave()
            if ended:
                self.log.event(self.mode.leave_event, count=ended)

    def _fail(self, error: BaseException) -> None:
        self.log.event("fatal", level="error", reason=str(error))
        self._failure = error
        self._stop.set()

    # -- rate contracts ----------------------------------------------------------------------

    async def _watch_contracts(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(CONTRACT_POLL_S)
            # Asked each time: a reload (SIGHUP) may bring clients with contracts.
            contracts = {c.counter: c for c in self._contracts()}
            if not contracts:
                continue
            try:
                values = await asyncio.to_thread(nft.counters, self.family, self.table)
            except RoamError as error:
                self.log.event("contract_read_failed", level="warning", reason=str(error))
                continue
            for name, (packets, _bytes) in values.items():
                contract = contracts.get(name)
                if contract is None or packets <= self.counters.get(name, 0):
                    continue
                self.counters[name] = packets
                self._offence(contract)

    def _offence(self, contract: Contract) -> None:
        epoch = self.epoch or 0
        if self.k > 1 and len(self._violations) < 64:
            self._violations[epoch] += 1  # for the epoch's attack report
        verdict = self.pool.report_offence(contract.client_id, epoch)
        self.log.event(
            "contract_exceeded",
            level="warning",
            client_id=contract.client_id,
            address=str(contract.address),
            epoch=epoch,
            verdict=verdict,
        )
        # The other servers learn of the strike (the next offence anywhere is the client's
        # second) and of a revocation from this server's next control state (``_send_facts``):
        # one message of one size to every peer every sync period, from every server alike. A
        # Strike or Revoke sent now, by this server alone, would tell an eavesdropper that it
        # is the active one (issue 12, finding 4).
        if verdict == "revoke":
            self._apply_control(Revoke(contract.client_id), origin="rate contract")
        self._tick()

    # -- roaming updates ---------------------------------------------------------------------

    def _send_updates(self) -> None:
        sock = self._update_socket
        assert sock is not None
        now = self.clock()
        for client in self.pool.clients.clients:
            record: ClientRecord = self.pool.record(client)
            try:
                update = self.pool.update_for(record, now)
            except RoamError as error:
                # Logged once per client and kind of reason, not every period.
                kind = type(error).__name__
                if self.update_failures.get(client.client_id) != kind:
                    self.update_failures[client.client_id] = kind
                    self.log.event(
                        "update_skipped", client=client.name, error=kind, reason=str(error)
                    )
                continue
            self.update_failures.pop(client.client_id, None)
            message = seal_update(self.sealers[client.client_id], update, now)
            try:
                sock.sendto(message, (str(client.address), client.roaming_port))
                self.updates_sent += 1
            except OSError as error:
                self.log.event(
                    "update_send_failed", level="warning", client=client.name, reason=error.strerror
                )

    async def _update_loop(self) -> None:
        period = self.options.update_period
        while not self._stop.is_set():
            self._send_updates()
            # Jitter, so that updates do not line up with boundaries or across servers.
            await asyncio.sleep(period * random.uniform(0.8, 1.2))

    # -- group control -----------------------------------------------------------------------

    def _apply_control(self, message: Threat | Trigger | Revoke | Strike, origin: str) -> bool:
        now = self.clock()
        try:
            description = self.pool.apply(message, now)
        except RoamError as error:
            self.log.event(
                "control_rejected",
                level="warning",
                origin=origin,
                message=type(message).__name__,
                reason=str(error),
            )
            return False
        self._persist()
        self.log.event(
            "control_applied", origin=origin, message=type(message).__name__, detail=description
        )
        if isinstance(message, Trigger):
            self._send_updates()  # a reactive roam is visible anyway: tell clients at once
        self._tick()
        return True

    def _reject(self, origin: str, error: RoamError) -> None:
        # Anyone can send these: bounded logging (migrate.ratelog), never one line per datagram.
        self.control_rejected += 1
        self.log.rejection(
            "control_rejected",
            origin=origin,
            error=type(error).__name__,
            reason=str(error),
        )

    def _registered(self, sender: int, source: tuple[str, int]) -> bool:
        """A server's messages come from its registered address; the operator's from anywhere
        (it has no registered address; it holds the group key like the servers)."""
        if sender == OPERATOR:
            return True
        servers = self.deployment.servers
        return sender < len(servers) and str(servers[sender].address) == source[0]

    def on_control(self, data: bytes, source: tuple[str, int]) -> None:
        origin = f"{source[0]}:{source[1]}"
        try:
            opened, message = self.control.open(data, self.clock())
        except ReplayedMessageError as error:
            # A retransmission whose answer was lost: answer again, apply nothing; and only to
            # the address the first answer went to.
            cached = self._acks.get(data[:HEADER_BYTES])
            if cached is not None and cached[1] == source and self._control_transport:
                self.control_messages["unopened/repeated"] += 1
                self._control_transport.sendto(cached[0], source)
                return
            self.control_messages["unopened/rejected"] += 1
            self._reject(origin, error)
            return
        except RoamError as error:
            self.control_messages["unopened/rejected"] += 1
            self._reject(origin, error)
            return
        sender = opened.header.sender
        kind = type(message).__name__.lower()
        if not self._registered(sender, source) or sender == self.pool.index:
            self.control_messages[f"{kind}/rejected"] += 1
            self.control_rejected += 1
            self.log.rejection(
                "control_rejected",
                origin=origin,
                error="UnregisteredSource",
                reason=f"sender {sender} is not at its registered address",
            )
            return
        self.control.accept(opened)
        if isinstance(message, Ack | StateReport):
            self.control_messages[f"{kind}/taken"] += 1
            return
        if isinstance(message, Facts):
            merged = self._merge(sender, message, origin)
            self.control_messages[f"{kind}/{'merged' if merged else 'rejected'}"] += 1
            return
        if isinstance(message, StateQuery):
            # ``roam resync``: the operator lost its record of threat changes and triggers.
            self.control_messages[f"{kind}/answered"] += 1
            answer: Ack | StateReport = StateReport(
                opened.header.counter, self.pool.state.anchor, self.pool.schedule.params.m
            )
        else:
            applied = self._apply_control(message, origin)
            self.control_messages[f"{kind}/{'applied' if applied else 'refused'}"] += 1
            answer = Ack(opened.header.counter, applied)
        reply = self.control.seal(answer, self.clock())
        if len(self._acks) >= 64:
            self._acks.pop(next(iter(self._acks)))
        self._acks[data[:HEADER_BYTES]] = (reply, source)
        if self._control_transport is not None:
            self._control_transport.sendto(reply, source)

    # -- anti-entropy ------------------------------------------------------------------------

    def _merge(self, sender: int, facts: Facts, origin: str) -> bool:
        if sender == OPERATOR:
            self.control_rejected += 1
            self.log.rejection(
                "control_rejected",
                origin=origin,
                error="UnexpectedMessage",
                reason="control state comes from servers only",
            )
            return False
        applied, refused = self.pool.merge(facts, self.clock())
        if applied:
            self._persist()
            for detail in applied:
                self.log.event("control_synced", origin=origin, server=sender, detail=detail)
            self._tick()
        # A peer with a newer client list repeats its facts every period: log each new
        # refusal once, not every period.
        summary = "; ".join(refused)
        if refused and self._sync_refused.get(sender) != summary:
            self.log.event("control_sync_refused", level="warning", origin=origin, reason=summary)
        self._sync_refused[sender] = summary
        return True

    def _send_facts(self) -> None:
        """This server's revocations and strikes to every other server: one message of one
        size each, every period, whatever changed (so the traffic tells nobody anything)."""
        transport = self._control_transport
        if transport is None:
            return
        try:
            data = self.control.seal(self.pool.facts(), self.clock())
        except RoamError as error:
            self.log.event("sync_skipped", level="error", reason=str(error))
            return
        for server in self.deployment.servers:
            if server != self.options.listen:
                transport.sendto(data, (str(server.address), self.options.control_port))

    async def _sync_loop(self) -> None:
        period = self.options.sync_period
        while not self._stop.is_set():
            self._send_facts()
            await asyncio.sleep(period * random.uniform(0.8, 1.2))

    def _broadcast(self, message: Threat | Trigger | Revoke | Strike) -> None:
        if self._control_transport is None:
            return
        data = self.control.seal(message, self.clock())
        for server in self.deployment.servers:
            if server != self.options.listen:
                self._control_transport.sendto(
                    data, (str(server.address), self.options.control_port)
                )

    def _save_counter_floor(self, floor: int) -> None:
        self.pool.state.counter_floor = floor
        try:
            # On disk before a counter above the old floor is used: a restart starts above it.
            self._persist(wait=True)
        except OSError as error:
            # Sealing on without a persisted floor could reuse nonces after a restart: stop.
            failure = ConfigError(
                f"cannot write the server state {self.state_path}: {error.strerror}"
            )
            self._fail(failure)
            raise failure from None

    def _persist(self, *, wait: bool = False) -> None:
        self.files.save_state(self.pool.state.encode(), wait=wait)

    # -- reload (SIGHUP, ``roam reload``) ------------------------------------------------------

    def reload_clients(self) -> None:
        """Re-read ``clients.sealed``: clients subscribed (or revoked) since the start are let
        in (or out) at once. Only the gate's address sets, contracts and the update sealers
        change; established connections and the live mode's state are left as they are. A
        list that does not open, belongs to another deployment or is older than the one in
        use is refused, logged, and the running list kept."""
        path = self.options.deployment_dir / "clients.sealed"
        try:
            clients = DeploymentDir(self.options.deployment_dir).clients(self.secret)
        except (RoamError, OSError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            self.log.event("reload_failed", level="error", path=str(path), reason=reason)
            return
        old = self.pool.clients
        if clients.generation < old.generation:
            self.log.event(
                "reload_failed",
                level="error",
                path=str(path),
                reason=f"generation {clients.generation} is older than the running list's "
                f"{old.generation}",
            )
            return
        known = {c.client_id: c for c in old.clients}
        added = [c for c in clients.clients if c.client_id not in known]
        revoked = [
            c for c in clients.clients if c.revoked and not known.get(c.client_id, c).revoked
        ]
        for client in added:
            self.sealers[client.client_id] = update_sealer(
                client.channel_key,
                self.deployment.deployment_id,
                client.client_id,
                self.pool.index,
            ).keep_counters(self.counter_floor)
        contracts = self._contracts()
        self.pool.clients = clients
        if self.instance is not None and self.gate is not None and self._contracts() != contracts:
            try:
                nft.apply(contract_update_script(self.table, self._plan(self.gate)))
            except RoamError as error:
                self._fail(error)  # as for any gate the kernel refuses (``_tick``)
                return
        self.log.event(
            "clients_reloaded",
            generation=clients.generation,
            clients=len(clients.clients),
            added=[c.name for c in added],
            revoked=[c.name for c in revoked],
        )
        if self.instance is not None:
            self._tick()  # the gate's sets now, not at the next boundary

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "listen": str(self.options.listen),
            "service": str(self.options.service),
            "migration": self.options.migration,
            "epoch": self.epoch,
            "open": self.plan.open if self.plan else None,
            "active": self.gate.active if self.gate else None,
            # When the gate may next open or close, and (while active) when the service
            # leaves this server: for ``roam server status``.
            "gate_until": round(self.gate.until, 6) if self.gate else None,
            "leaves_at": self._leaves_at(),
            "connections": len(self.relay_server.relays) if self.relay_server else 0,
            "updates_sent": self.updates_sent,
            "control_rejected": self.control_rejected,
            "control_messages": dict(sorted(self.control_messages.items())),
            "relay_bytes": self._relay_bytes(),
            "gate_dropped": self.gate_dropped,
            "live": self.mode.status() if self.mode is not None else None,
            "revoked": sorted(self.pool.state.revoked),
            "clients": len(self.pool.clients.clients),
            "client_list_generation": self.pool.clients.generation,
            "table": self.table,
            "updated": round(self.clock(), 6),
        }

    def _relay_bytes(self) -> dict[str, int]:
        """Bytes relayed: by the connections this shim accepted (ended and live ones) and by
        the re-incarnated connections that live here now (an ended re-incarnated connection's
        bytes are not kept)."""
        if self.relay_server is None:
            return {"client_to_service": 0, "service_to_client": 0}
        stats = self.relay_server.snapshot()
        relays = set(self.relay_server.relays)
        if isinstance(self.mode, LiveMode):  # re-incarnated connections relay there
            relays.update(c.relay for c in self.mode.pusher.connections.values())
        return {
            "client_to_service": stats.bytes_client_to_service
            + sum(r.bytes_client_to_service for r in relays),
            "service_to_client": stats.bytes_service_to_client
            + sum(r.bytes_service_to_client for r in relays),
        }

    async def _read_gate_dropped(self) -> None:
        """Before a scrape: the gate's drop counter (pyroute2/nft off the event loop)."""
        if self.instance is None or self.plan is None:
            return
        try:
            values = await asyncio.to_thread(nft.counters, self.family, self.table)
        except RoamError as error:
            # Once per new reason, not at every scrape.
            if self._metrics_failure != str(error):
                self._metrics_failure = str(error)
                self.log.event("metrics_read_failed", level="warning", reason=str(error))
            return
        self._metrics_failure = None
        packets = values.get(GATE_DROPPED_COUNTER)
        if packets is not None:
            self.gate_dropped = packets[0]

    async def _start_metrics(self) -> None:
        endpoint = self.options.metrics
        if endpoint is None:
            return
        self.metrics = MetricsServer(
            registry_of(lambda: server_families(self.status())), self._read_gate_dropped
        )
        await self.metrics.start(str(endpoint.address), endpoint.port)
        self.log.event("metrics", listen=str(endpoint))

    def _leaves_at(self) -> float | None:
        leaving = self.leaving_at()
        return None if leaving is None else round(leaving, 6)

    def _write_status(self) -> None:
        if self.options.status_path is not None:
            self.files.show_status(self.status())

    def _status_soon(self) -> None:
        """Write the status within ``STATUS_SOON_S`` (once for a burst of changes), not only at
        the next gate change: a connection found unmigratable shows there at once."""
        if self._status_pending or self.options.status_path is None:
            return
        self._status_pending = True

        def write() -> None:
            self._status_pending = False
            self._write_status()

        asyncio.get_running_loop().call_later(STATUS_SOON_S, write)

    # -- relay -------------------------------------------------------------------------------

    async def connect_service(self, client_address: str) -> socket.socket:
        """A connection to the service, from ``client_address`` when transparent (both modes:
        the relay's new connections and live mode's re-incarnations)."""
        service = self._service
        if self.options.transparent:
            return await connect_transparent(service, client_address)
        return await connect_plain(service)

    async def _connect_service(self, client: socket.socket, peer: tuple[str, int]) -> socket.socket:
        return await self.connect_service(peer[0])

    def _migration_mode(self) -> MigrationMode:
        if self.options.migration != "live":
            return ReconnectMode(
                lambda: self.relay_server.relays if self.relay_server is not None else ()
            )
        options = self.options
        context = LiveContext(
            listen=(str(options.listen.address), options.listen.port),
            vport=self.deployment.service_port,
            deployment_id=self.deployment.deployment_id,
            sender=self.deployment.servers.index(options.listen),
            group_key=self.secret.group_key,
            chain_length=self.deployment.chain_length,
            pool=self.pool,
            log=self.log,
            counter_floor=self.counter_floor,
            clock=self.clock,
            epoch=lambda: self.epoch or 0,
            gate_open=lambda: self.gate_open,
            leaving_at=self.leaving_at,
            connect_service=self.connect_service,
            codec=options.codec,
            stream_hash=options.stream_hash,
            live_relay=options.live_relay,
            range_bodies=options.range_bodies,
            checkpoint_period=options.checkpoint_period,
            migration_port=options.migration_port,
            max_pending_per_client=options.max_pending_per_client,
            max_replay=options.max_replay,
            instance=self.instance,
            client_leaving_at=self.client_leaving_at if self.k > 1 else None,
            assigned=(lambda epoch, client: self.active_schedule().assigned(epoch, client))
            if self.k > 1
            else None,
        )
        return LiveMode(context)

    def _start_capture(self) -> None:
        directory = self.options.capture_dropped
        assert directory is not None
        assert self.instance is not None
        # 0700 when made here: what a server drops shows when it was inactive.
        private_directory(directory)
        pattern = (
            directory / f"dropped-{self.options.listen.address}-{self.options.listen.port}.pcap"
        )
        process = subprocess.Popen(
            [
                "tcpdump",
                "-q",
                "-n",
                "-i",
                f"nflog:{self.nflog_group}",
                "-w",
                str(pattern),
                "-C",
                "10",
                "-W",
                "10",
                "-U",
                # Stay root: with -C, tcpdump creates each next file after it would have
                # dropped to its own user, which may not write here.
                "-Z",
                "root",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.instance.add_child(process.pid)
        self.log.event("capture_started", path=str(pattern), nflog_group=self.nflog_group)

    # -- run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if self.options.listen.address.version == 6 else socket.AF_INET
        # The well-known UDP port first: if someone else holds it, refuse before anything of
        # ours exists (no table, no socket, no status file, one line on stderr).
        control_socket = datagram_socket(family)
        try:
            bind_exclusive(
                control_socket,
                (str(self.options.listen.address), self.options.control_port),
                "group control",
            )
        except RoamError:
            control_socket.close()
            raise
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_clients)
        # Startup sweep: leftovers of instances that died without cleaning up.
        for line in await asyncio.to_thread(sweep_dead):
            self.log.event("swept", detail=line)
        self.instance = Instance.start("server")
        tasks: list[asyncio.Task[None]] = []
        try:
            # pyroute2's netlink calls run their own event loop: keep them off ours.
            await asyncio.to_thread(self._install_gate)
            if self.options.transparent:
                path = TransparentReturnPath(
                    str(self.options.service.address), self.options.service.port
                )
                await asyncio.to_thread(path.setup, self.instance)
            if self.options.capture_dropped is not None:
                self._start_capture()
            listen = (str(self.options.listen.address), self.options.listen.port)
            self.mode = self._migration_mode()
            if isinstance(self.mode, LiveMode):
                self.mode.pusher.on_unmigratable = self._status_soon
            await self.mode.start()
            self.relay_server = await relay.serve(
                listen, self._connect_service, relay_factory=self.mode.relay_factory()
            )
            # Send-only: nothing reads it, so it takes the smallest receive buffer (with a large
            # one, anyone could park megabytes of kernel memory in it).
            self._update_socket = datagram_socket(family, receive_buffer=1)
            self._update_socket.bind((str(self.options.listen.address), 0))
            self._update_socket.setblocking(False)
            self._control_transport, _ = await loop.create_datagram_endpoint(
                lambda: _ControlProtocol(self), sock=control_socket
            )
            await self._start_metrics()
            self.log.event(
                "start",
                listen=str(self.options.listen),
                service=str(self.options.service),
                table=self.table,
                migration=self.options.migration,
                stream_hash=self.options.stream_hash,
                live_relay=self.options.live_relay,
                range_bodies=self.options.range_bodies,
                clients=len(self.pool.legitimate(self.gate.epoch if self.gate else 1)),
            )
            self._tick()
            tasks = [
                asyncio.create_task(self._update_loop()),
                asyncio.create_task(self._watch_contracts()),
                asyncio.create_task(self._sync_loop()),
            ]
            await self._stop.wait()
        finally:
            for task in [*tasks, *self._report_tasks]:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self._timer is not None:
                self._timer.cancel()
            if self.metrics is not None:
                await self.metrics.close()
            if self._control_transport is not None:
                self._control_transport.close()
            else:
                control_socket.close()
            if self._update_socket is not None:
                self._update_socket.close()
            if self.relay_server is not None:
                self.relay_server.close()
                await self.relay_server.wait_closed()
            if self.mode is not None:
                await self.mode.close()
            await asyncio.to_thread(self.instance.close)
            self.files.close(self.log)
            failed = self._failure is not None or sys.exc_info()[0] is not None
            self.log.event("stop", reason="error" if failed else "signal")
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        if self._failure is not None:
            raise self._failure


class _ControlProtocol(asyncio.DatagramProtocol):
    def __init__(self, shim: ServerShim) -> None:
        self.shim = shim

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.shim.on_control(data, (str(addr[0]), int(addr[1])))


__all__ = ["DEFAULT_CONTROL_PORT", "OPERATOR", "ServerOptions", "ServerShim"]
