"""Pure parts of the frozen-segment hold: nfnetlink_queue messages, the port of a held
segment, the iptables rule and the client rules that mark segments for it."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from client_shim.rules import OUT_PRIORITY, rewrite_table_body
from migrate.endpoints import Endpoint
from migrate.kernel.nfnetlink import NLMSG_ERROR
from migrate.kernel.nfnetlink import attr as _attr
from migrate.kernel.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    NFNL_SUBSYS_QUEUE,
    NFQA_MARK,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_VERDICT_HDR,
    NFQNL_MSG_PACKET,
    NFQNL_MSG_VERDICT,
    HeldPacket,
    held_packet,
    parse_messages,
    queue_message,
    verdict_attrs,
)
from migrate.kernel.xtqueue import HOLD_MARK_BASE, hold_mark, rule_args

ports = st.integers(0, 0xFFFF)


def tcp_source_port(packet: bytes) -> int | None:
    return held_packet(0, packet).sport


def ipv4_tcp(sport: int, options: bytes = b"", protocol: int = 6) -> bytes:
    ihl = 5 + len(options) // 4
    header = bytes([0x40 | ihl, 0]) + b"\x00" * 7 + bytes([protocol]) + b"\x00" * 10 + options
    return header + struct.pack("!HH", sport, 80) + b"\x00" * 16


def ipv6_tcp(sport: int, next_header: int = 6) -> bytes:
    return (
        bytes([0x60])
        + b"\x00" * 5
        + bytes([next_header])
        + b"\x00" * 33
        + struct.pack("!HH", sport, 80)
    )


@given(ports, st.integers(0, 10))
def test_the_source_port_of_an_ipv4_segment_with_any_options(sport: int, words: int) -> None:
    assert tcp_source_port(ipv4_tcp(sport, b"\x01" * 4 * words)) == sport


@given(ports)
def test_the_source_port_of_an_ipv6_segment(sport: int) -> None:
    assert tcp_source_port(ipv6_tcp(sport)) == sport


@given(st.binary(max_size=80))
def test_any_bytes_give_a_port_or_none_and_never_raise(data: bytes) -> None:
    port = tcp_source_port(data)
    assert port is None or 0 <= port <= 0xFFFF


def test_what_is_not_a_readable_tcp_segment_has_no_port() -> None:
    assert tcp_source_port(ipv4_tcp(1234, protocol=17)) is None  # UDP
    assert tcp_source_port(ipv6_tcp(1234, next_header=0)) is None  # an extension header
    assert tcp_source_port(ipv4_tcp(1234)[:21]) is None  # cut inside the ports
    assert tcp_source_port(bytes([0x44]) + ipv4_tcp(1234)[1:]) is None  # IHL below 5
    assert tcp_source_port(b"") is None


def packet_message(packet_id: int, payload: bytes | None) -> bytes:
    attrs = [_attr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3) + b"\x00")]
    if payload is not None:
        attrs.append(_attr(NFQA_PAYLOAD, payload))
    return queue_message(7, NFQNL_MSG_PACKET, attrs, 0, 0)


def ack(seq: int, code: int) -> bytes:
    body = struct.pack("=i", -code) + b"\x00" * 16
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, 0, seq, 0) + body


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), ports), max_size=20))
def test_held_packets_are_read_in_order_from_one_datagram(held: list[tuple[int, int]]) -> None:
    data = b"".join(packet_message(i, ipv4_tcp(port)) for i, port in held)
    packets, code = parse_messages(memoryview(data))
    assert ([(p.id, p.sport) for p in packets], code) == (held, None)


def test_the_acknowledgment_asked_for_is_found_and_others_ignored() -> None:
    data = ack(3, 0) + packet_message(9, None) + ack(4, 1)
    packets, code = parse_messages(memoryview(data), 4)
    assert (packets, code) == ([HeldPacket(9, None)], 1)
    assert parse_messages(memoryview(data), 5) == ([HeldPacket(9, None)], None)


@given(st.binary(max_size=200))
def test_a_malformed_datagram_never_raises(data: bytes) -> None:
    packets, _code = parse_messages(memoryview(data), 1)
    assert all(isinstance(p, HeldPacket) for p in packets)


def test_a_verdict_releases_with_the_mark_given_back_or_drops() -> None:
    accept = queue_message(7, NFQNL_MSG_VERDICT, verdict_attrs(42, True, 0), 0, 1)
    length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", accept)
    assert (length, kind, seq) == (len(accept), NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT, 1)
    assert struct.unpack_from("!BBH", accept, 16) == (0, 0, 7)  # AF_UNSPEC, v0, queue 7
    assert accept[20:] == _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, 42)) + _attr(
        NFQA_MARK, struct.pack("!I", 0)
    )
    drop = verdict_attrs(42, False, 0)
    assert drop == [_attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_DROP, 42))]


def test_the_rule_queues_only_its_own_mark_and_lets_packets_pass_without_a_reader() -> None:
    args = rule_args(517)
    assert hold_mark(517) == HOLD_MARK_BASE | 517
    assert args[args.index("--mark") + 1] == f"{HOLD_MARK_BASE | 517:#x}"
    assert args[args.index("--queue-num") + 1] == "517"
    assert "--queue-bypass" in args
    assert args[0] == "OUTPUT"


def test_the_client_rules_mark_frozen_segments_only_when_holding() -> None:
    vip = ipaddress.ip_address("10.9.0.1")
    server = Endpoint(vip, 80)
    held = rewrite_table_body(vip, 80, (server,), server, 5, hold_mark(5))
    dropped = rewrite_table_body(vip, 80, (server,), server, 5)
    mark = f"{hold_mark(5):#x}"
    assert f"tcp sport @frozen meta mark 0 meta mark set {mark}" in held
    assert f"tcp sport @frozen meta mark != {mark} drop" in held
    assert "tcp sport @frozen drop" in dropped
    assert "meta mark set" not in dropped
    # A SYN in the hold: held with them (copied first, by the later rules) or dropped.
    syn_hold = "tcp flags & (syn|ack) == syn tcp dport @syn_hold"
    assert f"{syn_hold} meta mark 0 meta mark set {mark}" in held
    assert f"{syn_hold} meta mark != {mark} drop" in held
    assert f"{syn_hold} drop" in dropped
    for body in (held, dropped):
        chain = body[body.index("chain capture_out") :]
        assert chain.index(syn_hold) < chain.index("tcp flags & (fin|syn|psh) != 0 log group")
    # The rewrite runs after iptables' raw table (-300), before conntrack (-200).
    assert -300 < OUT_PRIORITY < -200
    assert f"type route hook output priority {OUT_PRIORITY};" in held


def segment(payload: bytes = b"", flags: int = 0x10, ip_options: bytes = b"") -> bytes:
    """An IPv4 TCP segment with its lengths right (doff 5)."""
    ihl = 5 + len(ip_options) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 5 << 4, flags, 500, 0, 0)
    total = 4 * ihl + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0, 0, 64, 6, 0, bytes(4), bytes(4))
    return ip + ip_options + tcp + payload


def ipv6_segment(payload: bytes = b"", flags: int = 0x10) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 5 << 4, flags, 500, 0, 0)
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, bytes(16), bytes(16))
    return ip + tcp + payload


@given(st.binary(min_size=1, max_size=40), st.sampled_from([0, 4, 8]))
def test_a_segment_with_payload_is_not_a_pure_ack(payload: bytes, words: int) -> None:
    packet = segment(payload, ip_options=b"\x01" * words)
    assert held_packet(1, packet[:64]) == HeldPacket(1, 40000, False)
    assert held_packet(1, ipv6_segment(payload)[:64]) == HeldPacket(1, 40000, False)


def test_a_pure_ack_is_told_apart_from_syn_fin_and_data() -> None:
    assert held_packet(1, segment()).pure_ack
    assert held_packet(1, ipv6_segment()).pure_ack
    assert not held_packet(1, segment(flags=0x11)).pure_ack  # FIN
    assert not held_packet(1, segment(flags=0x02)).pure_ack  # SYN
    assert not held_packet(1, segment(b"x", flags=0x18)).pure_ack
    # A copy too short to say: not a pure ACK (sent on rather than lost).
    assert not held_packet(1, segment()[:30]).pure_ack
