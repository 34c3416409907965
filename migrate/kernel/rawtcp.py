"""IPv4/TCP segments as bytes: strict parsing, building with checksums, and a raw sender.

Theory of operation. The client shim sees whole IP packets through NFLOG (``nflog.py``): the
carrier segments the server shim sends on a connection's own 5-tuple, copies of the client's
outgoing data segments, and SYNs. ``parse_ipv4_tcp`` turns such a packet into a
``TcpSegment``; it trusts nothing (the packet may come from an attacker) and raises
``MalformedPacketError``, a ``RemoteError`` with a one-line reason, for anything inconsistent:
header lengths, total length, option lengths. ``build_ipv4_tcp`` is the inverse, with a correct
IPv4 header checksum and TCP checksum (pseudo-header), and ``RawTcpSender`` puts such a packet
on the wire through a raw socket (``IPPROTO_RAW``, so the header is ours).

Carrier segments are marked with the shared experimental TCP option (RFC 6994): kind 253 whose
first two data bytes are the experiment identifier 0x5352 ("SR"). nftables matches them with
``tcp option @253,16,16 0x5352`` (bits 16..31 of the option: the two bytes after kind and
length).

Everything except ``RawTcpSender`` is pure and needs no privileges.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from migrate.errors import LocalError, RemoteError

# --- constants ------------------------------------------------------------------------------

IPPROTO_TCP: Final = 6
IPV4_HEADER_LEN: Final = 20
TCP_HEADER_LEN: Final = 20
MAX_TCP_OPTIONS_LEN: Final = 40  # data offset is 4 bits: at most 60 bytes of header
MAX_IPV4_PACKET: Final = 0xFFFF

# TCP header flags (RFC 9293; AE is RFC 9768, the bit left of CWR).
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
ECE: Final = 0x40
CWR: Final = 0x80
AE: Final = 0x100
ALL_FLAGS: Final = 0x1FF

# TCP option kinds.
TCPOPT_EOL: Final = 0
TCPOPT_NOP: Final = 1
TCPOPT_MSS: Final = 2
TCPOPT_WINDOW: Final = 3
TCPOPT_SACK_PERM: Final = 4
TCPOPT_SACK: Final = 5
TCPOPT_TIMESTAMP: Final = 8

# The carrier mark: RFC 6994 shared experimental option with a 16-bit experiment identifier.
CARRIER_OPTION_KIND: Final = 253
CARRIER_EXID: Final = 0x5352
_CARRIER_EXID_BYTES: Final = CARRIER_EXID.to_bytes(2, "big")

_IP_DF: Final = 0x4000
_IP_MF: Final = 0x2000
_IP_OFFSET_MASK: Final = 0x1FFF
_SEQ_MOD: Final = 1 << 32

_IPV4_HEADER: Final = struct.Struct("!BBHHHBBH4s4s")
_TCP_HEADER: Final = struct.Struct("!HHIIBBHHH")
_PSEUDO_HEADER: Final = struct.Struct("!4s4sBBH")


# --- errors ---------------------------------------------------------------------------------


class MalformedPacketError(RemoteError):
    """A captured packet is truncated or its header lengths are inconsistent."""


class PacketBuildError(LocalError, ValueError):
    """A field given to ``build_ipv4_tcp`` is out of range."""


class RawSocketError(LocalError, OSError):
    """The raw socket could not be opened or refused a packet; ``str()`` says why."""


# --- checksums ------------------------------------------------------------------------------


def internet_checksum(data: bytes) -> int:
    """The RFC 1071 checksum of ``data`` (ones' complement of the ones' complement sum).

    The ones' complement sum of 16-bit words is the big-endian value of the data modulo
    0xFFFF (2**16 is 1 modulo 0xFFFF), except that non-zero data summing to a multiple of
    0xFFFF gives 0xFFFF rather than 0. Computing it with one big-integer remainder is much
    faster in Python than adding 32 k words.
    """
    if len(data) % 2:
        data += b"\x00"
    value = int.from_bytes(data, "big")
    total = value % 0xFFFF
    if total == 0 and value != 0:
        total = 0xFFFF
    return ~total & 0xFFFF


def tcp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """The TCP checksum of ``segment`` (header with a zero checksum field, plus payload)
    between the 4-byte IPv4 addresses ``src`` and ``dst``."""
    pseudo = _PSEUDO_HEADER.pack(src, dst, 0, IPPROTO_TCP, len(segment))
    return internet_checksum(pseudo + segment)


# --- the segment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpSegment:
    """One IPv4 TCP segment. ``options`` lists (kind, data) without NOP and EOL; ``flags``
    holds the nine flag bits (``FIN`` ... ``AE``)."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: list[tuple[int, bytes]]
    payload: bytes
    ip_id: int
    ttl: int
    urgent: int = 0
    dont_fragment: bool = False

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def psh(self) -> bool:
        return bool(self.flags & PSH)

    @property
    def ack_flag(self) -> bool:
        """The ACK flag (``ack`` is the acknowledgment number)."""
        return bool(self.flags & ACK)

    @property
    def seq_end(self) -> int:
        """The sequence number after this segment: seq + payload + SYN + FIN (mod 2**32)."""
        return (self.seq + len(self.payload) + self.syn + self.fin) % _SEQ_MOD

    def option(self, kind: int) -> bytes | None:
        """The data of the first option of ``kind``, or ``None``."""
        for option_kind, data in self.options:
            if option_kind == kind:
                return data
        return None

    @property
    def mss(self) -> int | None:
        """The MSS option's value (SYN segments), or ``None``."""
        data = self.option(TCPOPT_MSS)
        return int.from_bytes(data, "big") if data is not None and len(data) == 2 else None

    @property
    def wscale(self) -> int | None:
        """The window scale option's shift (SYN segments), or ``None``."""
        data = self.option(TCPOPT_WINDOW)
        return data[0] if data is not None and len(data) == 1 else None


