"""Which connections a roam moves from the old server (``RoamRecord.note_old`` and
``answered_by_new``): every one captured when new SYNs were held, but those whose handshake
completes with the new server. Moving one of those would meet its own socket at the new server
("a socket with this 4-tuple still exists"); resetting it would break a working connection."""

from __future__ import annotations

from client_shim.roams import RoamRecord
from migrate.connstore import ConnectionStore
from migrate.handover import NotMoved


def store_with(*ports: int) -> ConnectionStore:
    store = ConnectionStore()
    for port in ports:
        store.on_syn(port, 1000 + port, 1.0)
    return store


def test_a_retransmitted_syn_is_counted_and_changes_nothing_else() -> None:
    store = store_with(40000)
    conn = store.connections[40000]
    store.on_syn(40000, 1000 + 40000, 2.0)
    assert store.connections[40000] is conn
    assert (conn.syns, conn.opened_at) == (2, 1.0)
    # A SYN of another ISN is another connection's (noted, not counted).
    store.on_syn(40000, 7, 3.0)
    assert conn.syns == 2
    assert conn.successor == (7, 3.0)


def test_the_candidates_are_the_connections_no_hand_over_has_yet() -> None:
    store = store_with(40000, 40001, 40002, 40003)
    store.connections[40003].fin = True  # closed by the client: no candidate
    record = RoamRecord(7, "10.0.1.2:80", 0.0)
    record.connections[40000] = NotMoved(40000, "unmigratable", "no checkpoint yet")
    record.note_old(store.connections)
    assert record.with_old == {40000, 40001, 40002, 40003}
    assert record.opening == {40001: 1, 40002: 1}


def test_established_by_the_freeze_and_no_syn_since_stay_with_the_old_server() -> None:
    store = store_with(40000, 40001, 40002, 40003)
    record = RoamRecord(7, "10.0.1.2:80", 0.0)
    record.note_old(store.connections)
    # After the freeze: 40001 still waits for its SYN-ACK (the old server's is dropped now);
    # 40002 sent its SYN again (to the new server) and is established there by the read;
    # 40003 closed and was forgotten.
    store.on_syn(40002, 1000 + 40002, 2.0)
    del store.connections[40003]
    taken = record.answered_by_new({40000, 40002, 40003}, store.connections)
    assert taken == {40001, 40002, 40003}
    assert record.with_old == {40000}


def test_nothing_is_taken_when_every_candidate_answered_the_old_server() -> None:
    store = store_with(40000, 40001)
    record = RoamRecord(7, "10.0.1.2:80", 0.0)
    record.note_old(store.connections)
    assert record.answered_by_new({40000, 40001}, store.connections) == set()
    assert record.with_old == {40000, 40001}
