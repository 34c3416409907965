"""The server's live mode (proxy.live) on its narrow context, without a lab.

``LiveMode`` reads only a ``LiveContext``: here it is built from plain values, the service is
one end of a local socket pair, and answers are caught by a transport that records what it is
asked to send. What the tests assert is what a client and an operator rely on: a forged or
misdirected request creates nothing, a repeated PREPARE opens no second service connection,
and an ABORT frees the service connection at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import os
import socket
from typing import Any

import pytest

from migrate.channel import CounterFloor, Kind
from migrate.checkpoint import (
    Checkpoint,
    CheckpointKeys,
    RangeRecord,
    TcpSnapshot,
    seal_checkpoint,
)
from migrate.cover import ANSWER_CELL_BYTES, frame_many, unframe_all
from migrate.handover import ServerState
from migrate.kernel.eventlog import EventLog
from migrate.pool import ServerPool
from migrate.registration import ClientList, ClientRecord
from migrate.reincarnation import (
    Answer,
    Phase,
    Request,
    Status,
    answer_opener,
    request_sealer,
)
from proxy.live import LiveMode
from proxy.livecontext import LiveContext

from .test_pool import ALICE, DEPLOYMENT, SECRET, SERVERS

BOB = ClientRecord("bob", 2, ipaddress.ip_address("10.0.0.60"), 47474, bytes([7]) * 32, 5000)
REPLAY = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class Recorder(asyncio.DatagramTransport):
    """Catches what live mode sends (no network in a unit test)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append((bytes(data), addr))

    def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self) -> None:
        self.pool = ServerPool(DEPLOYMENT, SECRET, ClientList(1, (ALICE, BOB)), SERVERS[0])
        schedule = self.pool.schedule
        # An epoch that SERVERS[0] serves, after one that another server serves.
        epoch = next(
            i
            for i in range(2, 2000)
            if schedule.server_for(i) == SERVERS[0] and schedule.server_for(i - 1) != SERVERS[0]
        )
        self.epoch = epoch
        self.now = schedule.start_of(epoch) - 1.0
        self.current = epoch - 1  # the epoch running (the context's view)
        self.connects = 0
        self.services: list[socket.socket] = []  # the service's ends of the socket pairs
        self.context = LiveContext(
            listen=("10.0.0.1", 80),
            vport=80,
            deployment_id=DEPLOYMENT.deployment_id,
            sender=0,
            group_key=SECRET.group_key,
            chain_length=DEPLOYMENT.chain_length,
            pool=self.pool,
            log=EventLog("test", stream=None),
            counter_floor=CounterFloor(0, lambda value: None),
            clock=lambda: self.now,
            epoch=lambda: self.current,
            gate_open=lambda: False,
            leaving_at=lambda: None,
            connect_service=self.connect,
        )
        self.live = LiveMode(self.context)
        self.transport = Recorder()
        self.live.port.transport = self.transport
        self.sealers: dict[int, Any] = {}

    async def connect(self, client_address: str) -> socket.socket:
        self.connects += 1
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.services.append(theirs)
        return ours

    def prepare(
        self,
        client: ClientRecord = ALICE,
        received: int = 0,
        replay: bytes = REPLAY,
        codec: str = "http",
        state: bytes = b"",
        deep: int = 0,
        port: int = 40000,
    ) -> Request:
        """``deep``: the checkpoint is that many bytes into a long download whose response
        has a range record (a Range hand-over)."""
        record = None
        if deep:
            record = RangeRecord(b'"etag-1"', True, 4 * deep, 200, deep - 65536, bytes(32))
        checkpoint = Checkpoint(
            conn_id=b"c" * 16,
            client=(str(client.address), port),
            vport=80,
            epoch=self.epoch - 1,
            counter=3,
            taken_at=self.now - 0.5,
            tcp=TcpSnapshot(1000, 2000, 1448, 7, 7, True, True, 5),
            codec=codec,
            c2s_fresh=0,
            c2s_pos=len(replay),
            s2c_fresh=0,
            s2c_pos=deep,
            c2s_hash=hashlib.sha256(replay).digest(),
            s2c_hash=hashlib.sha256(b"").digest(),
            state=state,
            range=record,
        )
        key = CheckpointKeys(SECRET.group_key).for_epoch(checkpoint.epoch)
        sealed = seal_checkpoint(checkpoint, key, DEPLOYMENT.deployment_id, os.urandom)
        return Request(
            Phase.PREPARE, self.epoch, port, 80, len(replay), received, 0, sealed, replay
        )

    def send(self, request: Request, client: ClientRecord = ALICE, source: str = "") -> None:
        sealer = self.sealers.get(client.client_id)
        if sealer is None:
            sealer = request_sealer(client.channel_key, DEPLOYMENT.deployment_id, client.client_id)
            self.sealers[client.client_id] = sealer
        data = sealer.seal(Kind.REINCARNATE_REQUEST, request.encode(), self.now)
        self.live.on_datagram(data, (source or str(client.address), 50000))

    def send_packed(
        self, requests: list[Request], client: ClientRecord = ALICE, source: str = ""
    ) -> bytes:
        """A packed cell (migrate.cover), as the client's cover sends GOs and ABORTs."""
        sealer = self.sealers.get(client.client_id)
        if sealer is None:
            sealer = request_sealer(client.channel_key, DEPLOYMENT.deployment_id, client.client_id)
            self.sealers[client.client_id] = sealer
        plaintext = frame_many([r.encode() for r in requests], 1024)
        data = sealer.seal(Kind.REINCARNATE_REQUEST, plaintext, self.now)
        self.live.on_datagram(data, (source or str(client.address), 50000))
        return data

    def answers(self, client: ClientRecord = ALICE) -> list[Answer]:
        opener = answer_opener(client.channel_key, DEPLOYMENT.deployment_id, client.client_id)
        found = []
        for data, _ in self.transport.sent:
            opened = opener.open(data, self.now)
            opener.accept(opened)
            found.append(Answer.decode(opened.plaintext))
        return found


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def abort(epoch: int) -> Request:
    return Request(Phase.ABORT, epoch, 40000, 80, 0, 0, 0, b"", b"")


