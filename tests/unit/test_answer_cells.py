"""The client reads every answer of a packed answer cell (migrate.gathering): each reaches its
connection's hand-over; cover reaches none; a malformed cell is rejected whole and delivers
nothing; a replayed cell delivers nothing again."""

from __future__ import annotations

import os

from client_shim.requests import RequestChannel
from migrate.channel import Kind
from migrate.cover import ANSWER_CELL_BYTES, CoverConfig, cover, frame_many
from migrate.kernel.eventlog import EventLog
from migrate.registration import Bundle
from migrate.reincarnation import Answer, Phase, Status, answer_sealer

from .test_urgent_requests import ALICE, DEPLOYMENT, SECRET


def test_every_answer_of_a_packed_cell_is_delivered_once() -> None:
    bundle = Bundle.issue(DEPLOYMENT, SECRET, ALICE, os.urandom)
    delivered: list[Answer] = []
    channel = RequestChannel(
        bundle,
        EventLog("client", stream=None),
        clock=lambda: 0.5,
        clock_offset=lambda: 0.0,
        on_answer=lambda answer, now: delivered.append(answer),
        migration_port=47476,
        cover_config=CoverConfig(rate=0),  # on_datagram only: nothing is sent
    )
    sealer = answer_sealer(bundle.channel_key, DEPLOYMENT.deployment_id, ALICE.client_id, 1)
    server = ("127.0.0.3", 47476)
    answers = [
        Answer(Phase.PREPARE, 40000, Status.READY),
        Answer(Phase.PREPARE, 40001, Status.FAILED, "the service closed after 0 bytes"),
        Answer(Phase.PREPARE, 40002, Status.READY),
    ]
    cell = sealer.seal(
        Kind.REINCARNATE_READY, frame_many([a.encode() for a in answers], ANSWER_CELL_BYTES), 0.5
    )
    channel.on_datagram(cell, server)
    assert delivered == answers
    channel.on_datagram(cell, server)  # replayed: nothing again
    assert delivered == answers
    channel.on_datagram(sealer.seal(Kind.REINCARNATE_READY, cover(ANSWER_CELL_BYTES), 0.5), server)
    assert delivered == answers
    assert channel.cover_answers == 1
    bad = frame_many([answers[0].encode(), b"\x09\x00"], ANSWER_CELL_BYTES)  # a bad second
    channel.on_datagram(sealer.seal(Kind.REINCARNATE_READY, bad, 0.5), server)
    assert delivered == answers  # rejected whole: not even its good first answer