# --- parsing ----------------------------------------------------------------------------------


def _parse_options(raw: bytes) -> list[tuple[int, bytes]]:
    options: list[tuple[int, bytes]] = []
    i = 0
    while i < len(raw):
        kind = raw[i]
        if kind == TCPOPT_EOL:
            break  # the rest is padding
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(raw):
            raise MalformedPacketError(f"TCP option {kind} at offset {i} has no length byte")
        length = raw[i + 1]
        if length < 2:
            raise MalformedPacketError(f"TCP option {kind} has length {length} (minimum 2)")
        if i + length > len(raw):
            raise MalformedPacketError(
                f"TCP option {kind} of length {length} runs past the header "
                f"({len(raw) - i} option bytes left)"
            )
        options.append((kind, bytes(raw[i + 2 : i + length])))
        i += length
    return options


_inet_ntoa = socket.inet_ntoa


# The parts of a checked packet: (ip_id, frag, ttl, src, dst), the TCP header's fields
# (sport, dport, seq, ack, offset_byte, flag_byte, window, urgent), the TCP segment, its data
# offset.
_Parts = tuple[
    tuple[int, int, int, bytes, bytes], tuple[int, int, int, int, int, int, int, int], bytes, int
]


class CapturedSegment(NamedTuple):
    """What the client shim's capture needs of a segment (``segment_fields``): the addresses as
    their 4 bytes, no ``TcpSegment`` built."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes
    carrier: bool  # it carries the carrier option (``is_carrier``)


def _ipv4_tcp_parts(packet: bytes) -> _Parts | None:
    """Every check of ``parse_ipv4_tcp`` but the options', in its order, with its errors."""
    if not packet:
        raise MalformedPacketError("empty packet")
    version = packet[0] >> 4
    if version == 6:
        return None
    if version != 4:
        raise MalformedPacketError(f"IP version {version}, expected 4")
    if len(packet) < IPV4_HEADER_LEN:
        raise MalformedPacketError(f"truncated IPv4 header: {len(packet)} bytes")
    fields = _IPV4_HEADER.unpack_from(packet)
    ver_ihl, _tos, total_len, ip_id, frag, ttl, proto, _csum, src, dst = fields
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < IPV4_HEADER_LEN:
        raise MalformedPacketError(f"IPv4 header length {ihl} is below 20")
    if ihl > len(packet):
        raise MalformedPacketError(f"IPv4 header length {ihl} exceeds the {len(packet)} bytes")
    if total_len < ihl:
        raise MalformedPacketError(f"IPv4 total length {total_len} below header length {ihl}")
    if total_len > len(packet):
        raise MalformedPacketError(
            f"truncated IPv4 packet: total length {total_len}, {len(packet)} bytes captured"
        )
    if proto != IPPROTO_TCP:
        return None
    if frag & (_IP_MF | _IP_OFFSET_MASK):
        raise MalformedPacketError(
            f"IPv4 fragment (offset {(frag & _IP_OFFSET_MASK) * 8}"
            f"{', more fragments' if frag & _IP_MF else ''}) is not a whole TCP segment"
        )
    tcp = packet[ihl:total_len]
    if len(tcp) < TCP_HEADER_LEN:
        raise MalformedPacketError(f"truncated TCP header: {len(tcp)} bytes")
    sport, dport, seq, ack, offset_byte, flag_byte, window, _tcsum, urgent = (
        _TCP_HEADER.unpack_from(tcp)
    )
    data_offset = (offset_byte >> 4) * 4
    if data_offset < TCP_HEADER_LEN:
        raise MalformedPacketError(f"TCP data offset {data_offset} is below 20")
    if data_offset > len(tcp):
        raise MalformedPacketError(
            f"TCP data offset {data_offset} exceeds the {len(tcp)}-byte segment"
        )
    return (
        (ip_id, frag, ttl, src, dst),
        (sport, dport, seq, ack, offset_byte, flag_byte, window, urgent),
        tcp,
        data_offset,
    )


