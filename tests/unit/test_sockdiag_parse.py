"""sock_diag's parser on synthetic ``inet_diag_msg`` messages: every ``tcp_info`` field read at
its offset (whole, and cut short as an older kernel sends it), addresses of both families,
and a dump's filter by destination that skips other sockets unparsed."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrate.kernel import sockdiag

TCP_INFO_BYTES = 280  # what this machine's kernel sends; the parser needs 236


def message(
    family: int,
    src: tuple[str, int],
    dst: tuple[str, int],
    tcp_info: bytes | None,
    state: int = 1,
) -> bytes:
    def address(text: str) -> bytes:
        packed = socket.inet_aton(text)
        return packed + bytes(12) if family == socket.AF_INET else bytes(10) + b"\xff\xff" + packed

    body = struct.pack("=BBBB", family, state, 0, 0)
    body += struct.pack("!HH16s16s", src[1], dst[1], address(src[0]), address(dst[0]))
    body += struct.pack("=III", 0, 7, 0) + struct.pack("=IIIII", 0, 3, 4, 0, 99)
    body += struct.pack("=HH", 5, 8) + b"\x01\x00\x00\x00"  # another attribute first
    if tcp_info is not None:
        body += struct.pack("=HH", 4 + len(tcp_info), sockdiag.INET_DIAG_INFO) + tcp_info
        body += bytes(-len(body) % 4)
    return body


def field_values(draw_bytes: bytes) -> tuple[bytes, dict[str, int]]:
    """A tcp_info of ``draw_bytes`` and the value each field must read as."""
    expected = {
        name: fmt.unpack_from(draw_bytes, offset)[0] for name, offset, fmt in sockdiag._TCPI_FIELDS
    }
    expected["snd_wscale"] = draw_bytes[6] & 0x0F
    expected["rcv_wscale"] = draw_bytes[6] >> 4
    return draw_bytes, expected


@given(st.binary(min_size=TCP_INFO_BYTES, max_size=TCP_INFO_BYTES))
def test_every_tcp_info_field_is_read_at_its_offset(raw: bytes) -> None:
    tcp_info, expected = field_values(raw)
    info = sockdiag.parse_diag_message(
        message(socket.AF_INET, ("10.0.2.1", 40000), ("10.0.0.100", 80), tcp_info)
    )
    assert info is not None
    assert info.has_info
    assert {name: getattr(info, name) for name in expected} == expected
    assert (info.src, info.dst, info.state) == (
        ("10.0.2.1", 40000),
        ("10.0.0.100", 80),
        "ESTABLISHED",
    )
    assert (info.cookie, info.rqueue, info.wqueue, info.inode) == (7, 3, 4, 99)


@given(st.integers(min_value=7, max_value=235), st.binary(min_size=236, max_size=236))
def test_a_short_tcp_info_reads_what_it_holds_and_zero_after(length: int, raw: bytes) -> None:
    _, whole = field_values(raw)
    info = sockdiag.parse_diag_message(
        message(socket.AF_INET, ("10.0.2.1", 40000), ("10.0.0.100", 80), raw[:length])
    )
    assert info is not None
    for name, offset, fmt in sockdiag._TCPI_FIELDS:
        assert getattr(info, name) == (whole[name] if offset + fmt.size <= length else 0), name
    assert (info.snd_wscale, info.rcv_wscale) == (whole["snd_wscale"], whole["rcv_wscale"])


def test_a_socket_without_tcp_info_has_zero_counters_and_says_so() -> None:
    info = sockdiag.parse_diag_message(
        message(socket.AF_INET, ("10.0.2.1", 40000), ("10.0.0.100", 80), None, state=6)
    )
    assert info is not None
    assert (info.state, info.has_info, info.bytes_received, info.snd_wscale) == (
        "TIME_WAIT",
        False,
        0,
        0,
    )
    with pytest.raises(AttributeError):  # still a frozen value
        info.state = "ESTABLISHED"  # type: ignore[misc]


def test_ipv4_mapped_and_real_ipv6_addresses() -> None:
    mapped = sockdiag.parse_diag_message(
        message(socket.AF_INET6, ("10.0.2.1", 1), ("10.0.0.100", 80), bytes(TCP_INFO_BYTES))
    )
    assert mapped is not None
    assert mapped.dst == ("10.0.0.100", 80)
    assert mapped.family == socket.AF_INET6
    real = bytearray(message(socket.AF_INET6, ("10.0.2.1", 1), ("10.0.0.100", 80), None))
    real[4 + 4 + 16 : 4 + 4 + 32] = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert sockdiag.parse_diag_message(bytes(real)) is None
    unbound = bytearray(real)
    unbound[4 + 4 + 16 : 4 + 4 + 32] = bytes(16)
    parsed = sockdiag.parse_diag_message(bytes(unbound))
    assert parsed is not None
    assert parsed.dst == ("0.0.0.0", 80)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_dump_for_one_destination_parses_only_its_sockets(monkeypatch, family) -> None:
    vip = ("10.0.0.100", 80)
    bodies = [
        message(family, ("10.0.2.1", 40000), vip, bytes(TCP_INFO_BYTES)),
        message(family, ("10.0.2.1", 40001), ("10.0.0.100", 81), bytes(TCP_INFO_BYTES)),
        message(family, ("10.0.2.1", 40002), ("10.0.0.101", 80), bytes(TCP_INFO_BYTES)),
        message(family, ("10.0.2.1", 40003), vip, None, state=6),
    ]
    monkeypatch.setattr(sockdiag, "_exchange", lambda *args: bodies)
    parsed = []
    real_parse = sockdiag.parse_diag_message

    def parse(body: bytes) -> sockdiag.TcpSocketInfo | None:
        parsed.append(body)
        return real_parse(body)

    monkeypatch.setattr(sockdiag, "parse_diag_message", parse)
    found = sockdiag._dump(family, sockdiag.TCPF_ALL, vip)
    assert [info.src[1] for info in found] == [40000, 40003]
    assert len(parsed) == 2  # the other two skipped unparsed
    assert [i.src[1] for i in sockdiag._dump(family, sockdiag.TCPF_ALL)] == [
        40000,
        40001,
        40002,
        40003,
    ]
