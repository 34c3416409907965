"""A bounded one-way UDP loss probe, run as a script inside lab hosts (standard library only).

iperf3 (3.12) cannot serve as the loss probe: its UDP test starts with one unacknowledged
datagram, and when the lossy link drops that one the test hangs. Here the sender sends ``count``
numbered datagrams at a fixed pace; the receiver counts distinct numbers until it has seen them
all, has been idle for ``idle_s`` after the first one, or reaches ``timeout_s``, then prints one
JSON line. Both ends are bounded in packets and in time.

    python udp_probe.py receive --bind 10.0.1.2 --port 9000 --timeout-s 30
    python udp_probe.py send --to 10.0.1.2 --port 9000 --count 3000 --interval-s 0.0005
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence

_HEADER = struct.Struct("!Q")
READY_LINE = "ready"


def receive(bind: str, port: int, expected: int, idle_s: float, timeout_s: float) -> dict[str, int]:
    seen: set[int] = set()
    duplicates = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((bind, port))
        print(READY_LINE, flush=True)
        deadline = time.monotonic() + timeout_s
        last_packet: float | None = None
        while len(seen) < expected:
            now = time.monotonic()
            limit = deadline if last_packet is None else min(deadline, last_packet + idle_s)
            if now >= limit:
                break
            sock.settimeout(limit - now)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            last_packet = time.monotonic()
            if len(data) < _HEADER.size:
                continue
            (number,) = _HEADER.unpack_from(data)
            if number in seen:
                duplicates += 1
            elif number < expected:
                seen.add(number)
    return {"received": len(seen), "duplicates": duplicates, "expected": expected}


def send(to: str, port: int, count: int, interval_s: float, size: int) -> dict[str, int]:
    padding = b"\0" * max(0, size - _HEADER.size)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        start = time.monotonic()
        for number in range(count):
            # pace against the schedule, not the previous send, so that the rate holds
            delay = start + number * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                sock.sendto(_HEADER.pack(number) + padding, (to, port))
                sent += 1
            except OSError:
                pass  # a full local queue drops the datagram: counted as lost
    return {"sent": sent}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    modes = parser.add_subparsers(dest="mode", required=True)
    receiver = modes.add_parser("receive")
    receiver.add_argument("--bind", required=True)
    receiver.add_argument("--port", type=int, required=True)
    receiver.add_argument("--count", type=int, required=True)
    receiver.add_argument("--idle-s", type=float, default=1.0)
    receiver.add_argument("--timeout-s", type=float, default=60.0)
    sender = modes.add_parser("send")
    sender.add_argument("--to", required=True)
    sender.add_argument("--port", type=int, required=True)
    sender.add_argument("--count", type=int, required=True)
    sender.add_argument("--interval-s", type=float, default=0.0005)
    sender.add_argument("--size", type=int, default=200)
    args = parser.parse_args(argv)
    if args.mode == "receive":
        result = receive(args.bind, args.port, args.count, args.idle_s, args.timeout_s)
    else:
        result = send(args.to, args.port, args.count, args.interval_s, args.size)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