def parse_ipv4_tcp(packet: bytes) -> TcpSegment | None:
    """Parse an IPv4 packet carrying TCP.

    ``None`` for a well-formed IPv4 packet of another protocol, or for an IPv6 packet.
    ``MalformedPacketError`` (one-line reason) for a truncated packet, an IHL, total length or
    data offset inconsistent with the bytes present, a bad option length, or a fragment (which
    is not a whole segment). Bytes after the IPv4 total length (link-layer padding) are ignored.
    """
    parts = _ipv4_tcp_parts(packet)
    if parts is None:
        return None
    (ip_id, frag, ttl, src, dst), header, tcp, data_offset = parts
    sport, dport, seq, ack, offset_byte, flag_byte, window, urgent = header
    options = _parse_options(bytes(tcp[TCP_HEADER_LEN:data_offset]))
    return TcpSegment(
        src=_inet_ntoa(src),  # as str(IPv4Address), at a tenth of its cost (every copy)
        dst=_inet_ntoa(dst),
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flag_byte | ((offset_byte & 0x01) << 8),
        window=window,
        options=options,
        payload=bytes(tcp[data_offset:]),
        ip_id=ip_id,
        ttl=ttl,
        urgent=urgent,
        dont_fragment=bool(frag & _IP_DF),
    )


def segment_fields(packet: bytes) -> CapturedSegment | None:
    """``parse_ipv4_tcp`` for the client's capture, which reads a copy of every segment the
    client sends: the same checks and errors, and the same values, but only the fields it
    uses, with the addresses left as bytes (about a third of the cost: no ``TcpSegment``, no
    address strings)."""
    parts = _ipv4_tcp_parts(packet)
    if parts is None:
        return None
    (_ip_id, _frag, _ttl, src, dst), header, tcp, data_offset = parts
    sport, dport, seq, ack, offset_byte, flag_byte, _window, _urgent = header
    options = _parse_options(bytes(tcp[TCP_HEADER_LEN:data_offset]))  # checked as there
    return CapturedSegment(
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        flag_byte | ((offset_byte & 0x01) << 8),
        bytes(tcp[data_offset:]),
        _carries(options),
    )


