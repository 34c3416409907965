"""The netlink batch and the script of element changes (``migrate.kernel.nftsets``), read
back field by field; that the kernel takes them alike is tests/system/test_kernel_nftsets.py."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_shim.rules import freeze_script, hold_script, switch_changes, switch_script
from migrate.endpoints import Endpoint
from migrate.kernel.nfnetlink import NLM_F_ACK, NLM_F_REQUEST, NLMSGHDR, attributes
from migrate.kernel.nftsets import (
    ELEMENTS_PER_MESSAGE,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    NLM_F_CREATE,
    Add,
    Element,
    Flush,
    batch,
    concat,
    script,
    service,
)

VIP = ipaddress.ip_address("10.0.0.100")
NEW = Endpoint(ipaddress.ip_address("10.0.1.3"), 8001)


def read_batch(data: bytes) -> list[tuple[int, int, int, int, dict[int, memoryview]]]:
    """(type, flags, seq, nfgenmsg family, attributes) of each message."""
    found = []
    offset = 0
    view = memoryview(data)
    while offset < len(data):
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        body = view[offset + NLMSGHDR.size : offset + length]
        found.append((kind, flags, seq, body[0], attributes(body[4:])))
        offset += (length + 3) & ~3
    return found


def elements(listed: memoryview) -> list[tuple[bytes, bytes | None]]:
    """(key, data) of each element of an NFTA_SET_ELEM_LIST_ELEMENTS attribute."""
    found = []
    offset = 0
    while offset < len(listed):
        length = int.from_bytes(listed[offset : offset + 2], "little")
        element = attributes(listed[offset + 4 : offset + length])
        key = bytes(attributes(element[1])[1])
        data = bytes(attributes(element[2])[1]) if 2 in element else None
        found.append((key, data))
        offset += (length + 3) & ~3
    return found


def test_a_switch_is_one_batch_of_acknowledged_messages_in_order() -> None:
    changes = switch_changes(VIP, 80, NEW, finished=[40003], held=[40001])
    data, doing = batch("ip", "roam_cli_7", changes, 100)
    count = len(doing)
    messages = read_batch(data)
    assert count == len(changes) == len(messages) - 2
    assert doing[:2] == ["flushing addr_out", "flushing port_out"]
    begin, *middle, end = messages
    assert (begin[0], begin[2]) == (NFNL_MSG_BATCH_BEGIN, 100)
    assert (end[0], end[2]) == (NFNL_MSG_BATCH_END, 100 + count + 1)
    for message in (begin, end):
        assert message[1] == NLM_F_REQUEST  # the batch's ends ask for nothing
    assert [m[2] for m in middle] == list(range(101, 101 + count))
    for (kind, flags, _seq, family, attrs), change in zip(middle, changes, strict=True):
        assert family == socket.AF_INET
        assert attrs[1].tobytes() == b"roam_cli_7\x00"
        assert flags & (NLM_F_REQUEST | NLM_F_ACK) == NLM_F_REQUEST | NLM_F_ACK
        if isinstance(change, Flush):
            assert kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM
            assert 3 not in attrs  # no elements: the whole set
        else:
            assert kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
            assert flags & NLM_F_CREATE
            assert attrs[2].tobytes() == change.name.encode() + b"\x00"
            assert elements(attrs[3]) == [(e.key, e.data) for e in change.elements]
    keyed = {m[4][2].tobytes(): elements(m[4][3]) for m in middle if 3 in m[4]}
    assert keyed[b"addr_out\x00"] == [(VIP.packed, NEW.address.packed)]
    assert keyed[b"port_out\x00"] == [(b"\x00\x50", b"\x1f\x41")]
    assert keyed[b"current\x00"] == [(NEW.address.packed + b"\x1f\x41\x00\x00", None)]
    assert keyed[b"finished\x00"] == [(b"\x9c\x43", None)]


def test_many_elements_go_in_several_messages_of_the_same_batch() -> None:
    ports = tuple(Element(str(p), service(p)) for p in range(1000))
    data, doing = batch("inet", "t", [Add("frozen", ports)], 0)
    count = len(doing)
    messages = read_batch(data)[1:-1]
    assert count == len(messages) == -(-1000 // ELEMENTS_PER_MESSAGE)
    sent = [key for m in messages for key, _ in elements(m[4][3])]
    assert sent == [service(p) for p in range(1000)]
    assert {m[3] for m in messages} == {1}  # NFPROTO_INET


def test_the_script_is_the_one_nft_reads() -> None:
    assert hold_script("t", VIP, 80) == "add element ip t syn_hold { 80 }\nflush set ip t fresh\n"
    assert freeze_script("t", VIP, 80, [40000, 40002], NEW).splitlines() == [
        "flush map ip t syn_addr",
        "flush map ip t syn_port",
        "add element ip t syn_addr { 10.0.0.100 : 10.0.1.3 }",
        "add element ip t syn_port { 80 : 8001 }",
        "flush set ip t syn_hold",
        "flush set ip t current",
        "add element ip t current { 10.0.1.3 . 8001 }",
        "add element ip t frozen { 40000, 40002 }",
    ]
    assert "frozen {" not in switch_script("t", VIP, 80, NEW)
    # An Add with nothing to add writes nothing (and sends nothing).
    assert script("ip", "t", [Add("frozen", ())]) == "\n"
    assert batch("ip", "t", [Add("frozen", ())], 0)[1] == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=17), min_size=1, max_size=4))
def test_a_concatenation_pads_every_field_to_32_bits(fields: list[bytes]) -> None:
    key = concat(*fields)
    offset = 0
    for field in fields:
        assert key[offset : offset + len(field)] == field
        padded = len(field) + (-len(field) % 4)
        assert key[offset + len(field) : offset + padded] == b"\x00" * (padded - len(field))
        offset = offset + padded
    assert len(key) == offset


def test_bad_input_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="port 65536 out of range"):
        service(65536)
    with pytest.raises(ValueError, match="unknown nft family 'bridge'"):
        batch("bridge", "t", [Flush("set", "frozen")], 0)
