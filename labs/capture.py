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