def go(epoch: int) -> Request:
    return Request(Phase.GO, epoch, 40000, 80, 0, 0, 0, b"", b"")


def test_a_prepare_replays_and_answers_ready_and_a_repeat_opens_nothing_more() -> None:
    async def scenario() -> None:
        harness = Harness()
        request = harness.prepare()
        harness.send(request)
        await settle()
        assert harness.connects == 1
        assert harness.services[0].recv(4096) == REPLAY  # the client's request, replayed
        assert harness.answers() == [Answer(Phase.PREPARE, 40000, Status.READY)]
        [pending] = harness.live.pending.values()
        assert pending.machine.state is ServerState.PREPARED
        harness.transport.sent.clear()
        harness.send(request)  # a retry: answered again, no second service connection
        await settle()
        assert harness.connects == 1
        assert harness.answers() == [Answer(Phase.PREPARE, 40000, Status.READY)]
        await harness.live.close()

    asyncio.run(scenario())


def test_a_range_prepare_deep_in_a_download_is_charged_what_it_reads_not_its_position() -> None:
    """The per-client regeneration budget (1 GiB burst) counts the bytes a re-incarnation
    reads: a Range hand-over 3 GiB into a download reads a window and the bytes since, and
    must be admitted (charged the whole position, it was refused with no answer)."""

    async def scenario() -> None:
        harness = Harness()
        deep = 3 * 1024**3
        harness.send(harness.prepare(received=deep + 1000, deep=deep))
        await settle()
        assert harness.connects == 1, "refused: the PREPARE was charged the client's position"
        assert b"Range: bytes=" in harness.services[0].recv(4096)
        meter = harness.live.meter.clients[ALICE.client_id]
        assert meter.regenerate.capacity - meter.regenerate.level <= 65536 + 1000 + 1
        await harness.live.close()

    asyncio.run(scenario())


def test_an_abort_frees_the_service_connection_at_once() -> None:
    async def scenario() -> None:
        harness = Harness()
        harness.send(harness.prepare())
        await settle()
        harness.send(abort(harness.epoch))
        await settle()
        assert harness.live.pending == {}
        assert harness.live.meter.pending_of(ALICE.client_id) == 0
        service = harness.services[0]
        service.settimeout(5.0)
        assert service.recv(4096) == REPLAY
        assert service.recv(4096) == b""  # closed: the service sees the connection end
        await harness.live.close()

    asyncio.run(scenario())


