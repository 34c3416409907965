"""Packet capture with tcpdump, and counting TCP packets by flag in a pcap.

tcpdump runs inside the node, on one interface, writing a pcap; ``-U`` writes each packet at
once and ``--immediate-mode`` hands it over without ring-buffer delay, so that what the test
did just before ``stop()`` is in the file. ``-Z root`` keeps tcpdump from dropping privileges
to a user that could not write into our (root-owned) directories.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labs.errors import LabError
from migrate.errors import ConfigError

if TYPE_CHECKING:
    from labs.node import Node

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
SETTLE_S = 0.2  # let packets already on the wire reach the capture before stopping it

_COUNTS = re.compile(r"^(\d+) packets? (captured|received by filter|dropped by kernel)", re.M)


@dataclass
class Capture:
    """A running (then finished) tcpdump; counts are filled in by ``stop()``."""

    node: str
    ifname: str
    path: Path
    process: subprocess.Popen[Any]
    packets_captured: int | None = None
    packets_dropped_by_kernel: int | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            time.sleep(SETTLE_S)
            self.process.terminate()
        try:
            _, stderr = self.process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate(timeout=STOP_TIMEOUT_S)
        text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
        counts = {kind: int(number) for number, kind in _COUNTS.findall(text)}
        self.packets_captured = counts.get("captured")
        self.packets_dropped_by_kernel = counts.get("dropped by kernel")


def start_capture(
    node: Node,
    ifname: str,
    path: Path,
    bpf_filter: Sequence[str],
    snaplen_bytes: int | None,
) -> Capture:
    """Start tcpdump and return once it is capturing (bounded wait)."""
    if isinstance(bpf_filter, str):
        raise ConfigError("bpf_filter must be a list of words, e.g. ['tcp', 'port', '80']")
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["tcpdump", "-i", ifname, "-w", str(path), "-U", "--immediate-mode", "-n", "-Z", "root"]
    if snaplen_bytes is not None:
        argv += ["-s", str(int(snaplen_bytes))]
    argv += list(bpf_filter)
    process = node.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    # tcpdump prints "listening on <if>" once the socket is bound; the first packets a test
    # sends after that are in the file.
    seen = b""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while b"listening on" not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
                detail = seen.decode(errors="replace").strip().splitlines()
                reason = detail[-1] if detail else "no output"
                raise LabError(f"tcpdump on {node.name}:{ifname} did not start: {reason}")
            if selector.select(timeout=remaining):
                chunk = os.read(process.stderr.fileno(), 4096)
                if not chunk:
                    continue
                seen += chunk
    return Capture(node.name, ifname, path, process)


def tcp_flag_counts(path: str | Path) -> Counter[str]:
    """How many TCP packets of the pcap carry each flag letter (``S``, ``A``, ``R``, ...)."""
    from scapy.layers.inet import TCP  # scapy is slow to import: only when counting
    from scapy.utils import PcapReader

    counts: Counter[str] = Counter()
    with PcapReader(str(path)) as reader:
        for packet in reader:
            if TCP in packet:
                for letter in set(str(packet[TCP].flags)):
                    counts[letter] += 1
    return counts


def count_tcp_packets(path: str | Path, flags: str = "R", *, port: int | None = None) -> int:
    """Count TCP packets that carry every flag in ``flags`` (default: RSTs), optionally only
    those with ``port`` as source or destination."""
    from scapy.layers.inet import TCP
    from scapy.utils import PcapReader

    wanted = set(flags)
    count = 0
    with PcapReader(str(path)) as reader:
        for packet in reader:
            if TCP not in packet:
                continue
            segment = packet[TCP]
            if port is not None and port not in (segment.sport, segment.dport):
                continue
            if wanted <= set(str(segment.flags)):
                count += 1
    return count


@dataclass(frozen=True)
class Reset:
    """One RST of a client's capture, and whether its connection was over before it."""

    line: str  # "client:port > server:port FLAGS seq N at T"
    after_close: bool  # the client kernel's answer to a segment for a connection closed for good


