"""Cover traffic on the migration port (migrate.cover): what goes where at each slot, and the
sizes it goes at. Time is simulated: slots over weeks, gaps of years, clock steps back."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrate.channel import Kind, Opener, Purpose, Sealer, derive_key
from migrate.cover import (
    ANSWER_CELL_BYTES,
    MAX_PACKED,
    CoverConfig,
    CoverSchedule,
    cell_room,
    cover,
    frame,
    frame_many,
    sealed_size,
    unframe,
    unframe_all,
)
from migrate.errors import ConfigError, MalformedMessageError
from migrate.reincarnation import (
    MAX_DETAIL_BYTES,
    Answer,
    Phase,
    Request,
    Status,
    pack_group,
    packable,
)
from tests.unit.budget import bounded_step

SERVERS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
KEY = derive_key(bytes(32), Purpose.REINCARNATE_C2S)


def sealed(plaintext: bytes) -> bytes:
    return Sealer(KEY, 1).seal(Kind.REINCARNATE_REQUEST, plaintext, 1000.0)


def request(replay: bytes = b"GET / HTTP/1.1\r\n\r\n", phase: Phase = Phase.PREPARE) -> Request:
    if phase in (Phase.GO, Phase.ABORT):
        return Request(phase, 7, 40000, 80, 0, 0, 0, b"", b"")
    return Request(phase, 7, 40000, 80, len(replay), 0, 0, bytes(191), replay)


@pytest.mark.parametrize("cell", [512, 1024, 1400])
def test_cover_and_every_small_request_seal_to_exactly_one_cell(cell: int) -> None:
    bodies = [request(phase=p).encode() for p in Phase] + [request(b"x" * 200).encode()]
    sizes = {len(sealed(frame(body, cell))) for body in bodies} | {len(sealed(cover(cell)))}
    assert sizes == {cell}


def test_every_answer_seals_to_the_answer_cell() -> None:
    answers = [
        Answer(Phase.PREPARE, 1, Status.READY),
        Answer(Phase.COMMIT, 65535, Status.FAILED, "x" * MAX_DETAIL_BYTES),
        Answer(Phase.PREPARE, 9, Status.DIVERGED, "é" * 100),
    ]
    sizes = {len(sealed(frame(a.encode(), ANSWER_CELL_BYTES))) for a in answers}
    assert sizes | {len(sealed(cover(ANSWER_CELL_BYTES)))} == {ANSWER_CELL_BYTES}


def test_a_request_larger_than_a_cell_goes_at_a_multiple_of_the_cell() -> None:
    body = request(b"y" * 3000).encode()
    assert len(sealed(frame(body, 1024))) == 4096
    big = request(b"z" * 60_000).encode()
    # Near the channel's limit the body still fits, unrounded.
    assert len(sealed(frame(big, 8192))) == sealed_size(len(big), 8192) <= 65000


def test_unframe_returns_the_body_none_for_cover_and_passes_unframed_bodies() -> None:
    body = request().encode()
    assert unframe(frame(body, 1024)) == body
    assert unframe(cover(1024)) is None
    assert unframe(body) == body  # an unframed request (phase byte 1 to 4) as before
    with pytest.raises(MalformedMessageError):
        unframe(b"")
    with pytest.raises(MalformedMessageError):
        unframe(bytes([0x80, 0xFF, 0xFF]) + b"short")
    with pytest.raises(MalformedMessageError):
        unframe(bytes([0x80, 0]))
    # A decoded framed request is the request.
    assert Request.decode(unframe(frame(body, 512)) or b"") == request()


def test_bad_configuration_is_refused_with_one_line() -> None:
    for bad in (
        {"rate": -1.0},
        {"rate": 0.01},
        {"rate": float("nan")},
        {"rate": 1e6},
        {"cell": 100},
        {"cell": 100_000},
        {"max_burst": 0},
    ):
        with pytest.raises(ConfigError) as error:
            CoverConfig(**bad)  # type: ignore[arg-type]
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError):
        CoverSchedule(SERVERS, CoverConfig(rate=0), 0.0)
    with pytest.raises(ConfigError):
        CoverSchedule([], CoverConfig(), 0.0)


def test_idle_slots_send_one_cover_cell_to_every_server_at_the_rate() -> None:
    config = CoverConfig(rate=20)
    schedule: CoverSchedule[str] = CoverSchedule(SERVERS, config, 100.0)
    sent: Counter[str] = Counter()
    now = 100.0
    for _ in range(200):  # ten simulated seconds, woken at each due time
        now += schedule.due_in(now)
        for server, items in schedule.take(now):
            assert items == ()
            sent[server] += 1
        assert schedule.take(now) == []  # a slot is taken once
    assert sent == dict.fromkeys(SERVERS, 200)
    assert now == pytest.approx(100.0 + 199 * config.period)


def test_a_real_message_takes_the_place_of_cover_and_every_server_gets_as_many() -> None:
    schedule: CoverSchedule[str] = CoverSchedule(SERVERS, CoverConfig(rate=10), 0.0)
    schedule.take(0.0)
    schedule.put("10.0.0.2", "prepare")
    assert schedule.take(0.05) == []  # waits for its slot
    slot = schedule.take(0.1)
    assert Counter(server for server, _ in slot) == dict.fromkeys(SERVERS, 1)
    assert [items for _, items in slot if items] == [("prepare",)]


def test_a_burst_widens_the_slot_for_every_server_up_to_the_bound() -> None:
    schedule: CoverSchedule[int] = CoverSchedule(SERVERS, CoverConfig(rate=10, max_burst=4), 0.0)
    for i in range(10):
        schedule.put("10.0.0.3", i)
    widths, real = [], []
    now = 0.0
    while schedule.queued():
        slot = schedule.take(now)
        counts = Counter(server for server, _ in slot)
        assert len(set(counts.values())) == 1, "every server gets as many cells"
        widths.append(counts["10.0.0.1"])
        real += [item for _, items in slot for item in items]
        now += 0.1
    assert widths == [4, 4, 2]
    assert real == list(range(10))  # in order, none lost


def test_unknown_server_is_refused_and_queues_are_bounded() -> None:
    schedule: CoverSchedule[int] = CoverSchedule(SERVERS, CoverConfig(), 0.0)
    with pytest.raises(ConfigError):
        schedule.put("10.9.9.9", 1)
    from migrate import cover as module

    for i in range(module.MAX_QUEUED + 5):
        schedule.put("10.0.0.1", i)
    assert schedule.queued() == module.MAX_QUEUED
    assert schedule.dropped == 5


@pytest.mark.parametrize("gap", [0.5, 3600.0, 86400.0 * 7, 86400.0 * 365 * 30])
def test_after_a_gap_one_slot_goes_not_the_missed_ones_in_constant_work(gap: float) -> None:
    schedule: CoverSchedule[str] = CoverSchedule(SERVERS, CoverConfig(rate=50), 1e9)
    schedule.take(1e9)
    with bounded_step(f"a slot after {gap} s"):
        slot = schedule.take(1e9 + gap)
    assert len(slot) == len(SERVERS)
    assert schedule.take(1e9 + gap) == []
    assert 0 < schedule.next_slot - (1e9 + gap) <= 0.02 + 1e-6


def test_a_clock_step_back_restarts_the_grid_instead_of_going_silent() -> None:
    schedule: CoverSchedule[str] = CoverSchedule(SERVERS, CoverConfig(rate=10), 5000.0)
    schedule.take(5000.0)
    # The clock goes back an hour: the next slot is at once, not an hour of silence.
    assert len(schedule.take(1400.0)) == len(SERVERS)
    assert schedule.due_in(1400.0) == pytest.approx(0.1)


def test_weeks_of_slots_keep_the_grid_without_drift() -> None:
    config = CoverConfig(rate=20)
    schedule: CoverSchedule[str] = CoverSchedule(SERVERS, config, 0.0)
    now = 0.0
    for day in range(21):
        # Woken a little late each time (a busy loop): the grid does not drift.
        for _ in range(100):
            now += schedule.due_in(now) + 0.003
            assert len(schedule.take(now)) == len(SERVERS)
        now = (day + 1) * 86400.0
    assert schedule.slots == 2100
    grid = schedule.next_slot / config.period
    assert grid == pytest.approx(round(grid), abs=1e-3)


def test_opening_a_cover_cell_yields_no_body() -> None:
    opener = Opener(KEY, kinds=frozenset({Kind.REINCARNATE_REQUEST}))
    opened = opener.open(sealed(cover(1024)), 1000.0)
    assert unframe(opened.plaintext) is None


def test_a_request_sent_again_replaces_the_queued_one_and_keeps_its_place():
    """Retries never pile up behind a burst: 1000 COMMITs, each sent again, stay 1000 cells."""
    config = CoverConfig(rate=20.0, cell=1024)
    schedule: CoverSchedule[str] = CoverSchedule(["a", "b"], config, now=0.0)
    for port in range(1000):
        schedule.put("a", f"commit {port}", key=("COMMIT", port))
    for port in range(1000):
        schedule.put("a", f"commit {port} again", key=("COMMIT", port))
    schedule.put("a", "unkeyed")
    assert schedule.queued() == 1001
    assert schedule.replaced == 1000
    sent: list[str] = []
    now = 0.0
    while schedule.queued():
        sent += [item for server, items in schedule.take(now) if server == "a" for item in items]
        now += config.period
    assert sent == [f"commit {port} again" for port in range(1000)] + ["unkeyed"]
    # Once sent, the key is free again: a new request of that key queues anew.
    schedule.put("a", "commit 0 third", key=("COMMIT", 0))
    assert schedule.queued() == 1


def test_an_urgent_slot_goes_at_once_to_every_server_and_leaves_the_grid_alone() -> None:
    schedule: CoverSchedule[str] = CoverSchedule(SERVERS, CoverConfig(rate=10), 0.0)
    schedule.take(0.0)
    assert schedule.take_urgent() == []  # nothing queued: no slot at all
    schedule.put("10.0.0.2", "commit")
    slot = schedule.take_urgent()
    assert Counter(server for server, _ in slot) == dict.fromkeys(SERVERS, 1)
    assert [items for _, items in slot if items] == [("commit",)]
    assert schedule.urgent_slots == 1
    assert schedule.next_slot == pytest.approx(0.1)  # the grid is where it was
    assert [items for _, items in schedule.take(0.1)] == [()] * len(SERVERS)


def test_an_urgent_slot_widens_for_a_burst_like_any_slot() -> None:
    schedule: CoverSchedule[int] = CoverSchedule(SERVERS, CoverConfig(rate=10, max_burst=4), 0.0)
    for i in range(6):
        schedule.put("10.0.0.1", i)
    slot = schedule.take_urgent()
    assert Counter(server for server, _ in slot) == dict.fromkeys(SERVERS, 4)
    assert [item for _, items in slot for item in items] == [0, 1, 2, 3]
    assert schedule.queued() == 2  # the rest in the next slot, urgent or on the grid


def go(port: int) -> Request:
    return Request(Phase.GO, 7, port, 80, 0, 0, 0, b"", b"")


def test_requests_share_cells_with_their_own_group_only_and_servers_get_as_many() -> None:
    """A roam's 1000 GOs go in some 42 cells per server, not 1000, and its PREPAREs and
    COMMITs four to a cell: the client seals, and every server opens and answers, that many
    fewer datagrams. A cell holds one group (GOs and ABORTs, PREPAREs, or COMMITs: a server
    answers it with one cell, migrate.gathering), in the queue's order; a request too large
    for a cell goes alone."""
    config = CoverConfig(rate=10, cell=1024)
    schedule: CoverSchedule[Request] = CoverSchedule(
        SERVERS, config, 0.0, packable=packable, pack_group=pack_group
    )
    for port in range(9):  # idle keep-alive connections: nothing to replay
        schedule.put("10.0.0.2", dataclasses.replace(request(b""), client_port=30000 + port))
    for port in range(1000, 2000):
        schedule.put("10.0.0.2", go(port), key=(Phase.GO, port))
    schedule.put("10.0.0.2", request(phase=Phase.COMMIT))
    schedule.put("10.0.0.2", go(5))
    schedule.put("10.0.0.2", request(b"x" * 900))  # a PREPARE too large to share a cell
    schedule.put("10.0.0.2", request(phase=Phase.COMMIT))
    schedule.put("10.0.0.2", request(phase=Phase.COMMIT))
    slot = schedule.take_urgent()
    counts = Counter(server for server, _ in slot)
    assert len(set(counts.values())) == 1, "every server gets as many cells"
    mine = [items for server, items in slot if server == "10.0.0.2"]
    assert cell_room(1024) // packable(request(b"")) == 4
    assert [len(items) for items in mine[:3]] == [4, 4, 1]
    assert {r.phase for items in mine[:3] for r in items} == {Phase.PREPARE}
    per_cell = cell_room(1024) // packable(go(1))
    assert per_cell == 24
    gos = mine[3 : 3 + -(-1000 // per_cell)]
    assert [len(items) for items in gos] == [per_cell] * 41 + [1000 - 41 * per_cell]
    sent = [r for items in mine for r in items]
    assert [r.client_port for r in sent if r.phase is Phase.GO] == [*range(1000, 2000), 5]
    rest = [[r.phase for r in items] for items in mine[3 + len(gos) :]]
    # The order is kept; the COMMIT and the GO after it, of other groups, go alone.
    assert rest == [[Phase.COMMIT], [Phase.GO], [Phase.PREPARE], [Phase.COMMIT, Phase.COMMIT]]
    assert schedule.packed == (9 - 3) + (1000 - len(gos)) + 1
    # Each cell seals to one cell on the wire (the large PREPARE to two), and unpacks to
    # what was packed.
    for items in mine:
        plaintext = frame_many([r.encode() for r in items], 1024)
        assert len(sealed(plaintext)) == (2048 if len(items[0].replay) == 900 else 1024)
        assert [Request.decode(b) for b in unframe_all(plaintext)] == list(items)
    assert schedule.queued() == 0


def test_a_request_s_packed_size_is_its_encoding_s() -> None:
    for made in (request(), request(b"y" * 500, Phase.COMMIT), go(3), request(phase=Phase.ABORT)):
        assert packable(made) == len(made.encode()) + 3
    streamed = Request(Phase.PREPARE, 7, 40000, 80, 50, 0, 0, bytes(191), b"z" * 50, streamed=20)
    assert packable(streamed) == len(streamed.encode()) + 3


def test_without_a_packable_rule_every_message_goes_alone() -> None:
    schedule: CoverSchedule[Request] = CoverSchedule(SERVERS, CoverConfig(rate=10), 0.0)
    for port in range(1, 6):
        schedule.put("10.0.0.1", go(port))
    slot = schedule.take_urgent()
    assert [len(items) for server, items in slot if server == "10.0.0.1"] == [1] * 5


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=MAX_PACKED))
def test_packed_bodies_unpack_in_order(bodies: list[bytes]) -> None:
    plaintext = frame_many(bodies, 1024)
    assert len(sealed(plaintext)) % 1024 == 0
    assert unframe_all(plaintext) == bodies
    assert unframe(plaintext) == bodies[0]


@given(st.binary(max_size=2000))
def test_unframe_all_takes_any_bytes_with_a_body_list_or_one_line_error(data: bytes) -> None:
    try:
        bodies = unframe_all(data)
    except MalformedMessageError as error:
        message = str(error)
        bodies = []
    else:
        message = ""
    assert "\n" not in message
    assert len(bodies) <= MAX_PACKED
    assert sum(len(b) for b in bodies) <= len(data)


def test_a_malformed_packed_cell_is_refused() -> None:
    body = go(1).encode()
    too_many = b"".join(bytes([0x80, 0, len(body)]) + body for _ in range(MAX_PACKED + 1))
    with pytest.raises(MalformedMessageError, match="more than"):
        unframe_all(too_many)
    with pytest.raises(MalformedMessageError, match="after a framed body"):
        unframe_all(bytes([0x80, 0, len(body)]) + body + b"\x01" + bytes(10))
    with pytest.raises(MalformedMessageError, match="claims"):
        unframe_all(bytes([0x80, 0, len(body)]) + body + bytes([0x80, 0xFF, 0xFF]) + body)
    with pytest.raises(MalformedMessageError):
        frame_many([], 1024)
    with pytest.raises(MalformedMessageError):
        frame_many([body] * (MAX_PACKED + 1), 8192)
