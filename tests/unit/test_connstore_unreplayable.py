"""The client knows on its own when a connection cannot be replayed (migrate.connstore, pure):
its first client bytes are a TLS ClientHello or an SSH banner. It stores nothing more for it,
and the reason is the one its reset at the roam names."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from migrate.connstore import ConnectionStore

PORT = 40000
ISN = 1000
# The start of a real TLS 1.2/1.3 ClientHello record: handshake (22), version 3.1, length.
CLIENT_HELLO = bytes.fromhex("160301020001000200030300") + b"\x11" * 500
SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
HTTP_GET = b"GET /big HTTP/1.1\r\nHost: vip\r\n\r\n"


def fed(data: bytes, cuts: list[int] | None = None) -> ConnectionStore:
    store = ConnectionStore()
    store.on_syn(PORT, ISN, now=0.0)
    position = 0
    for size in cuts or [len(data)]:
        if position >= len(data):
            break
        store.on_segment(PORT, ISN + 1 + position, data[position : position + size], False, 0.1)
        position += size
    if position < len(data):
        store.on_segment(PORT, ISN + 1 + position, data[position:], False, 0.1)
    return store


def test_a_tls_client_hello_makes_the_connection_unmigratable_and_stores_nothing():
    store = fed(CLIENT_HELLO)
    conn = store.connections[PORT]
    assert conn.unmigratable == "not replayable: TLS (end-to-end encryption)"
    assert conn.stored_bytes == 0
    assert store.replay_bytes(PORT, 0) is None
    # Later bytes are not stored either.
    store.on_segment(PORT, ISN + 1 + len(CLIENT_HELLO), b"\x17\x03\x03" + b"x" * 4000, False, 0.2)
    assert conn.stored_bytes == 0


def test_an_ssh_banner_makes_the_connection_unmigratable():
    conn = fed(SSH_BANNER).connections[PORT]
    assert conn.unmigratable == "not replayable: SSH (server-chosen randomness)"


def test_an_http_request_stays_migratable_with_its_bytes():
    store = fed(HTTP_GET)
    assert store.connections[PORT].unmigratable is None
    assert store.replay_bytes(PORT, 0) == HTTP_GET


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_detection_does_not_depend_on_how_the_bytes_were_cut(cuts: list[int]) -> None:
    assert fed(CLIENT_HELLO, cuts).connections[PORT].unmigratable is not None
    assert fed(SSH_BANNER, cuts).connections[PORT].unmigratable is not None
    store = fed(HTTP_GET, cuts)
    assert store.connections[PORT].unmigratable is None
    assert store.replay_bytes(PORT, 0) == HTTP_GET