def test_forged_and_misdirected_requests_create_nothing() -> None:
    async def scenario() -> None:
        harness = Harness()
        harness.live.on_datagram(os.urandom(300), ("10.0.0.50", 50000))  # forged
        harness.send(harness.prepare(), source="10.0.0.99")  # ALICE's seal, another address
        await settle()
        assert harness.connects == 0
        assert harness.live.pending == {}
        assert harness.transport.sent == []
        assert harness.live.counts["refused"] == 2
        # BOB cannot abort or start ALICE's re-incarnation of the same address and port.
        harness.send(harness.prepare())
        await settle()
        harness.send(abort(harness.epoch), client=BOB, source=str(ALICE.address))
        harness.send(go(harness.epoch), client=BOB, source=str(ALICE.address))
        await settle()
        [pending] = harness.live.pending.values()
        assert pending.machine.state is ServerState.PREPARED
        assert harness.live.counts["refused"] == 4
        await harness.live.close()

    asyncio.run(scenario())


def test_a_go_before_the_commit_is_refused_and_changes_nothing() -> None:
    async def scenario() -> None:
        harness = Harness()
        harness.send(harness.prepare())
        await settle()
        harness.send(go(harness.epoch))
        await settle()
        [pending] = harness.live.pending.values()
        assert pending.machine.state is ServerState.PREPARED
        assert harness.live.counts["refused"] == 1
        await harness.live.close()

    asyncio.run(scenario())


SELECT_3 = b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"
GET_K = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [(b"+OK\r\n", Status.READY), (b"-ERR DB index is out of range\r\n", Status.DIVERGED)],
)
def test_a_redis_session_is_restored_before_the_replay_or_the_hand_over_refused(
    reply: bytes, expected: Status
) -> None:
    """The new server sends the session's state (SELECT 3) first, drops its reply, then
    replays; a service that refuses the state makes the hand-over fail, never replay into
    the wrong database."""

    async def scenario() -> None:
        harness = Harness()
        harness.send(harness.prepare(replay=GET_K, codec="resp", state=SELECT_3))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if harness.services:
                break
        service = harness.services[0]
        service.settimeout(5.0)
        assert service.recv(4096) == SELECT_3  # the session first, alone
        service.sendall(reply)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if harness.transport.sent:
                break
        [answer] = harness.answers()
        assert answer.status is expected, answer
        if expected is Status.READY:
            assert service.recv(4096) == GET_K  # then the unanswered command
        await harness.live.close()

    asyncio.run(scenario())


def _run_of_two(schedule: Any, me: Any) -> int:
    """An epoch of ``me`` followed by another of ``me``, then one of another server."""
    return next(
        i
        for i in range(2, 2000)
        if schedule.server_for(i) == me
        and schedule.server_for(i + 1) == me
        and schedule.server_for(i + 2) != me
    )


def test_a_late_request_is_taken_while_the_same_server_serves_the_next_epoch() -> None:
    """Epochs in a row on one server are one open gate: a PREPARE for the first that comes
    after its own window (a hand-over that ran late) is taken while the next epoch runs, and
    refused, with the reason, once the run is over."""

    async def scenario() -> None:
        harness = Harness()
        schedule = harness.pool.schedule
        first = _run_of_two(schedule, SERVERS[0])
        harness.epoch = first
        # In the next epoch (the same server's), past the first's own window.
        harness.current = first + 1
        harness.now = schedule.window(first).closes + 0.2
        assert harness.now < schedule.start_of(first) + 10.0  # within LATE_REQUEST_S
        harness.send(harness.prepare())
        await settle()
        assert harness.connects == 1
        assert harness.answers() == [Answer(Phase.PREPARE, 40000, Status.READY)]
        await harness.live.close()

        # After the run: another server's epoch runs, and the request is refused.
        harness = Harness()
        harness.epoch = first
        harness.current = first + 2
        harness.now = schedule.served_until(first, schedule.start_of(first + 2)) + 0.1
        assert harness.now < schedule.start_of(first) + 10.0  # within LATE_REQUEST_S
        harness.send(harness.prepare())
        await settle()
        assert harness.connects == 0
        assert harness.live.pending == {}
        # Refused, with the reason in the log; not answered (a replay of the client's PREPARE
        # from its spoofed address must not make the server send the client a refusal).
        assert harness.answers() == []
        assert harness.live.counts["refused"] == 1
        await harness.live.close()

    asyncio.run(scenario())


