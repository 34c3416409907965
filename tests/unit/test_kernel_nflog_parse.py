"""Pure parts of ``migrate.kernel.nflog``: the capture's lean read of NFLOG packet messages
(``packet_payload``, ``NflogReader.read_payloads``) says what the full parse says."""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.kernel.nflog import (
    NFNL_SUBSYS_ULOG,
    NFULA_MARK,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULA_SEQ,
    NFULA_UID,
    NFULNL_MSG_PACKET,
    NflogReader,
    packet_payload,
    parse_packet_message,
)
from migrate.kernel.nfnetlink import NFGENMSG, NLATTR, NLMSG_DONE, NLMSGHDR

KINDS = st.sampled_from([NFULA_PAYLOAD, NFULA_SEQ, NFULA_MARK, NFULA_PREFIX, NFULA_UID, 0x3FFF])


@st.composite
def attribute_blocks(draw: st.DrawFn) -> bytes:
    """Attribute lists as the kernel sends them and as a forger might: repeated types, short
    or long values, the nested flag set, a declared length past the end, junk at the end."""
    block = b""
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(KINDS) | draw(st.sampled_from([0, 0x8000, 0x4000]))
        value = draw(st.binary(max_size=24))
        length = NLATTR.size + len(value)
        if draw(st.integers(0, 9)) == 0:
            length = draw(st.integers(0, 80))  # a lie about its own length
        block += NLATTR.pack(length, kind) + value + b"\x00" * (-len(value) % 4)
    return block + draw(st.binary(max_size=6))


@given(attribute_blocks())
@settings(max_examples=500)
def test_the_lean_parse_gives_the_full_parses_sequence_number_and_payload(block: bytes) -> None:
    full = parse_packet_message(3, socket.AF_INET, memoryview(block))
    assert packet_payload(memoryview(block)) == (full.seq, full.payload)


def packet_message(seq: int | None, payload: bytes) -> bytes:
    attrs = b""
    if seq is not None:
        attrs += NLATTR.pack(8, NFULA_SEQ) + struct.pack("!I", seq)
    attrs += NLATTR.pack(NLATTR.size + len(payload), NFULA_PAYLOAD) + payload
    attrs += b"\x00" * (-len(attrs) % 4)
    body = NFGENMSG.pack(socket.AF_INET, 0, 7) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, 0, 0, 0) + body


@given(
    st.lists(
        st.tuples(st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.binary(max_size=40)),
        max_size=8,
    )
)
def test_reading_payloads_counts_packets_and_losses_as_reading_packets_does(
    packets: list[tuple[int | None, bytes]],
) -> None:
    datagram = b"".join(packet_message(seq, payload) for seq, payload in packets)
    datagram += NLMSGHDR.pack(NLMSGHDR.size, NLMSG_DONE, 0, 0, 0)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        full, lean = NflogReader(one, 7), NflogReader(other, 7)
        found: list[bytes] = []
        full._parse_datagram(memoryview(datagram), ack_seq=None)
        lean._payloads_of(memoryview(datagram), found)
        assert found == [packet.payload for packet in full._pending]
        assert (lean.received, lean.missed) == (full.received, full.missed)
        assert lean.received == len(packets)
