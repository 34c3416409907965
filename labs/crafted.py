"""Crafted packets: ways to mangle an IPv4/TCP packet that a parser must survive (issue 7).

Each function takes the bytes of one IPv4 packet carrying TCP, with a 20-byte IP header (what
scapy builds without IP options), and returns the mangled bytes. They are used by the attack
tests, both in the test process and in scripts run inside a lab host (``from labs.crafted
import ...``: lab programs run from the project's root, as the shims do).

The manglers that break the TCP header or its options leave the TCP checksum as it was (wrong
for the new bytes); ``with_tcp_options`` and ``fix_tcp_checksum`` make packets whose only
oddity is the one wanted, so that they pass a receiver's checksum test and reach its option
parser.
"""

from __future__ import annotations

import struct

IP_HEADER_BYTES = 20
TCP_HEADER_BYTES = 20
MAX_TCP_OPTION_BYTES = 40
_NOP = 1


def bad_tcp_checksum(raw: bytearray) -> bytearray:
    """Flip every bit of the TCP checksum's high byte."""
    raw[36] ^= 0xFF
    return raw


def truncated_tcp_header(raw: bytearray) -> bytearray:
    """Cut the packet ten bytes into the TCP header."""
    return raw[:30]


def data_offset_past_end(raw: bytearray) -> bytearray:
    """Claim a 60-byte TCP header, whatever the packet holds."""
    raw[32] = 0xF0 | (raw[32] & 0x0F)
    return raw


def option_length_past_end(raw: bytearray) -> bytearray:
    """End the packet with an option (kind 253) whose length runs 38 bytes past it."""
    offset = (raw[32] >> 4) * 4 + 20
    return raw[: offset - 2] + bytearray([253, 40])


def tcp_checksum(raw: bytes) -> int:
    """The TCP checksum of ``raw`` (an IPv4 packet), computed as if its field were zero."""
    segment = bytearray(raw[IP_HEADER_BYTES:])
    if len(segment) >= 18:
        segment[16:18] = b"\x00\x00"
    pseudo = raw[12:20] + struct.pack("!BBH", 0, 6, len(segment))
    data = bytes(pseudo) + bytes(segment)
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fix_tcp_checksum(raw: bytearray) -> bytearray:
    """Make the TCP checksum right for the bytes as they are."""
    raw[36:38] = struct.pack("!H", tcp_checksum(bytes(raw)))
    return raw


def with_tcp_options(raw: bytearray, options: bytes) -> bytearray:
    """Replace the TCP options with ``options`` (any bytes, well-formed or not), padded with
    NOPs to a multiple of four; the data offset, the IP total length and the TCP checksum are
    made to match (the IP checksum is left to the kernel, which fills it in on a raw socket)."""
    if len(options) > MAX_TCP_OPTION_BYTES:
        raise ValueError(f"{len(options)} bytes of TCP options; at most {MAX_TCP_OPTION_BYTES}")
    padded = options + bytes([_NOP]) * (-len(options) % 4)
    header_end = IP_HEADER_BYTES + (raw[32] >> 4) * 4
    tcp_header = raw[IP_HEADER_BYTES : IP_HEADER_BYTES + TCP_HEADER_BYTES]
    packet = raw[:IP_HEADER_BYTES] + tcp_header + bytearray(padded) + raw[header_end:]
    packet[32] = (((TCP_HEADER_BYTES + len(padded)) // 4) << 4) | (packet[32] & 0x0F)
    packet[2:4] = struct.pack("!H", len(packet))
    return fix_tcp_checksum(packet)


__all__ = [
    "bad_tcp_checksum",
    "data_offset_past_end",
    "fix_tcp_checksum",
    "option_length_past_end",
    "tcp_checksum",
    "truncated_tcp_header",
    "with_tcp_options",
]
