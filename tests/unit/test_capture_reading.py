"""``client_shim.capture.Capture`` reading copies (its NFLOG reader replaced by a list of
packets): what it stores and what it logs of the connections it finds unmigratable."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client_shim.capture import Capture
from labs.roaming import read_json_lines
from migrate.connstore import CLIENT_FIN
from migrate.endpoints import Endpoint
from migrate.kernel.eventlog import EventLog
from migrate.kernel.rawtcp import ACK, FIN, PSH, SYN, build_ipv4_tcp

CLIENT = "10.0.9.2"
VIP = "10.99.0.1"
PORT = 80


@dataclass
class FakeBundle:
    address: ipaddress.IPv4Address = field(default_factory=lambda: ipaddress.IPv4Address(CLIENT))
    vip: ipaddress.IPv4Address = field(default_factory=lambda: ipaddress.IPv4Address(VIP))
    service_port: int = PORT
    channel_key: bytes = bytes(32)
    deployment_id: bytes = bytes(16)
    client_id: int = 1

    def servers(self) -> tuple[Endpoint, ...]:
        return (Endpoint(ipaddress.IPv4Address("10.0.1.1"), PORT),)


@dataclass
class FakeReader:
    """What ``Capture`` reads of its NFLOG reader."""

    batches: list[list[bytes]]
    received: int = 0
    missed: int = 0
    overflowed: int = 0
    backlog: bool = False

    def read_payloads(self) -> list[bytes]:
        batch = self.batches.pop(0) if self.batches else []
        self.received += len(batch)
        return batch


def segment(port: int, seq: int, flags: int, payload: bytes = b"") -> bytes:
    return build_ipv4_tcp(CLIENT, VIP, port, PORT, seq, 1, flags, 1000, [], payload)


def opened_and_closed(port: int, request: bytes) -> list[bytes]:
    """A connection's copies: SYN, the request, the client's FIN at the end of it."""
    isn = 1000 * port
    return [
        segment(port, isn, SYN),
        segment(port, isn + 1, ACK | PSH, request),
        segment(port, isn + 1 + len(request), ACK | FIN),
    ]


def capture_reading(tmp_path: Path, batches: list[list[bytes]]) -> tuple[Capture, Path]:
    log = EventLog("client", json_path=tmp_path / "events.json", stream=None)
    capture = Capture(FakeBundle(), log, lambda: 100.0, lambda: 0.0)  # type: ignore[arg-type]
    capture.reader = FakeReader(batches)  # type: ignore[assignment]
    return capture, tmp_path / "events.json"


def logged(path: Path, name: str) -> list[dict[str, Any]]:
    """The events called ``name`` in the JSON log, without their time and component."""
    skip = {"ts", "component", "event"}
    return [
        {k: v for k, v in e.items() if k not in skip}
        for e in read_json_lines(path)
        if e["event"] == name
    ]


def test_connections_the_client_closed_in_one_read_are_reported_in_one_line(
    tmp_path: Path,
) -> None:
    copies = opened_and_closed(40001, b"GET / HTTP/1.1\r\n\r\n")
    copies += opened_and_closed(40002, b"GET /b HTTP/1.1\r\n\r\n")
    later = opened_and_closed(40003, b"GET /c HTTP/1.1\r\n\r\n")
    capture, log = capture_reading(tmp_path, [copies, later])
    capture.on_readable()
    capture.on_readable()
    capture.log.close()
    assert logged(log, "connection_unmigratable") == [
        {"level": "info", "ports": [40001, 40002], "count": 2, "reason": CLIENT_FIN},
        {"level": "info", "ports": [40003], "count": 1, "reason": CLIENT_FIN},
    ]
    assert capture.store.unmigratable == 3
    assert all(capture.store.connections[port].fin for port in (40001, 40002, 40003))


def test_a_connection_past_its_replay_bound_is_reported_alone_as_a_warning(
    tmp_path: Path,
) -> None:
    upload = b"PUT / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + bytes(5000)
    copies = opened_and_closed(40001, b"GET /a HTTP/1.1\r\n\r\n")
    copies += [segment(40009, 9, SYN), segment(40009, 10, ACK, upload)]
    capture, log = capture_reading(tmp_path, [copies])
    capture.store.per_connection_limit = 1000
    capture.on_readable()
    capture.log.close()
    reported = logged(log, "connection_unmigratable")
    assert [(f["level"], f.get("port"), f.get("ports")) for f in reported] == [
        ("warning", 40009, None),
        ("info", None, [40001]),
    ]


def test_malformed_copies_are_logged_and_the_others_kept(tmp_path: Path) -> None:
    good = opened_and_closed(40001, b"GET / HTTP/1.1\r\n\r\n")[:2]
    capture, log = capture_reading(tmp_path, [[good[0], b"\x45\x00", good[1]]])
    capture.on_readable()
    capture.log.close()
    assert [e["reason"] for e in logged(log, "capture_malformed")] == [
        "truncated IPv4 header: 2 bytes"
    ]
    assert capture.store.connections[40001].replay == bytearray(b"GET / HTTP/1.1\r\n\r\n")