def test_a_commit_after_the_window_closed_is_answered_late_and_restores_nothing() -> None:
    """A pool too loaded to take every connection in its window: a COMMIT that arrives after
    the window closed is answered LATE (the client may hold the connection for the next
    roam, ``migrate.handover.ClientHandover.movable_later``), never restored; its ABORT
    frees the preparation at once."""

    async def scenario() -> None:
        harness = Harness()
        schedule = harness.pool.schedule
        prepare = harness.prepare()
        harness.send(prepare)
        await settle()
        assert harness.answers() == [Answer(Phase.PREPARE, 40000, Status.READY)]
        harness.transport.sent.clear()
        start = schedule.start_of(harness.epoch)
        harness.now = schedule.served_until(harness.epoch, start + 9.0) + 0.1
        assert harness.now < start + 10.0  # within LATE_REQUEST_S: only the window says no
        harness.current = schedule.epoch_at(harness.now).index
        commit = Request(
            Phase.COMMIT, harness.epoch, 40000, 80, len(REPLAY), 0, len(REPLAY),
            prepare.checkpoint, b"",
        )  # fmt: skip
        harness.send(commit)
        await settle()
        [answer] = harness.answers()
        assert (answer.phase, answer.status) == (Phase.COMMIT, Status.LATE)
        assert f"the window of epoch {harness.epoch} on this server closed" in answer.detail
        [pending] = harness.live.pending.values()
        assert pending.machine.state is ServerState.PREPARED  # nothing restored
        harness.send(abort(harness.epoch))
        await settle()
        assert harness.live.pending == {}
        assert harness.services[0].recv(4096) == REPLAY
        assert harness.services[0].recv(4096) == b""  # the service connection closed
        await harness.live.close()

    asyncio.run(scenario())


def test_a_prepare_beyond_one_datagram_takes_its_bytes_from_the_replay_stream() -> None:
    """Replay bytes on the stream (migrate.replaystream): sealed chunks stored and
    acknowledged; forged, replayed, misdirected, oversized chunks refused with nothing held;
    the datagram naming the bytes creates nothing until they are held, then replays them."""
    from dataclasses import replace

    from migrate.errors import RoamError
    from migrate.reincarnation import stream_ack_opener, stream_sealer
    from migrate.replaystream import Ack, chunks

    async def scenario() -> None:
        harness = Harness()
        big = os.urandom(150_000)
        request = replace(harness.prepare(replay=big, codec="generic"), streamed=len(big))
        port = harness.live.port
        buffers = port.buffers
        # The datagram first: refused (the bytes are not held), nothing created, no answer.
        harness.send(request)
        await settle()
        assert harness.connects == 0
        assert harness.live.pending == {}
        assert harness.transport.sent == []
        sealer = stream_sealer(ALICE.channel_key, DEPLOYMENT.deployment_id, ALICE.client_id)
        acks = stream_ack_opener(ALICE.channel_key, DEPLOYMENT.deployment_id, ALICE.client_id)
        pieces = [
            sealer.seal(Kind.REINCARNATE_REQUEST, piece.encode(), harness.now)
            for piece in chunks(harness.epoch, 40000, 80, 0, 0, big)
        ]
        alice = (str(ALICE.address), 50001)
        opened = acks.open(port.on_chunk(pieces[0], alice), harness.now)
        assert Ack.decode(opened.plaintext) == Ack(40000, 0, 64_000)

        def held() -> tuple[dict[int, int], dict[Any, bytes]]:
            return dict(buffers.held), {k: bytes(r.data) for k, r in buffers.runs.items()}

        before = held()
        forged = bytearray(pieces[1])
        forged[-20] ^= 1
        buffers.max_replay = 100_000
        for bad, source in (
            (bytes(forged), alice),  # fails its seal
            (pieces[0], alice),  # a replay of a chunk taken
            (pieces[1], (str(BOB.address), 50001)),  # not from the client's address
            (pieces[1], alice),  # past --max-replay (lowered for this line)
        ):
            with pytest.raises(RoamError):
                port.on_chunk(bad, source)
            assert (
                dict(buffers.held),
                {k: bytes(r.data) for k, r in buffers.runs.items()},
            ) == before
        buffers.max_replay = 64 * 1024 * 1024
        for piece in pieces[1:]:
            port.on_chunk(piece, alice)
        harness.send(request)
        await settle()
        assert harness.connects == 1
        received = b""
        while len(received) < len(big):
            await settle()
            received += harness.services[0].recv(1 << 20)
        assert received == big
        await settle()
        assert harness.answers() == [Answer(Phase.PREPARE, 40000, Status.READY)]
        harness.send(abort(harness.epoch))
        await settle()
        assert buffers.runs == {}
        await harness.live.close()

    asyncio.run(scenario())


