"""A server's view of the pool: schedule, threat level, revocations and rate-contract strikes.

Theory of operation: every server holds ``K_n`` and computes the same schedule. What can make
servers' schedules differ is what happened at run time: a threat-level change, a reactive
trigger (a re-anchor), a revocation. These arrive as group control messages
(``migrate.control``), are validated here against the server's own schedule, and are kept in a
small persistent state so that a restarted server rejoins the pool where it left.

Rate contracts (paper section I): each epoch, the shim reports which clients exceeded their
contract. A first offence earns a *strike*: the client is blocked until the service roams
(its second chance). An offence in a later epoch, after the roam, makes it a repeat offender:
it is revoked (no further key extensions, refused by every firewall).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from migrate.antientropy import pad_size
from migrate.control import Facts, Revoke, Strike, Threat, Trigger
from migrate.endpoints import Endpoint
from migrate.errors import (
    ConfigError,
    InconsistentUpdateError,
    RevokedClientError,
    RoamError,
    SubscriptionExpiredError,
)
from migrate.gating import next_departure
from migrate.registration import ClientList, ClientRecord, Deployment, DeploymentSecret
from migrate.schedule import Anchor, EpochSchedule, MSchedule
from migrate.strictjson import dump_object, parse_object
from migrate.updates import RoamingUpdate, compose_update

STATE_FORMAT = "server-roaming/server-state"
TRIGGER_SLACK_EPOCHS = 1
TRIGGER_MAX_DISTANCE = 60.0  # seconds between a trigger's time and the receiver's clock
MAX_BLOCK_EPOCHS = 64  # a block lasts until the service roams, but never longer than this


@dataclass(slots=True)
class PoolState:
    """What a server persists between runs."""

    deployment_id: bytes
    anchor: Anchor | None = None
    m: MSchedule | None = None
    revoked: set[int] = field(default_factory=set)
    # Every counter this server's sealers use is above it (migrate.channel.CounterFloor).
    counter_floor: int = 0

    def encode(self) -> bytes:
        return dump_object(
            STATE_FORMAT,
            1,
            {
                "deployment_id": self.deployment_id.hex(),
                "anchor": None
                if self.anchor is None
                else {"epoch": self.anchor.epoch, "time": self.anchor.time},
                "m": None
                if self.m is None
                else {str(k): v for k, v in self.m.as_mapping().items()},
                "revoked": sorted(self.revoked),
                "counter_floor": self.counter_floor,
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> PoolState:
        fields = parse_object(data, STATE_FORMAT, 1)
        state = cls(fields.hex_bytes("deployment_id", 16))
        if not fields.is_null("anchor"):
            anchor = fields.object("anchor")
            state.anchor = Anchor(anchor.integer("epoch", 1), anchor.number("time"))
            anchor.done()
        if not fields.is_null("m"):
            m = fields.object("m")
            mapping = {}
            for key in m.names():
                if not key.isdigit():
                    raise ConfigError(f"server state: m key {key!r} is not an epoch")
                mapping[int(key)] = m.integer(key)
            m.done()
            state.m = MSchedule.from_mapping(mapping)
        state.revoked = set(fields.list_of_integers("revoked"))
        # Absent from state files written before counters were kept: nothing reserved then.
        if fields.has("counter_floor"):
            state.counter_floor = fields.integer("counter_floor", 0)
        fields.done()
        return state


class ServerPool:
    """One server's roaming state; pure, driven by the shim."""

    def __init__(
        self,
        deployment: Deployment,
        secret: DeploymentSecret,
        clients: ClientList,
        me: Endpoint,
        state: PoolState | None = None,
    ) -> None:
        if me not in deployment.servers:
            raise ConfigError(
                f"{me} is not in the deployment's server list "
                f"({', '.join(map(str, deployment.servers))})"
            )
        self.deployment = deployment
        self.me = me
        self.index = deployment.servers.index(me)
        self.clients = clients
        self.state = state or PoolState(deployment.deployment_id)
        if self.state.deployment_id != deployment.deployment_id:
            raise ConfigError("the server state file belongs to another deployment")
        params = deployment.schedule_params()
        if self.state.m is not None:
            params = replace(params, m=self.state.m)
        self.schedule = EpochSchedule(
            secret.chain(deployment.chain_length), params, self.state.anchor
        )
        # Client id -> epoch of its first offence against a rate contract, here or (told by a
        # Strike) at another server; and the clients this server blocks since (first) epoch.
        self.strikes: dict[int, int] = {}
        self.blocks: dict[int, int] = {}

    # -- clients -----------------------------------------------------------------------------

    def record(self, client: ClientRecord) -> ClientRecord:
        """The client as this server sees it now (revocations applied)."""
        if client.client_id in self.state.revoked and not client.revoked:
            return replace(client, revoked=True)
        return client

    def expired(self, client: ClientRecord, epoch: int) -> bool:
        """Whether ``client`` holds no key of ``epoch``: past its last granted epoch and, with a
        lease, past the lease's ceiling (``ClientRecord.grant_for``)."""
        return epoch > client.grant_for(epoch, self.deployment.chain_length)

    def admissible(self, client_id: int, epoch: int) -> bool:
        """Whether the client may reach the service while ``epoch`` runs: subscribed, not
        revoked (here or by the pool), and holding the key of ``epoch``."""
        client = self.clients.by_id(client_id)
        if client is None:
            return False
        record = self.record(client)
        return not record.revoked and not self.expired(record, epoch)

    def legitimate(self, epoch: int) -> list[ClientRecord]:
        """The clients the gates let in while ``epoch`` runs (revoked and expired ones left
        out). The answer changes at epoch boundaries: the gate asks again at each one."""
        return [
            c
            for c in map(self.record, self.clients.clients)
            if not c.revoked and not self.expired(c, epoch)
        ]

    def blocked(self, epoch: int) -> set[int]:
        """Clients this server caught over their contract, blocked from that epoch until the
        service roams (their second chance is at the next server)."""
        return {
            client
            for client, since in self.blocks.items()
            if since <= epoch and self._same_server(since, epoch)
        }

    def _same_server(self, first: int, last: int) -> bool:
        """Whether every epoch from ``first`` to ``last`` runs on one server (bounded: a block
        that old has long been served)."""
        if last - first > MAX_BLOCK_EPOCHS:
            return False
        try:
            server = self.schedule.server_for(first)
            return all(self.schedule.server_for(e) == server for e in range(first + 1, last + 1))
        except RoamError:
            return False

    def update_for(self, client: ClientRecord, now: float) -> RoamingUpdate:
        return compose_update(self.schedule, now, self.record(client), self.deployment.chain_length)

    def report_offence(self, client_id: int, epoch: int) -> str:
        """A client exceeded its rate contract during ``epoch``.

        Returns ``"strike"`` (blocked here until the service roams; the caller tells the
        other servers with a ``Strike``) or ``"revoke"`` (a repeat offender, here or after an
        offence at another server: the caller broadcasts a ``Revoke``). Repeated reports in the
        epoch of the first offence are that offence.
        """
        if client_id in self.state.revoked:
            return "revoked"
        first = self.strikes.get(client_id)
        if first is None or first == epoch:
            self.strikes[client_id] = epoch
            self.blocks.setdefault(client_id, epoch)
            return "strike"
        return "revoke"

    # -- control -----------------------------------------------------------------------------

    def validate(self, message: Threat | Trigger | Revoke | Strike, now: float) -> None:
        """Check a control message against our own state; raises, changes nothing."""
        current = self.schedule.epoch_at(now).index
        if isinstance(message, Threat):
            try:
                self.schedule.params.m.announce(message.m, message.from_epoch, current)
            except RoamError as error:
                raise InconsistentUpdateError(f"threat change refused: {error}") from None
        elif isinstance(message, Trigger):
            # A trigger roams *now*: its time is the sender's clock when it was made. Finding
            # the epoch at a time far from ours walks the schedule epoch by epoch (and leaves
            # the cursor there), so a distant time is refused before anything is computed.
            if abs(message.at - now) > TRIGGER_MAX_DISTANCE:
                raise InconsistentUpdateError(
                    f"trigger at {message.at:.3f} is {message.at - now:+.3f} s from our clock "
                    f"(limit {TRIGGER_MAX_DISTANCE:.0f} s)"
                )
            running = self.schedule.epoch_at(message.at).index
            if abs(running - message.leave_epoch) > TRIGGER_SLACK_EPOCHS:
                raise InconsistentUpdateError(
                    f"trigger leaves epoch {message.leave_epoch}, but epoch {running} runs at "
                    f"its time"
                )
            expected = next_departure(self.schedule, message.at)
            if running != message.leave_epoch:
                # Within the slack: recompute from the sender's epoch.
                start = self.schedule.start_of(message.leave_epoch)
                expected = next_departure(self.schedule, start)
            if message.next_epoch != expected:
                raise InconsistentUpdateError(
                    f"trigger jumps to epoch {message.next_epoch}, but the first epoch on "
                    f"another server is {expected}"
                )
        elif self.clients.by_id(message.client_id) is None:
            kind = type(message).__name__.lower()
            raise InconsistentUpdateError(f"{kind} names unknown client id {message.client_id}")
        elif isinstance(message, Strike) and message.epoch > current + 1:
            raise InconsistentUpdateError(
                f"strike in epoch {message.epoch}, but epoch {current} runs here"
            )

    def apply(self, message: Threat | Trigger | Revoke | Strike, now: float) -> str:
        """Validate and apply; returns a one-line description for the log."""
        self.validate(message, now)
        if isinstance(message, Threat):
            current = self.schedule.epoch_at(now).index
            m = self.schedule.params.m.announce(message.m, message.from_epoch, current)
            self.schedule.set_m_schedule(m)
            self.state.m = m
            return f"m = {message.m} from epoch {message.from_epoch}"
        if isinstance(message, Trigger):
            anchor = Anchor(message.next_epoch, message.at)
            self.schedule.reanchor(anchor)
            self.state.anchor = anchor
            return (
                f"reactive roam: epoch {message.leave_epoch} ends at {message.at:.3f}, "
                f"epoch {message.next_epoch} starts"
            )
        if isinstance(message, Strike):
            first = self.strikes.setdefault(message.client_id, message.epoch)
            return f"client {message.client_id} over its contract in epoch {first}"
        self.state.revoked.add(message.client_id)
        self.strikes.pop(message.client_id, None)
        self.blocks.pop(message.client_id, None)
        return f"client {message.client_id} revoked"

    # -- anti-entropy (migrate.antientropy) --------------------------------------------------

    def revoked_ids(self) -> frozenset[int]:
        """Revoked here: by a control message, or in the client list this server read."""
        listed = {c.client_id for c in self.clients.clients if c.revoked}
        return frozenset(self.state.revoked | listed)

    def facts(self) -> Facts:
        """This server's grow-only control state, padded to the deployment's one size."""
        revoked = self.revoked_ids()
        strikes = tuple(sorted((c, e) for c, e in self.strikes.items() if c not in revoked))
        return Facts(revoked, strikes, pad_size(len(self.clients.clients)))

    def merge(self, facts: Facts, now: float) -> tuple[list[str], list[str]]:
        """Merge a peer's control state: revocations by union, strikes by their earliest epoch.

        Each new fact is validated and applied like the control message it stands for, so a
        fact this server cannot check (an unknown client: the peer read a newer client list)
        is refused alone. Returns (descriptions of what changed, reasons of what was refused).
        """
        applied: list[str] = []
        refused: list[str] = []
        known = self.revoked_ids()
        for client_id in sorted(facts.revoked - known):
            self._merge_one(Revoke(client_id), now, applied, refused)
        revoked = self.revoked_ids()
        for client_id, epoch in facts.strikes:
            first = self.strikes.get(client_id)
            if client_id in revoked or (first is not None and first <= epoch):
                continue
            if first is not None:
                # Both servers saw an offence: the earlier one is the first (merging by the
                # minimum makes every server agree, whatever the order of the messages).
                self.strikes.pop(client_id)
            self._merge_one(Strike(client_id, epoch), now, applied, refused)
            if first is not None and client_id not in self.strikes:
                self.strikes[client_id] = first  # refused: keep what we knew
        return applied, refused

    def _merge_one(
        self, message: Revoke | Strike, now: float, applied: list[str], refused: list[str]
    ) -> None:
        try:
            applied.append(self.apply(message, now))
        except RoamError as error:
            refused.append(str(error))

    def make_trigger(self, now: float) -> Trigger:
        """The trigger that moves the service off its current server at ``now``."""
        current = self.schedule.epoch_at(now).index
        return Trigger(current, next_departure(self.schedule, now), now)

    def check_client_allowed(self, client: ClientRecord, epoch: int) -> None:
        """Raise unless ``client`` is admissible while ``epoch`` runs (see ``admissible``)."""
        record = self.record(client)
        if record.revoked:
            raise RevokedClientError(f"client {client.name!r} is revoked")
        if self.expired(record, epoch):
            held = record.grant_for(epoch, self.deployment.chain_length)
            raise SubscriptionExpiredError(
                f"client {client.name!r} holds keys up to epoch {held}; the service is in {epoch}"
            )
