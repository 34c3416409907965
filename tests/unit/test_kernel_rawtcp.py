"""Pure parts of ``migrate.kernel.rawtcp``: parse/build round trips, hostile input, checksums
checked against scapy's."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, in4_chksum
from scapy.utils import checksum

from migrate.kernel.rawtcp import (
    ACK,
    AE,
    ALL_FLAGS,
    CARRIER_EXID,
    CARRIER_OPTION_KIND,
    FIN,
    PSH,
    RST,
    SYN,
    MalformedPacketError,
    PacketBuildError,
    TcpSegment,
    build_ipv4_tcp,
    carrier_option,
    checksums_valid,
    encode_options,
    internet_checksum,
    is_carrier,
    parse_ipv4_tcp,
    segment_fields,
)

addresses = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def option_lists(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """Options (kinds 2..255, no NOP/EOL) that fit in 40 bytes once padded."""
    options: list[tuple[int, bytes]] = []
    used = 0
    for _ in range(draw(st.integers(0, 6))):
        room = 40 - used - 2
        if room < 0:
            break
        data = draw(st.binary(max_size=min(room, 12)))
        options.append((draw(st.integers(2, 255)), data))
        used += 2 + len(data)
    return options


@st.composite
def segments(draw: st.DrawFn) -> dict[str, object]:
    return {
        "src": draw(addresses),
        "dst": draw(addresses),
        "sport": draw(u16),
        "dport": draw(u16),
        "seq": draw(u32),
        "ack": draw(u32),
        "flags": draw(st.integers(0, ALL_FLAGS)),
        "window": draw(u16),
        "options": draw(option_lists()),
        "payload": draw(st.binary(max_size=300)),
        "ttl": draw(st.integers(0, 255)),
        "ip_id": draw(u16),
        "urgent": draw(u16),
        "dont_fragment": draw(st.booleans()),
    }


def build(fields: dict[str, object]) -> bytes:
    return build_ipv4_tcp(**fields)  # type: ignore[arg-type]


@given(segments())
def test_build_then_parse_round_trips(fields: dict[str, object]) -> None:
    packet = build(fields)
    segment = parse_ipv4_tcp(packet)
    assert segment == TcpSegment(**fields)  # type: ignore[arg-type]
    assert checksums_valid(packet)


@given(segments(), st.data())
def test_any_truncation_raises_malformed(fields: dict[str, object], data: st.DataObject) -> None:
    packet = build(fields)
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(MalformedPacketError):
        parse_ipv4_tcp(packet[:cut])


@given(segments(), st.binary(min_size=1, max_size=20))
def test_trailing_bytes_after_total_length_are_ignored(
    fields: dict[str, object], trailer: bytes
) -> None:
    packet = build(fields)
    assert parse_ipv4_tcp(packet + trailer) == parse_ipv4_tcp(packet)


@given(segments(), st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=6))
@settings(max_examples=300)
def test_corrupted_headers_never_raise_anything_else(
    fields: dict[str, object], edits: list[tuple[int, int]]
) -> None:
    packet = bytearray(build(fields))
    for position, value in edits:
        if position < len(packet):
            packet[position] = value
    try:
        segment = parse_ipv4_tcp(bytes(packet))
    except MalformedPacketError as error:
        message = str(error)
        assert message
        assert "\n" not in message
        return
    if segment is None:
        return
    # a result is consistent with the bytes it came from
    ihl = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    doff = (packet[ihl + 12] >> 4) * 4
    assert segment.payload == bytes(packet[ihl + doff : total])
    assert len(segment.payload) == total - ihl - doff


def outcome(parse: Callable[[bytes], object], packet: bytes) -> object:
    """What ``parse`` makes of ``packet``: its result, or its error's class and line."""
    try:
        return parse(packet)
    except MalformedPacketError as error:
        return (type(error), str(error))


