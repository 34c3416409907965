"""Anti-entropy of the control state: servers driven over simulated time with seeded loss."""

import ipaddress
import random

import pytest

from migrate.antientropy import CONVERGENCE_PERIODS, SYNC_PERIOD_S, convergence_periods
from migrate.control import ControlChannel, Facts, Revoke, Strike, decode_control, encode_control
from migrate.errors import MalformedMessageError
from migrate.pool import PoolState, ServerPool
from migrate.registration import ClientList, ClientRecord
from tests.unit.test_pool import CLIENTS, DEPLOYMENT, SECRET, SERVERS, START

BOB = ClientRecord("bob", 2, ipaddress.ip_address("10.0.0.51"), 47474, bytes(32), 5000)
TWO = ClientList(2, (*CLIENTS.clients, BOB))


class SimulatedPool:
    """Three servers exchanging sealed Facts once per period (jittered), each datagram lost
    with probability ``loss`` drawn from a seeded random; ``down`` servers send and receive
    nothing."""

    def __init__(self, seed: int, loss: float = 0.5) -> None:
        self.random = random.Random(seed)
        self.loss = loss
        self.pools = [ServerPool(DEPLOYMENT, SECRET, TWO, server) for server in SERVERS]
        self.channels = [
            ControlChannel(SECRET.group_key, DEPLOYMENT.deployment_id, i) for i in range(3)
        ]
        self.down: set[int] = set()
        self.due = [START + self.random.uniform(0, SYNC_PERIOD_S) for _ in SERVERS]
        self.now = START

    def restart(self, index: int) -> None:
        """The server comes back with the state it had persisted (PoolState) when it stopped."""
        saved = PoolState.decode(self.pools[index].state.encode())
        self.pools[index] = ServerPool(DEPLOYMENT, SECRET, TWO, SERVERS[index], saved)
        self.channels[index] = ControlChannel(SECRET.group_key, DEPLOYMENT.deployment_id, index)
        self.down.discard(index)

    def step(self) -> None:
        """Advance to the next server's sync time and deliver its Facts to every peer."""
        sender = min(range(3), key=lambda i: self.due[i])
        self.now = self.due[sender]
        self.due[sender] += SYNC_PERIOD_S * self.random.uniform(0.8, 1.2)
        if sender in self.down:
            return
        data = self.channels[sender].seal(self.pools[sender].facts(), self.now)
        for receiver in range(3):
            if receiver == sender or receiver in self.down or self.random.random() < self.loss:
                continue
            opened, message = self.channels[receiver].open(data, self.now + 0.001)
            assert isinstance(message, Facts)
            self.channels[receiver].accept(opened)
            self.pools[receiver].merge(message, self.now)

    def run_until(self, done, limit_s: float) -> float:  # type: ignore[no-untyped-def]
        start = self.now
        while not done():
            assert self.now - start <= limit_s, f"not converged within {limit_s} s"
            self.step()
        return self.now - start


def test_the_bound_at_half_loss_is_twenty_periods() -> None:
    assert CONVERGENCE_PERIODS == convergence_periods(0.5, live_peers=1) == 20
    assert convergence_periods(0.5, live_peers=2) == 10
    with pytest.raises(ValueError, match="loss must be"):
        convergence_periods(1.0)


@pytest.mark.parametrize("seed", range(50))
def test_a_revocation_reaches_every_live_server_and_a_returning_one_within_the_bound(
    seed: int,
) -> None:
    sim = SimulatedPool(seed)
    sim.run_until(lambda: sim.now > START + 5, 10)
    sim.down.add(2)  # server 3 is down when the operator revokes bob
    # The operator's Revoke reached server 1 only (server 2 lost it, server 3 is down).
    sim.pools[0].apply(Revoke(2), sim.now)
    bound = (CONVERGENCE_PERIODS + 1) * SYNC_PERIOD_S * 1.2

    sim.run_until(lambda: 2 in sim.pools[1].revoked_ids(), bound)
    assert 2 not in sim.pools[2].revoked_ids()
    # Server 3 stays down three simulated hours, then returns with the state it had persisted.
    sim.now += 3 * 3600
    sim.due = [sim.now + sim.random.uniform(0, SYNC_PERIOD_S) for _ in SERVERS]
    sim.restart(2)
    sim.run_until(lambda: 2 in sim.pools[2].revoked_ids(), bound)
    for pool in sim.pools:
        current = pool.schedule.epoch_at(sim.now).index
        assert pool.legitimate(current) == [CLIENTS.clients[0]]  # alice keeps working everywhere
        assert pool.facts() == sim.pools[0].facts()


def test_without_loss_a_returning_server_catches_up_in_one_period() -> None:
    sim = SimulatedPool(seed=1, loss=0.0)
    sim.down.add(2)
    sim.pools[0].apply(Revoke(2), START)
    sim.restart(2)
    assert sim.run_until(lambda: 2 in sim.pools[2].revoked_ids(), 10) <= SYNC_PERIOD_S * 1.2


def test_strikes_merge_to_the_earliest_offence_whatever_the_order() -> None:
    sim = SimulatedPool(seed=7)
    sim.run_until(lambda: sim.now > START + 60, 70)
    current = sim.pools[0].schedule.epoch_at(sim.now).index
    early, late = current - 5, current - 2
    # Server 2 saw its offence later, but its Facts may arrive first: the earliest wins.
    sim.pools[1].report_offence(1, late)
    sim.pools[0].report_offence(1, early)
    sim.run_until(lambda: all(p.strikes.get(1) == early for p in sim.pools), 60)
    # An offence in the epoch server 2 thought first is now a second offence there.
    assert sim.pools[1].report_offence(1, late) == "revoke"


def test_a_fact_about_an_unknown_client_is_refused_alone() -> None:
    pool = ServerPool(DEPLOYMENT, SECRET, CLIENTS, SERVERS[0])
    applied, refused = pool.merge(Facts(frozenset({1, 9}), ((2, 3),)), START + 10)
    assert applied == ["client 1 revoked"]
    assert len(refused) == 2
    assert all("unknown client id" in reason for reason in refused)
    assert pool.revoked_ids() == {1}


def test_facts_have_one_size_whatever_they_hold() -> None:
    pool = ServerPool(DEPLOYMENT, SECRET, TWO, SERVERS[0])
    empty = len(encode_control(pool.facts()))
    pool.report_offence(1, 3)
    struck = len(encode_control(pool.facts()))
    pool.apply(Revoke(2), START + 10)
    revoked = len(encode_control(pool.facts()))
    assert empty == struck == revoked
    assert decode_control(encode_control(pool.facts())) == Facts(frozenset({2}), ((1, 3),))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x00\x00\x00\x02\x00\x00\x00\x00" + b"\x00\x00\x00\x02\x00\x00\x00\x01", "ascending"),
        (b"\x00\x00\x00\x01\x00\x00\x00\x00" + b"\x00\x00\x00\x00", "non-zero"),
        (b"\x00\x00\x00\x00\x00\x00\x00\x00\x01", "padding"),
        (b"\x00\x00\x00\x05\x00\x00\x00\x00", "cannot hold"),
        (b"\x00\x00\x00", "shorter"),
        (b"\x00\x00\x00\x00\x00\x00\x00\x01" + b"\x00\x00\x00\x01" + bytes(8), "epoch 0"),
    ],
)
def test_the_facts_parser_is_strict(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessageError, match=reason):
        decode_control(b"\x06" + body)


def test_strike_message_unchanged() -> None:
    assert decode_control(encode_control(Strike(1, 2))) == Strike(1, 2)