def test_a_packed_cell_of_aborts_frees_each_connection_and_is_answered_once() -> None:
    """GOs and ABORTs share cells (migrate.cover): each request acts as if alone, the cell
    is answered with one cover cell as any cell is, and a replayed cell changes nothing."""

    async def scenario() -> None:
        harness = Harness()
        for port in (40000, 40001, 40002):
            harness.send(harness.prepare(port=port))
        await settle()
        assert harness.connects == 3
        assert len(harness.live.pending) == 3
        harness.transport.sent.clear()
        aborts = [
            Request(Phase.ABORT, harness.epoch, p, 80, 0, 0, 0, b"", b"") for p in (40000, 40002)
        ]
        cell = harness.send_packed(aborts)
        await settle()
        assert sorted(key[1] for key in harness.live.pending) == [40001]
        assert harness.live.meter.pending_of(ALICE.client_id) == 1
        opener = answer_opener(ALICE.channel_key, DEPLOYMENT.deployment_id, ALICE.client_id)
        [(answer, _)] = harness.transport.sent
        assert len(answer) == ANSWER_CELL_BYTES
        assert unframe_all(opener.open(answer, harness.now).plaintext) == []  # cover
        refused = harness.live.counts["refused"]
        harness.live.on_datagram(cell, (str(ALICE.address), 50000))  # replayed
        harness.send_packed(
            [Request(Phase.ABORT, harness.epoch, 40001, 80, 0, 0, 0, b"", b"")] * 2,
            client=BOB,  # BOB cannot abort ALICE's connection, packed or not
            source=str(ALICE.address),
        )
        await settle()
        assert harness.live.counts["refused"] == refused + 2
        assert [key[1] for key in harness.live.pending] == [40001]
        assert len(harness.transport.sent) == 1
        await harness.live.close()

    asyncio.run(scenario())


def packed_answers(harness: Harness, client: ClientRecord = ALICE) -> list[list[Answer]]:
    """The answers of each datagram sent (a packed answer cell holds several; cover none)."""
    opener = answer_opener(client.channel_key, DEPLOYMENT.deployment_id, client.client_id)
    found = []
    for data, _ in harness.transport.sent:
        opened = opener.open(data, harness.now)
        opener.accept(opened)
        found.append([Answer.decode(body) for body in unframe_all(opened.plaintext)])
    return found


def test_a_packed_cell_of_prepares_is_answered_with_one_cell_of_their_readys() -> None:
    """PREPAREs share cells (migrate.cover): each is prepared as if it came alone, and their
    READYs, which come as each replay ends, leave together in one answer cell no larger than
    the request cell (migrate.gathering). A refused one holds nobody and is not answered; a
    replayed cell changes nothing."""

    async def scenario() -> None:
        harness = Harness()
        good = [harness.prepare(port=port) for port in (40000, 40001, 40002)]
        far = dataclasses.replace(harness.prepare(port=40003), epoch=harness.epoch + 400)
        cell = harness.send_packed([good[0], far, *good[1:]])
        await settle()
        assert harness.connects == 3
        assert sorted(key[1] for key in harness.live.pending) == [40000, 40001, 40002]
        assert harness.live.counts["refused"] == 1
        [(answer, _)] = harness.transport.sent
        assert len(answer) == ANSWER_CELL_BYTES <= len(cell)
        [answers] = packed_answers(harness)
        assert sorted(answers, key=lambda a: a.client_port) == [
            Answer(Phase.PREPARE, port, Status.READY) for port in (40000, 40001, 40002)
        ]
        harness.live.on_datagram(cell, (str(ALICE.address), 50000))  # replayed
        await settle()
        assert harness.connects == 3
        assert len(harness.transport.sent) == 1
        assert harness.live.port.gatherer._cells == {}  # nothing left waiting
        await harness.live.close()

    asyncio.run(scenario())