# --- building ---------------------------------------------------------------------------------


def _check_range(name: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        raise PacketBuildError(f"{name} {value} is out of range 0..{maximum}")


def _address(name: str, value: str) -> bytes:
    try:
        return ipaddress.IPv4Address(value).packed
    except ValueError as error:
        raise PacketBuildError(f"{name} {value!r} is not an IPv4 address") from error


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """TCP options as bytes, padded with EOL to a multiple of 4. NOP is ``(1, b"")``."""
    out = bytearray()
    for kind, data in options:
        _check_range("TCP option kind", kind, 0xFF)
        if kind == TCPOPT_EOL:
            raise PacketBuildError("TCP option EOL (0) is padding; it cannot be listed")
        if kind == TCPOPT_NOP:
            if data:
                raise PacketBuildError("TCP option NOP (1) carries no data")
            out.append(TCPOPT_NOP)
            continue
        if len(data) > 0xFF - 2:
            raise PacketBuildError(f"TCP option {kind} data of {len(data)} bytes is too long")
        out += bytes((kind, len(data) + 2)) + data
    out += b"\x00" * (-len(out) % 4)
    if len(out) > MAX_TCP_OPTIONS_LEN:
        raise PacketBuildError(
            f"TCP options take {len(out)} bytes padded, more than {MAX_TCP_OPTIONS_LEN}"
        )
    return bytes(out)


def build_ipv4_tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: list[tuple[int, bytes]],
    payload: bytes,
    *,
    ttl: int = 64,
    ip_id: int = 0,
    urgent: int = 0,
    dont_fragment: bool = True,
) -> bytes:
    """An IPv4 packet (20-byte header, no IP options) carrying one TCP segment, with both
    checksums. ``PacketBuildError`` if a field is out of range or the packet exceeds 65535
    bytes.

    Sent through ``RawTcpSender``, the kernel keeps every byte except that an ``ip_id`` of 0 is
    replaced by one it picks (and the IP checksum recomputed): give a non-zero ``ip_id`` when
    the bytes on the wire must be exactly these.
    """
    src_bytes = _address("source", src)
    dst_bytes = _address("destination", dst)
    for name, value, maximum in (
        ("source port", sport, 0xFFFF),
        ("destination port", dport, 0xFFFF),
        ("sequence number", seq, _SEQ_MOD - 1),
        ("acknowledgment number", ack, _SEQ_MOD - 1),
        ("flags", flags, ALL_FLAGS),
        ("window", window, 0xFFFF),
        ("urgent pointer", urgent, 0xFFFF),
        ("ttl", ttl, 0xFF),
        ("ip_id", ip_id, 0xFFFF),
    ):
        _check_range(name, value, maximum)
    option_bytes = encode_options(options)
    header_len = TCP_HEADER_LEN + len(option_bytes)
    total_len = IPV4_HEADER_LEN + header_len + len(payload)
    if total_len > MAX_IPV4_PACKET:
        raise PacketBuildError(f"packet of {total_len} bytes exceeds {MAX_IPV4_PACKET}")
    offset_byte = ((header_len // 4) << 4) | (flags >> 8)
    tcp_header = _TCP_HEADER.pack(
        sport, dport, seq, ack, offset_byte, flags & 0xFF, window, 0, urgent
    )
    segment = tcp_header + option_bytes + payload
    checksum = tcp_checksum(src_bytes, dst_bytes, segment)
    segment = segment[:16] + checksum.to_bytes(2, "big") + segment[18:]
    frag = _IP_DF if dont_fragment else 0
    ip_header = _IPV4_HEADER.pack(
        0x45, 0, total_len, ip_id, frag, ttl, IPPROTO_TCP, 0, src_bytes, dst_bytes
    )
    ip_checksum = internet_checksum(ip_header)
    ip_header = ip_header[:10] + ip_checksum.to_bytes(2, "big") + ip_header[12:]
    return ip_header + segment


def checksums_valid(packet: bytes) -> bool:
    """Whether the IPv4 header checksum and the TCP checksum of ``packet`` are right.

    Packets copied at the output hook of a host with checksum offload carry only the
    pseudo-header sum in the TCP checksum field: expect ``False`` for those.
    """
    segment = parse_ipv4_tcp(packet)
    if segment is None:
        raise MalformedPacketError("not an IPv4 TCP packet")
    ihl = (packet[0] & 0x0F) * 4
    total_len = int.from_bytes(packet[2:4], "big")
    if internet_checksum(bytes(packet[:ihl])) != 0:
        return False
    pseudo = _PSEUDO_HEADER.pack(
        bytes(packet[12:16]), bytes(packet[16:20]), 0, IPPROTO_TCP, total_len - ihl
    )
    return internet_checksum(pseudo + bytes(packet[ihl:total_len])) == 0


# --- the carrier mark -------------------------------------------------------------------------


def carrier_option(data: bytes = b"") -> tuple[int, bytes]:
    """The option that marks a carrier segment: kind 253, ExID 0x5352, then ``data``."""
    return (CARRIER_OPTION_KIND, _CARRIER_EXID_BYTES + data)


def is_carrier(segment: TcpSegment) -> bool:
    """Whether ``segment`` carries the carrier option (kind 253 with ExID 0x5352)."""
    return _carries(segment.options)


def _carries(options: list[tuple[int, bytes]]) -> bool:
    return any(
        kind == CARRIER_OPTION_KIND and data[:2] == _CARRIER_EXID_BYTES for kind, data in options
    )


# --- sending ----------------------------------------------------------------------------------


class RawTcpSender:
    """Sends whole IPv4 packets (ours, header included) through an ``IPPROTO_RAW`` socket.

    The socket belongs to the network namespace of the thread that creates the sender. Needs
    CAP_NET_RAW. The packet is routed by its destination address and passes the sender's
    OUTPUT and POSTROUTING hooks like any locally generated packet.
    """

    def __init__(self) -> None:
        try:
            self._sock: socket.socket | None = socket.socket(
                socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW
            )
        except PermissionError as error:
            raise RawSocketError(
                errno.EPERM, "raw IPv4 sockets need CAP_NET_RAW (run the shim as root)"
            ) from error
        except OSError as error:
            code = error.errno or errno.EIO
            raise RawSocketError(
                code, f"cannot open a raw IPv4 socket: {os.strerror(code)}"
            ) from error

    def send(self, packet: bytes) -> None:
        """Send ``packet``, an IPv4 packet with its header, to its destination address."""
        if self._sock is None:
            raise RawSocketError(errno.EBADF, "the raw sender is closed")
        if len(packet) < IPV4_HEADER_LEN or packet[0] >> 4 != 4:
            raise PacketBuildError("not an IPv4 packet")
        destination = str(ipaddress.IPv4Address(bytes(packet[16:20])))
        try:
            sent = self._sock.sendto(packet, (destination, 0))
        except OSError as error:
            code = error.errno or errno.EIO
            raise RawSocketError(
                code, f"raw send to {destination} failed: {os.strerror(code)}"
            ) from error
        if sent != len(packet):
            raise RawSocketError(
                errno.EMSGSIZE, f"raw send to {destination}: {sent} of {len(packet)} bytes"
            )

    def fileno(self) -> int:
        if self._sock is None:
            raise RawSocketError(errno.EBADF, "the raw sender is closed")
        return self._sock.fileno()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> RawTcpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
