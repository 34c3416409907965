"""The client shim daemon: ``roam client --bundle FILE``.

Theory of operation: the shim computes the schedule from the bundle's key ``K_t`` and keeps it
aligned with the servers through roaming updates received on the bundle's roaming port
(``migrate.updates.ClientRoamingState``). At each epoch boundary it points the kernel's rewrite
maps at the epoch's server (``client_shim.rules``); applications keep talking to the VIP and
never see a server address. The daemon only wakes up for boundaries and updates: no packet
passes through Python.

Everything it creates in the kernel (one nft table, one /32 route to the VIP) is recorded in an
instance record before it is created and removed on exit, on SIGTERM/SIGINT, and by
``roam cleanup`` after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from client_shim.holding import FrozenHold, open_hold
from client_shim.migrator import Migrator
from client_shim.rules import rewrite_table_body, table_family
from client_shim.state import ClientState, load_state
from client_shim.switching import Switching
from migrate.activeset import ActiveSchedule
from migrate.channel import CounterFloor, ReplayWindow
from migrate.cover import CoverConfig
from migrate.endpoints import Endpoint
from migrate.errors import RoamError, ScheduleError, SubscriptionExpiredError
from migrate.gating import next_switch
from migrate.handover import (
    COMMIT_MARGIN_S,
    DEFAULT_PREPARE_LEAD_S,
    DEFER_WITHIN_S,
    HANDOFF_BUDGET_S,
    LATE_PREPARE_WAIT_S,
    MAX_PREPARE_LEAD_S,
    MIGRATION_PORT,
    REFRESH_LEAD_S,
)
from migrate.hashchain import KeyChain
from migrate.kernel import nft, sockdiag
from migrate.kernel.eventlog import DaemonFiles, EventLog
from migrate.kernel.instances import Instance, sweep_dead
from migrate.kernel.metrics import HandoffTally, MetricsServer, client_families, registry_of
from migrate.kernel.routing import HostRoute
from migrate.kernel.udp import bind_exclusive, datagram_socket
from migrate.registration import Bundle
from migrate.replaystream import DEFAULT_MAX_REPLAY
from migrate.schedule import Epoch, EpochSchedule
from migrate.updates import ClientRoamingState

Clock = Callable[[], float]
MAX_DATAGRAM = 2048


class ClientShim:
    def __init__(
        self,
        bundle: Bundle,
        *,
        bundle_path: Path,
        state_path: Path,
        status_path: Path,
        log: EventLog,
        clock: Clock = time.time,
        bind_address: str = "",
        live: bool = True,
        prepare_lead: float = DEFAULT_PREPARE_LEAD_S,
        max_replay: int = DEFAULT_MAX_REPLAY,
        migration_port: int = MIGRATION_PORT,
        cover_config: CoverConfig | None = None,
        metrics: Endpoint | None = None,
    ) -> None:
        self.metrics_endpoint = metrics
        self.metrics: MetricsServer | None = None
        # Hand-overs counted from the log's own ``handoff`` events (for the metrics).
        self.handoffs = HandoffTally()
        log.taps.append(self.handoffs)
        self.migration_port = migration_port
        self.cover_config = cover_config if cover_config is not None else CoverConfig()
        self.bundle = bundle
        self.bundle_path = bundle_path
        self.servers = bundle.servers()
        self.state_path = state_path
        self.status_path = status_path
        self.files = DaemonFiles(state_path, status_path)
        self.log = log
        self.clock = clock
        self.bind_address = bind_address
        self.saved = load_state(state_path, bundle)
        params = replace(bundle.schedule_params(), m=self.saved.m)
        # The bundle's pebble index (roam subscribe --chain-index) holds for its own K_t.
        index = bundle.pebble_index() if self.saved.key_index == bundle.key_index else None
        chain = KeyChain(self.saved.chain_key, self.saved.key_index, index)
        self.schedule = EpochSchedule(chain, params)
        # k of N (PROTOCOL.md section 4): the client's server in each epoch is drawn from the
        # active set with its client id; with k = 1 it is the epoch's server.
        self.k = bundle.active
        self.roaming = ClientRoamingState(
            self.schedule,
            bundle.channel_key,
            bundle.deployment_id,
            bundle.client_id,
            bundle.chain_length,
        )
        for sender, counter in self.saved.counters.items():
            window = ReplayWindow(self.roaming.opener.window_size, strict=True)
            window.highest, window.bitmap = counter, 1
            self.roaming.opener.windows[sender] = window
        self.table = nft.instance_table_name("cli", os.getpid())
        self.family = table_family(bundle.vip)
        # The rule changes of a switch in reconnect mode (live mode's migrator has its own).
        self.switching = Switching(self.table, bundle.vip, bundle.service_port)
        self.instance: Instance | None = None
        self.current: Epoch | None = None
        self.target: Endpoint | None = None
        self.accepted = 0
        self.last_update: float | None = None  # when the last update was accepted
        self.started = clock()
        self.rejected = 0
        # By error class: a bounded set (the protocol's error types), for the metrics.
        self.rejected_by_reason: Counter[str] = Counter()
        self.last_rejection: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._prepare_timer: asyncio.TimerHandle | None = None
        self._handoff: asyncio.Task[None] | None = None
        self.migrator: Migrator | None = None
        self.live = live
        self.prepare_lead = prepare_lead
        self.max_replay = max_replay
        self.nflog_group = (os.getpid() % 60000) + 1
        self.hold: FrozenHold | None = None  # frozen segments held, not dropped (live mode)
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None

    # -- kernel ------------------------------------------------------------------------------

    def _install(self, target: Endpoint) -> None:
        instance = self.instance
        assert instance is not None
        if self.live:
            # The queue shares the NFLOG group's number (another subsystem).
            self.hold = open_hold(instance, self.family, self.nflog_group, self.log)
        body = rewrite_table_body(
            self.bundle.vip,
            self.bundle.service_port,
            self.servers,
            target,
            self.nflog_group if self.live else None,
            self.hold.mark if self.hold is not None else None,
        )
        instance.add_table(self.family, self.table, body)
        HostRoute(instance).add_vip_route(str(self.bundle.vip), toward=str(target.address))

    def _point_at(self, target: Endpoint) -> None:
        if target == self.target:
            return
        self.switching.switch(target)
        previous, self.target = self.target, target
        self.log.event("switch", server=str(target), previous=str(previous))

    # -- schedule ----------------------------------------------------------------------------

    def server_of(self, epoch: Epoch) -> Endpoint:
        """This client's server in ``epoch``."""
        if self.k == 1:
            return epoch.server
        return ActiveSchedule(self.schedule, self.k).assigned(epoch.index, self.bundle.client_id)

    def _next_switch(self, now: float) -> tuple[int, float, Endpoint]:
        """The next epoch in which this client's server changes (a hand-over there only)."""
        if self.k == 1:
            return next_switch(self.schedule, now)
        found = ActiveSchedule(self.schedule, self.k).client_switch(self.bundle.client_id, now)
        if found is None:
            raise SubscriptionExpiredError("no change of this client's server within the keys held")
        return found

    def _epoch_now(self) -> Epoch:
        now = self.clock()
        try:
            return self.schedule.epoch_at(now)
        except SubscriptionExpiredError:
            raise
        except ScheduleError:
            # Before the schedule starts: aim at epoch 1, whose window opens delta early.
            return self.schedule.epoch(1)

    def _tick(self) -> None:
        try:
            epoch = self._epoch_now()
            changed = self.current is None or epoch.index != self.current.index
            self.current = epoch
            if changed:
                if self.k == 1:
                    self.log.event(
                        "epoch",
                        epoch=epoch.index,
                        server=str(epoch.server),
                        start=round(epoch.start, 6),
                        length=epoch.length,
                    )
                else:
                    self.log.event(
                        "epoch",
                        epoch=epoch.index,
                        server=str(self.server_of(epoch)),
                        set=[
                            str(s)
                            for s in ActiveSchedule(self.schedule, self.k).active(epoch.index)
                        ],
                        start=round(epoch.start, 6),
                        length=epoch.length,
                    )
                held = self.schedule.chain.held_index
                if held - epoch.index < 16:
                    self.log.event(
                        "subscription_ending", level="warning", held=held, epoch=epoch.index
                    )
            if self.migrator is None:
                self._point_at(self.server_of(epoch))
            else:
                self._plan_handoff(epoch)
            self._write_status()
            self.log.flush_rejections()
            self._arm(epoch.end)
        except RoamError as error:
            self._fail(error)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, when - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    # -- live hand-overs ---------------------------------------------------------------------

    def _plan_handoff(self, epoch: Epoch) -> None:
        """Live mode: make sure a hand-over to the next server is scheduled (or running)."""
        if self._handoff is not None and not self._handoff.done():
            return
        now = self.clock()
        mine = self.server_of(epoch)
        if mine != self.target and epoch.start <= now:
            # We are behind the schedule (a reactive roam, a resync): hand over at once.
            self._start_handoff(epoch.index, epoch.start, mine)
            return
        try:
            index, start, server = self._next_switch(max(now, epoch.start))
        except RoamError:
            return  # no switch within the keys held; the subscription warning covers it
        self._arm_prepare(index, start, server, MAX_PREPARE_LEAD_S)

    def _arm_prepare(self, index: int, start: float, server: Endpoint, lead: float) -> None:
        if self._prepare_timer is not None:
            self._prepare_timer.cancel()
        delay = max(0.0, start - lead - self.clock())
        self._prepare_timer = asyncio.get_running_loop().call_later(
            delay, self._prepare_due, index, start, server
        )

    def _prepare_due(self, index: int, start: float, server: Endpoint) -> None:
        """How early to prepare depends on how much the connections have received by then:
        look again when the earliest possible moment comes, and wait if it is too early."""
        lead = self.prepare_lead
        if self.migrator is not None:
            lead = self.migrator.suggested_lead(self.prepare_lead)
        if self.clock() < start - lead - 0.01:
            self._arm_prepare(index, start, server, lead)
            return
        self._start_handoff(index, start, server)

    async def _sleep_until(self, index: int, before: float) -> None:
        """Sleep until ``before`` seconds before epoch ``index`` starts (re-read each time)."""
        while True:
            wait = self.schedule.start_of(index) - before - self.clock()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def _start_handoff(self, index: int, start: float, server: Endpoint) -> None:
        if self._handoff is not None and not self._handoff.done():
            return
        self._handoff = asyncio.get_running_loop().create_task(
            self._handoff_to(index, start, server)
        )

    async def _handoff_to(self, index: int, start: float, server: Endpoint) -> None:
        migrator = self.migrator
        assert migrator is not None
        try:
            record = migrator.prepare(index, server)
            # Just before the boundary, tell the new server how far the client has got; then
            # commit at the boundary. It may move meanwhile (an update re-anchored it).
            await self._sleep_until(index, REFRESH_LEAD_S)
            migrator.refresh(record, server)
            await self._sleep_until(index, 0.0)
            params = self.schedule.params
            # Wait for the new server until shortly before the old one closes its gate.
            deadline = max(
                self.schedule.start_of(index) + params.delta + params.gamma / 2,
                # Late already (a long hand-over before this one): the old server is gone,
                # so waiting a little for the new one costs nothing more.
                self.clock() + LATE_PREPARE_WAIT_S,
            )
            await migrator.commit(
                record,
                server,
                prepare_deadline=deadline,
                # ... and in time for the COMMITs to reach the new server before its window
                # for this epoch closes (it refuses them after; the windows of the epochs
                # right after it that the same server serves count as its own).
                give_up_at=self._give_up_at(index),
                may_defer=self._may_defer(index, server),
                # ... and GOs until the window closes: past it, everything waits for the next
                # roam, which comes at once (the client is behind).
                window_closes=self._window_closes(index),
            )
            previous, self.target = self.target, server
            self.log.event("switch", server=str(server), previous=str(previous), epoch=index)
        except (RoamError, OSError) as error:
            self.log.event("handoff_failed", level="error", reason=str(error))
            # Whatever happened to the connections, new ones must reach the right server.
            try:
                self._point_at(server)
            except RoamError as inner:
                self._fail(inner)
        finally:
            self._write_status()
            if not self._stop.is_set():
                asyncio.get_running_loop().call_soon(self._tick)

    def _may_defer(self, index: int, server: Endpoint) -> bool:
        """Whether connections the new server cannot prepare in its window may wait, frozen,
        for the next roam: it must come within ``DEFER_WITHIN_S`` and go to another server."""
        start = self.schedule.start_of(index)
        try:
            _, after, following = self._next_switch(start)
        except RoamError:
            return False
        return following != server and after - start <= DEFER_WITHIN_S

    def _give_up_at(self, index: int) -> float:
        budget_ends = self.schedule.start_of(index) + HANDOFF_BUDGET_S
        return min(budget_ends, self._window_closes(index) - COMMIT_MARGIN_S)

    def _window_closes(self, index: int) -> float:
        """When the server of epoch ``index`` stops taking this client's requests for it: its
        window, with those of the epochs right after it that it serves too (walked as far as
        a hand-over may last, ``HANDOFF_BUDGET_S``)."""
        budget_ends = self.schedule.start_of(index) + HANDOFF_BUDGET_S
        if self.k == 1:
            return self.schedule.served_until(index, budget_ends)
        return self._client_served_until(index, budget_ends)

    def _client_served_until(self, index: int, now: float) -> float:
        """k of N: when this client's server of epoch ``index`` stops admitting it: the
        window of its run of epochs as this client's server, walked only while closed by
        ``now`` (``EpochSchedule.served_until`` for the client's own server)."""
        active = ActiveSchedule(self.schedule, self.k)
        params = self.schedule.params
        mine = active.assigned(index, self.bundle.client_id)
        held = self.schedule.chain.held_index
        closes = self.schedule.epoch(index).end + params.delta + params.gamma
        while closes <= now and index < held:
            if active.assigned(index + 1, self.bundle.client_id) != mine:
                break
            index += 1
            closes = self.schedule.epoch(index).end + params.delta + params.gamma
        return closes

    def _untracked_connections(self) -> int:
        vip = (str(self.bundle.vip), self.bundle.service_port)
        try:
            return len(sockdiag.tcp_sockets(dst=vip, states=sockdiag.TCPF_ESTABLISHED))
        except (RoamError, OSError):
            return 0

    def _fail(self, error: BaseException) -> None:
        self.log.event("fatal", level="error", reason=str(error))
        self._failure = error
        self._stop.set()

    # -- updates -----------------------------------------------------------------------------

    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        now = self.clock()
        try:
            outcome = self.roaming.receive(data, now)
        except RoamError as error:
            self.rejected += 1
            self.rejected_by_reason[type(error).__name__] += 1
            self.last_rejection = f"{type(error).__name__}: {error}"
            # Anyone can send these: bounded logging, and the status file (with the counts)
            # is rewritten at the next epoch or accepted update, not once per datagram.
            self.log.rejection(
                "update_rejected",
                source=f"{source[0]}:{source[1]}",
                error=type(error).__name__,
                reason=str(error),
            )
            return
        self.accepted += 1
        self.last_update = now
        self.log.event(
            "update_accepted",
            source=f"{source[0]}:{source[1]}",
            sender=outcome.sender,
            key_extended_to=outcome.key_extended_to,
            m_changed=outcome.m_schedule_changed,
            epoch=outcome.anchor.epoch if outcome.anchor else None,
            correction=None if outcome.correction is None else round(outcome.correction, 6),
            clock_offset=round(outcome.clock_offset, 6),
            sent_at=round(outcome.sent_at, 6),
        )
        if outcome.key_extended_to is not None or outcome.m_schedule_changed:
            self._save_state()
        else:
            self._save_counters()
        self._tick()  # the anchor or m may have moved: re-evaluate now

    def _save_counters(self) -> None:
        self.saved.counters = {s: w.highest for s, w in self.roaming.opener.windows.items()}
        self._persist()

    def _save_state(self) -> None:
        chain = self.schedule.chain
        self.saved = ClientState(
            self.bundle.deployment_id,
            self.bundle.client_id,
            chain.held_index,
            chain.held_key,
            self.schedule.params.m,
            {s: w.highest for s, w in self.roaming.opener.windows.items()},
            self.saved.counter_floor,
        )
        self._persist()

    def _save_counter_floor(self, floor: int) -> None:
        self.saved.counter_floor = floor
        # On disk before a counter above the old floor is used: a restart starts above it.
        self._persist(wait=True)

    def _persist(self, *, wait: bool = False) -> None:
        self.files.save_state(self.saved.encode(), wait=wait)

    def status(self) -> dict[str, Any]:
        epoch = self.current
        return {
            "pid": os.getpid(),
            "name": self.bundle.name,
            "bundle": str(self.bundle_path),
            "vip": f"{self.bundle.vip}:{self.bundle.service_port}",
            "epoch": epoch.index if epoch else None,
            "epoch_ends": round(epoch.end, 6) if epoch else None,
            "server": str(self.target) if self.target else None,
            # k of N: servers active per epoch, and this epoch's set (this client's server is
            # one of them, drawn with its client id).
            "active": self.k,
            "active_set": [
                str(s) for s in ActiveSchedule(self.schedule, self.k).active(epoch.index)
            ]
            if epoch and self.k > 1
            else None,
            "key_index": self.schedule.chain.held_index,
            "m": self.schedule.params.m.as_mapping(),
            "clock_offset": self.roaming.clock_offset,
            "updates_accepted": self.accepted,
            # A client that hears no update for long was revoked, expired or is cut off:
            # ``roam client status`` says so.
            "last_update": None if self.last_update is None else round(self.last_update, 6),
            "started": round(self.started, 6),
            "updates_rejected": self.rejected,
            "updates_rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "last_rejection": self.last_rejection,
            "table": self.table,
            "migration": "live" if self.live else "reconnect",
            "live": self.migrator.status() if self.migrator is not None else None,
            "freeze": "drop" if self.hold is None else {"hold": self.hold.status()},
            "updated": round(self.clock(), 6),
        }

    def _write_status(self) -> None:
        self.files.show_status(self.status())

    # -- run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        sock = datagram_socket(socket.AF_INET6 if self.bundle.vip.version == 6 else socket.AF_INET)
        try:
            bind_exclusive(sock, (self.bind_address, self.bundle.roaming_port), "roaming updates")
        except RoamError:
            sock.close()  # before anything else was set up: nothing is left behind
            raise
        # Startup sweep: leftovers of instances that died without cleaning up.
        for line in await asyncio.to_thread(sweep_dead):
            self.log.event("swept", detail=line)
        self.instance = Instance.start("client")
        untracked = await asyncio.to_thread(self._untracked_connections)
        if untracked:
            # A restarted shim has none of these connections' checkpoints or replay bytes:
            # say so now, rather than leave their end at the next roam unexplained.
            self.log.event(
                "untracked_connections",
                level="warning",
                count=untracked,
                reason=f"{untracked} connection(s) to the VIP opened before this shim started: "
                "without their checkpoints they end at the next change of server",
            )
        transport: asyncio.DatagramTransport | None = None
        try:
            first = self._epoch_now()
            # pyroute2's netlink calls run their own event loop: keep them off ours.
            await asyncio.to_thread(self._install, self.server_of(first))
            self.target = self.server_of(first)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpdateProtocol(self), sock=sock
            )
            if self.live:
                self.migrator = Migrator(
                    self.bundle,
                    self.table,
                    self.nflog_group,
                    self.log,
                    self.clock,
                    lambda: self.roaming.clock_offset or 0.0,
                    prepare_lead=self.prepare_lead,
                    max_replay=self.max_replay,
                    migration_port=self.migration_port,
                    cover_config=self.cover_config,
                )
                self.migrator.hold = self.hold
                # Its requests start above the floor the last run persisted: no nonce twice
                # under the client's key, even if the clock went back.
                floor = CounterFloor(self.saved.counter_floor, self._save_counter_floor)
                self.migrator.sealer.keep_counters(floor)
                self.migrator.streams.sealer.keep_counters(floor)
                await self.migrator.start()
            if self.metrics_endpoint is not None:
                self.metrics = MetricsServer(
                    registry_of(lambda: client_families(self.status(), self.handoffs))
                )
                endpoint = self.metrics_endpoint
                await self.metrics.start(str(endpoint.address), endpoint.port)
                self.log.event("metrics", listen=str(endpoint))
            self.log.event(
                "start",
                name=self.bundle.name,
                vip=str(self.bundle.vip),
                roaming_port=self.bundle.roaming_port,
                table=self.table,
                key_index=self.schedule.chain.held_index,
            )
            self._tick()
            await self._stop.wait()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._prepare_timer is not None:
                self._prepare_timer.cancel()
            if self._handoff is not None and not self._handoff.done():
                self._handoff.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._handoff
            if self.metrics is not None:
                await self.metrics.close()
            if self.migrator is not None:
                self.migrator.close()
            if self.hold is not None:
                self.hold.close()  # what it still holds is dropped; the rule goes with the instance
            if transport is not None:
                transport.close()
            else:
                sock.close()
            await asyncio.to_thread(self.instance.close)
            self.files.close(self.log)
            failed = self._failure is not None or sys.exc_info()[0] is not None
            self.log.event("stop", reason="error" if failed else "signal")
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        if self._failure is not None:
            raise self._failure


class _UpdateProtocol(asyncio.DatagramProtocol):
    def __init__(self, shim: ClientShim) -> None:
        self.shim = shim

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.shim.on_datagram(data, (str(addr[0]), int(addr[1])))


def default_state_path(bundle_path: Path) -> Path:
    return bundle_path.with_name(bundle_path.name + ".state")


def default_status_path(name: str) -> Path:
    run_dir = Path(os.environ.get("SERVER_ROAMING_RUN_DIR", "/run/server-roaming"))
    return run_dir / f"client-{name}.status.json"