def captured_view(packet: bytes) -> object:
    """``parse_ipv4_tcp``'s outcome as ``segment_fields`` reports it."""
    result = outcome(parse_ipv4_tcp, packet)
    if not isinstance(result, TcpSegment):
        return result
    return (
        socket.inet_aton(result.src),
        socket.inet_aton(result.dst),
        result.sport,
        result.dport,
        result.seq,
        result.ack,
        result.flags,
        result.payload,
        is_carrier(result),
    )


def with_carrier(fields: dict[str, object]) -> dict[str, object]:
    options = fields["options"]
    assert isinstance(options, list)
    return {**fields, "options": [*options[:2], carrier_option()]}


@given(
    st.one_of(segments().map(build), segments().map(with_carrier).map(build)),
    st.lists(st.tuples(st.integers(0, 99), st.integers(0, 255)), max_size=6),
    st.integers(0, 400),
)
@settings(max_examples=500)
def test_the_captures_parse_gives_the_full_parses_values_and_errors(
    packet: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    """The client's capture reads every copy with ``segment_fields``: whatever the bytes
    (built segments, carriers among them, corrupted and truncated), it must say what
    ``parse_ipv4_tcp`` says, value for value or error for error."""
    data = bytearray(packet[: max(cut, 1)] if cut < len(packet) else packet)
    for position, value in edits:
        if position < len(data):
            data[position] = value
    assert outcome(segment_fields, bytes(data)) == captured_view(bytes(data))


@given(st.binary(max_size=120))
def test_random_bytes_never_raise_anything_else(packet: bytes) -> None:
    with contextlib.suppress(MalformedPacketError):
        parse_ipv4_tcp(packet)


@given(segments())
@settings(max_examples=200)
def test_checksums_match_scapy(fields: dict[str, object]) -> None:
    packet = build(fields)
    ours = IP(packet)
    # scapy's own checksum of exactly our bytes (re-serialising the packet could re-encode
    # options scapy knows, e.g. an empty kind-25 option, and so change the bytes summed).
    ihl = (packet[0] & 0x0F) * 4
    header = bytearray(packet[:ihl])
    header[10:12] = b"\0\0"
    assert checksum(bytes(header)) == ours.chksum
    segment = bytearray(packet[ihl:])
    segment[16:18] = b"\0\0"
    written = int.from_bytes(packet[ihl + 16 : ihl + 18], "big")
    assert in4_chksum(socket.IPPROTO_TCP, ours, bytes(segment)) == written
    if TCP not in ours:
        # scapy gives up on a TCP header holding an option it knows with a length it does not
        # expect (e.g. TCP-AO, kind 29, of 3 bytes); the checksum above is all we can compare.
        return
    # and scapy reads the same fields
    assert ours.src == fields["src"]
    assert ours[TCP].seq == fields["seq"]
    assert ours[TCP].ack == fields["ack"]
    assert bytes(ours[TCP].payload) == fields["payload"]


@given(st.binary(max_size=2000))
def test_internet_checksum_matches_scapy(data: bytes) -> None:
    from scapy.utils import checksum

    assert internet_checksum(data) == checksum(data)


def test_checksum_of_a_large_payload_matches_scapy() -> None:
    payload = bytes(range(256)) * 250
    packet = build_ipv4_tcp("10.0.0.1", "10.0.0.2", 1, 2, 3, 4, ACK | PSH, 5, [], payload)
    recomputed = IP(packet)
    del recomputed[TCP].chksum
    assert IP(bytes(recomputed))[TCP].chksum == IP(packet)[TCP].chksum


def test_known_packet_bytes() -> None:
    packet = build_ipv4_tcp(
        "10.0.0.1",
        "10.0.0.2",
        1234,
        80,
        1,
        2,
        SYN | ACK,
        65535,
        [(2, b"\x05\xb4"), (1, b""), carrier_option()],
        b"hello",
        ip_id=5,
    )
    assert packet.hex() == (
        "4500003900054000400626b80a0000010a000002"
        "04d2005000000001000000028012ffffc2bf0000"
        "020405b401fd045352000000"
        "68656c6c6f"
    )


def test_flag_helpers() -> None:
    fields = {"src": "1.2.3.4", "dst": "5.6.7.8", "sport": 1, "dport": 2, "seq": 10, "ack": 0}
    segment = parse_ipv4_tcp(
        build_ipv4_tcp(**fields, flags=SYN | FIN | AE, window=1, options=[], payload=b"ab")  # type: ignore[arg-type]
    )
    assert segment is not None
    assert segment.syn
    assert segment.fin
    assert not segment.rst
    assert not segment.psh
    assert not segment.ack_flag
    assert segment.flags & AE
    assert segment.seq_end == 14
    rst = parse_ipv4_tcp(
        build_ipv4_tcp(**fields, flags=RST | ACK, window=0, options=[], payload=b"")  # type: ignore[arg-type]
    )
    assert rst is not None
    assert rst.rst
    assert rst.ack_flag


def test_mss_and_wscale_helpers() -> None:
    packet = build_ipv4_tcp(
        "1.2.3.4", "5.6.7.8", 1, 2, 3, 0, SYN, 64240,
        [(2, b"\x05\xb4"), (4, b""), (8, bytes(8)), (1, b""), (3, b"\x07")], b"",
    )  # fmt: skip
    segment = parse_ipv4_tcp(packet)
    assert segment is not None
    assert segment.mss == 1460
    assert segment.wscale == 7
    assert segment.option(4) == b""
    assert segment.option(5) is None


def test_carrier_mark() -> None:
    assert carrier_option() == (CARRIER_OPTION_KIND, CARRIER_EXID.to_bytes(2, "big"))
    assert carrier_option(b"xy") == (253, b"SRxy")
    base = {"src": "1.2.3.4", "dst": "5.6.7.8", "sport": 1, "dport": 2, "seq": 0, "ack": 0}

    def segment(options: list[tuple[int, bytes]]) -> TcpSegment:
        parsed = parse_ipv4_tcp(
            build_ipv4_tcp(**base, flags=ACK, window=1, options=options, payload=b"")  # type: ignore[arg-type]
        )
        assert parsed is not None
        return parsed

    assert is_carrier(segment([carrier_option()]))
    assert is_carrier(segment([(8, bytes(8)), carrier_option(b"payload")]))
    assert not is_carrier(segment([(253, b"XX")]))  # another experiment
    assert not is_carrier(segment([(254, b"SR")]))
    assert not is_carrier(segment([(253, b"S")]))
    assert not is_carrier(segment([]))


def test_non_tcp_and_ipv6_give_none() -> None:
    udp = bytearray(build_ipv4_tcp("1.2.3.4", "5.6.7.8", 1, 2, 0, 0, 0, 0, [], b"x"))
    udp[9] = 17
    assert parse_ipv4_tcp(bytes(udp)) is None
    assert parse_ipv4_tcp(bytes([0x60]) + bytes(39)) is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p[:0], "empty"),
        (lambda p: bytes([0x55]) + p[1:], "version 5"),
        (lambda p: bytes([0x44]) + p[1:], "header length 16"),
        (lambda p: bytes([0x4F]) + p[1:], "header length 60 exceeds"),
        (lambda p: p[:2] + (19).to_bytes(2, "big") + p[4:], "total length 19"),
        (lambda p: p[:2] + (1000).to_bytes(2, "big") + p[4:], "truncated IPv4 packet"),
        (lambda p: p[:6] + b"\x20\x00" + p[8:], "fragment"),
        (lambda p: p[:6] + b"\x00\x05" + p[8:], "offset 40"),
        (lambda p: p[:32] + b"\x40" + p[33:], "data offset 16"),
        (lambda p: p[:32] + b"\xf0" + p[33:], "data offset 60 exceeds"),
    ],
)
def test_malformed_reasons(mutate: object, reason: str) -> None:
    packet = build_ipv4_tcp("1.2.3.4", "5.6.7.8", 1, 2, 0, 0, ACK, 0, [], b"data")
    with pytest.raises(MalformedPacketError, match=reason):
        parse_ipv4_tcp(mutate(packet))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (b"\x01" * 7 + b"\x02", "no length byte"),
        (b"\x01\x01\x01\x02", "no length byte"),
        (b"\x02\x01\x00\x00", "length 1"),
        (b"\x02\x00\x00\x00", "length 0"),
        (b"\x02\x08\x00\x00", "runs past"),
    ],
)
def test_malformed_options(options: bytes, reason: str) -> None:
    options = options + b"\x00" * (-len(options) % 4)
    packet = bytearray(build_ipv4_tcp("1.2.3.4", "5.6.7.8", 1, 2, 0, 0, ACK, 0, [], b""))
    packet[32] = ((20 + len(options)) // 4) << 4
    packet[40:40] = options
    packet[2:4] = len(packet).to_bytes(2, "big")
    with pytest.raises(MalformedPacketError, match=reason):
        parse_ipv4_tcp(bytes(packet))


def test_options_after_eol_are_padding() -> None:
    packet = bytearray(build_ipv4_tcp("1.2.3.4", "5.6.7.8", 1, 2, 0, 0, ACK, 0, [], b""))
    options = b"\x01\x00\x02\x08"  # NOP, EOL, then garbage that is never read
    packet[32] = 6 << 4
    packet[40:40] = options
    packet[2:4] = len(packet).to_bytes(2, "big")
    segment = parse_ipv4_tcp(bytes(packet))
    assert segment is not None
    assert segment.options == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sport": 70000}, "source port"),
        ({"seq": 2**32}, "sequence number"),
        ({"flags": 0x200}, "flags"),
        ({"ttl": 256}, "ttl"),
        ({"src": "::1"}, "not an IPv4 address"),
        ({"options": [(0, b"")]}, "EOL"),
        ({"options": [(1, b"x")]}, "NOP"),
        ({"options": [(30, bytes(39))]}, "more than 40"),
        ({"options": [(30, bytes(254))]}, "too long"),
        ({"payload": bytes(65536)}, "exceeds 65535"),
    ],
)
def test_build_rejects_out_of_range(change: dict[str, object], reason: str) -> None:
    fields: dict[str, object] = {
        "src": "1.2.3.4", "dst": "5.6.7.8", "sport": 1, "dport": 2, "seq": 0, "ack": 0,
        "flags": ACK, "window": 0, "options": [], "payload": b"",
    }  # fmt: skip
    fields.update(change)
    with pytest.raises(PacketBuildError, match=reason):
        build(fields)


def test_encode_options_pads_with_eol() -> None:
    assert encode_options([]) == b""
    assert encode_options([(1, b"")]) == b"\x01\x00\x00\x00"
    assert encode_options([(4, b"")]) == b"\x04\x02\x00\x00"
    assert len(encode_options([(8, bytes(8)), (1, b""), (1, b"")])) == 12


def test_checksums_valid_detects_corruption() -> None:
    packet = bytearray(build_ipv4_tcp("1.2.3.4", "5.6.7.8", 1, 2, 0, 0, ACK, 0, [], b"data"))
    assert checksums_valid(bytes(packet))
    packet[-1] ^= 1
    assert not checksums_valid(bytes(packet))
    packet[-1] ^= 1
    packet[8] ^= 1  # ttl: IP header checksum
    assert not checksums_valid(bytes(packet))


def test_ip_id_zero_is_kept_in_the_bytes() -> None:
    packet = build_ipv4_tcp("1.2.3.4", "5.6.7.8", 1, 2, 0, 0, ACK, 0, [], b"", ip_id=0)
    assert packet[4:6] == b"\x00\x00"