def client_resets(path: str | Path, service_port: int) -> list[Reset]:
    """Every RST in a client host's capture of its connections to ``service_port`` (in order).

    ``after_close`` marks the one kind that touches no connection: the client's kernel
    answering a segment that arrives after the connection has closed for good. Closed for good
    means both FINs were exchanged with the client closing second (the server's FIN came
    first, as an HTTP/1.0 server's does) and a server acknowledged the client's FIN: the
    passive closer keeps no TIME_WAIT, its socket is gone from that acknowledgement on, so any
    later segment for the 4-tuple draws a bare RST (flags R alone, sequence number = the
    segment's acknowledgement number, RFC 793) that no application can see. Two such segments
    are known: a second acknowledgement of the client's FIN (the server's TIME_WAIT answer to
    that FIN sent once more, because the first acknowledgement took longer than the client's
    retransmission timeout of at least 200 ms: a deep queue behind another download, a busy
    machine), and a SYN-ACK from a server that got the connection's first SYN just before a
    roam and keeps its half-open entry (its answers are dropped until the client comes back
    to that server). Every other RST is ``after_close=False``: any RST from a server, a
    client's RST|ACK (a socket destroyed, or closed with unread data), a RST before the close
    completed or answering another acknowledgement number.
    """
    from scapy.layers.inet import IP, TCP  # scapy is slow to import: only when reading
    from scapy.utils import PcapReader

    closing: dict[tuple[str, int], _Closing] = {}  # (client, port) -> how far it has closed
    last_ack: dict[tuple[str, int, str], int | None] = {}  # (client, port, server) -> its ACK
    found: list[Reset] = []
    with PcapReader(str(path)) as reader:
        for packet in reader:
            if IP not in packet or TCP not in packet:
                continue
            ip, segment = packet[IP], packet[TCP]
            flags = int(segment.flags)
            outbound = segment.dport == service_port
            if not outbound and segment.sport != service_port:
                continue
            client, port, server = (
                (ip.src, segment.sport, ip.dst) if outbound else (ip.dst, segment.dport, ip.src)
            )
            state = closing.setdefault((client, port), _Closing())
            if flags & _RST:
                line = (
                    f"{ip.src}:{segment.sport} > {ip.dst}:{segment.dport} {segment.flags} "
                    f"seq {segment.seq} at {float(packet.time):.3f}"
                )
                answered = last_ack.get((client, port, server))
                after_close = (
                    outbound
                    and flags & (_RST | _ACK | _SYN | _FIN) == _RST
                    and state.closed
                    and answered is not None
                    and segment.seq == answered
                )
                found.append(Reset(line, after_close))
                continue
            if outbound:
                if flags & _SYN and segment.seq != state.isn:
                    # A new connection on the port (a SYN sent again keeps its number).
                    state = closing[(client, port)] = _Closing(isn=segment.seq)
                    for key in [k for k in last_ack if k[:2] == (client, port)]:
                        del last_ack[key]
                if flags & _FIN and state.client_fin is None:
                    # The FIN's own number follows the segment's payload (the capture may be
                    # cut short: the length comes from the IP header).
                    payload = ip.len - 4 * ip.ihl - 4 * segment.dataofs
                    state.client_fin = (segment.seq + payload) % _SEQ_MOD
                    state.passive = state.server_fin
                continue
            if flags & _FIN and state.client_fin is None:
                state.server_fin = True
            ack = segment.ack if flags & _ACK else None
            last_ack[(client, port, server)] = ack
            if (
                state.client_fin is not None
                and state.passive
                and ack == (state.client_fin + 1) % _SEQ_MOD
            ):
                state.closed = True
    return found


@dataclass
class _Closing:
    isn: int | None = None
    server_fin: bool = False  # the server's FIN arrived (before the client's)
    client_fin: int | None = None  # the sequence number of the client's FIN
    passive: bool = False  # the client closed second: no TIME_WAIT on its side
    closed: bool = False  # ... and a server acknowledged its FIN: the socket is gone


_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_SEQ_MOD = 2**32