def test_a_packed_cell_of_late_commits_is_answered_late_in_one_cell() -> None:
    """COMMITs share cells too: answered at once (LATE, after the window closed), their
    answers still leave as one cell, and nothing is restored."""

    async def scenario() -> None:
        harness = Harness()
        schedule = harness.pool.schedule
        prepares = [harness.prepare(port=port) for port in (40000, 40001)]
        harness.send_packed(prepares)
        await settle()
        harness.transport.sent.clear()
        start = schedule.start_of(harness.epoch)
        harness.now = schedule.served_until(harness.epoch, start + 9.0) + 0.1
        harness.current = schedule.epoch_at(harness.now).index
        commits = [
            Request(Phase.COMMIT, harness.epoch, prepare.client_port, 80, len(REPLAY), 0,
                    len(REPLAY), prepare.checkpoint, b"")
            for prepare in prepares
        ]  # fmt: skip
        harness.send_packed(commits)
        await settle()
        [answers] = packed_answers(harness)
        assert [(a.phase, a.client_port, a.status) for a in answers] == [
            (Phase.COMMIT, 40000, Status.LATE),
            (Phase.COMMIT, 40001, Status.LATE),
        ]
        states = {pending.machine.state for pending in harness.live.pending.values()}
        assert states == {ServerState.PREPARED}  # nothing restored
        await harness.live.close()

    asyncio.run(scenario())


def test_a_packed_cell_mixing_groups_is_refused_and_creates_nothing() -> None:
    """A cell holds PREPAREs, or COMMITs, or GOs and ABORTs: one mixing them could not be
    answered with one cell (cover would show it), and is refused whole."""

    async def scenario() -> None:
        harness = Harness()
        prepare = harness.prepare()
        harness.send_packed(
            [prepare, Request(Phase.GO, harness.epoch, 40001, 80, 0, 0, 0, b"", b"")]
        )
        await settle()
        assert harness.connects == 0
        assert harness.live.pending == {}
        assert harness.transport.sent == []
        assert harness.live.counts["refused"] == 1
        harness.send(prepare)  # the same PREPARE alone is taken: the cell was not recorded
        await settle()
        assert harness.connects == 1
        await harness.live.close()

    asyncio.run(scenario())


def test_a_go_after_the_window_starts_until_the_gate_has_closed_and_never_after() -> None:
    """A hand-over that ended at the boundary: its GO comes after the epoch's window closed
    but before the shim's tick has closed the gate (and left every connection). Its client
    has switched here: refused, the connection would meet no socket and a RST until the gate
    closed; started, the leave that follows pushes its checkpoint and leaves it like the
    others. Once the gate has closed, or with k of N (a client's connections are left while
    the gate stays open), a restored connection never starts behind a closed window."""
    harness = Harness()
    schedule = harness.pool.schedule
    start = schedule.start_of(harness.epoch)
    harness.now = schedule.served_until(harness.epoch, start + 9.0) + 0.05
    gate = {"open": True}
    port = harness.live.port
    port.context = dataclasses.replace(harness.context, gate_open=lambda: gate["open"])
    assert port.behind_closed_gate(harness.epoch)  # the window has closed
    assert not port.start_behind_closed_gate(harness.epoch)  # the gate not yet
    gate["open"] = False
    assert port.start_behind_closed_gate(harness.epoch)
    gate["open"] = True
    port.context = dataclasses.replace(port.context, client_leaving_at=lambda client_id: None)
    assert port.start_behind_closed_gate(harness.epoch)
    # Inside the window, nothing changes: it starts whatever the gate says.
    harness.now = start + 0.01
    assert not port.start_behind_closed_gate(harness.epoch)
