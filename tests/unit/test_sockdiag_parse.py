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
    """An older kernel's shorter ``tcp_info``: the fields it lacks read 0, but the receive
    window reads None (a closed window is 0: a GO must not claim one the kernel never said)."""
    _, whole = field_values(raw)
    info = sockdiag.parse_diag_message(
        message(socket.AF_INET, ("10.0.2.1", 40000), ("10.0.0.100", 80), raw[:length])
    )
    assert info is not None
    for name, offset, fmt in sockdiag._TCPI_FIELDS:
        absent = None if name == "rcv_wnd" else 0
        assert getattr(info, name) == (whole[name] if offset + fmt.size <= length else absent), name
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


def test_the_destination_filter_is_the_kernels_bytecode() -> None:
    """One ``INET_DIAG_BC_D_COND`` (family, /32, port, address) whose "yes" ends the program
    and whose "no" jumps 4 bytes past it: the layout linux/inet_diag.h defines and the
    kernel's audit accepts (the real kernel's answer: tests/system/test_kernel_sockdiag.py)."""
    attribute = sockdiag.destination_filter(("10.0.0.100", 8080))
    length, kind = struct.unpack_from("=HH", attribute)
    assert (length, kind) == (len(attribute), sockdiag.INET_DIAG_REQ_BYTECODE) == (20, 1)
    code, yes, no = struct.unpack_from("=BBH", attribute, 4)
    assert (code, yes, no) == (sockdiag.INET_DIAG_BC_D_COND, 16, 20)
    family, prefix, port = struct.unpack_from("=BBxxi", attribute, 8)
    assert (family, prefix, port) == (socket.AF_INET, 32, 8080)
    assert attribute[16:20] == socket.inet_aton("10.0.0.100")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_dump_for_one_destination_asks_the_kernel_to_filter(monkeypatch, family) -> None:
    requests: list[bytes] = []

    def exchange(_kind: int, _flags: int, payload: bytes, _what: str) -> list[bytes]:
        requests.append(payload)
        return []

    monkeypatch.setattr(sockdiag, "_exchange", exchange)
    sockdiag._dump(family, sockdiag.TCPF_ALL, ("10.0.0.100", 80))
    sockdiag._dump(family, sockdiag.TCPF_ALL)
    filtered, whole = requests
    assert filtered == whole + sockdiag.destination_filter(("10.0.0.100", 80))
    assert whole[0] == family
