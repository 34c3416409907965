"""The roaming benchmark's client programs, run inside the client's namespace as
``python -m labs.benchmarks.roaming --role stream-client|latency-client|hold-client``: each
prints one JSON line (hold-client: a ready line, then its results)."""

from __future__ import annotations

import hashlib
import json
import resource
import socket
import sys
import time
from typing import Any

from labs.benchmarks.roaming import GAP_FLOOR_S, HTTP_CHUNK
from labs.stats import p50_p99


def _raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _request(path: str, host: str, start: int = 0) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: roaming-benchmark"]
    if start:
        lines.append(f"Range: bytes={start}-")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of an HTTP/1.1 response head (without the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, length


def _read_head(sock: socket.socket, pending: bytearray) -> tuple[int, int]:
    """Read one response head (``pending`` holds bytes already received; it is left holding
    the body bytes that came with the head)."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        pending += chunk
    end = pending.index(b"\r\n\r\n")
    status, length = parse_head(bytes(pending[:end]))
    del pending[: end + 4]
    return status, length


def _get(sock: socket.socket, path: str, host: str) -> int:
    """One GET on a keep-alive connection; returns the status after reading the body."""
    sock.sendall(_request(path, host))
    pending = bytearray()
    status, length = _read_head(sock, pending)
    while len(pending) < length:
        chunk = sock.recv(length - len(pending))
        if not chunk:
            raise ConnectionError("closed in the body")
        pending += chunk
    return status


class _Arrivals:
    """Time stamps of received data: the gaps above a floor (for pauses), and totals."""

    def __init__(self, floor_s: float) -> None:
        self.floor_s = floor_s
        self.first = 0.0
        self.last = 0.0
        self.bytes = 0
        self.receives = 0
        self.gaps: list[tuple[float, float]] = []

    def add(self, now: float, count: int) -> None:
        if self.bytes == 0:
            self.first = now
        elif now - self.last > self.floor_s:
            self.gaps.append((round(self.last, 6), round(now, 6)))
        self.last = now
        self.bytes += count
        self.receives += 1


def stream_client(
    host: str,
    port: int,
    path: str,
    seconds: float,
    *,
    rate: float = 0.0,
    rcvbuf: int = 0,
    stall_timeout: float = 0.0,
    expected_sha256: str = "",
) -> dict[str, Any]:
    """Download ``path`` again and again on one HTTP/1.1 keep-alive connection for ``seconds``,
    time-stamping every receive. ``rate`` (bytes/s) paces the reads; ``stall_timeout`` treats
    that long without data as a broken connection. A broken connection (reset, closed, or
    stalled) is replaced by a new one that asks for the rest of the file with a Range request,
    as ``curl -C -`` would; each break is reported. Every complete file is checked against
    ``expected_sha256``."""
    deadline = time.time() + seconds
    arrivals = _Arrivals(GAP_FLOOR_S)
    breaks: list[dict[str, Any]] = []
    files = bad_files = 0
    offset = 0  # position within the current file
    digest = hashlib.sha256()
    chunk_size = HTTP_CHUNK if rate <= 0 else max(4096, int(rate / 1000))
    sock: socket.socket | None = None
    broken: dict[str, Any] | None = None
    pending = bytearray()
    remaining = 0
    paced_from = 0.0
    paced_bytes = 0
    while time.time() < deadline:
        try:
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                if rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.settimeout(stall_timeout or 30.0)
                sock.connect((host, port))
                pending = bytearray()
                remaining = 0
            if remaining == 0:
                sock.sendall(_request(path, host, offset))
                status, length = _read_head(sock, pending)
                if status not in (200, 206):
                    raise ConnectionError(f"HTTP status {status}")
                if offset == 0:
                    digest = hashlib.sha256()
                remaining = length
            if pending:
                data = bytes(pending[:remaining])
                del pending[: len(data)]
            else:
                data = sock.recv(min(chunk_size, remaining))
                if not data:
                    raise ConnectionError("closed by the service")
            now = time.time()
            if broken is not None:
                broken["data_again"] = round(now, 6)
                breaks.append(broken)
                broken = None
            arrivals.add(now, len(data))
            if expected_sha256:
                digest.update(data)
            offset += len(data)
            remaining -= len(data)
            if remaining == 0:
                files += 1
                if expected_sha256 and digest.hexdigest() != expected_sha256:
                    bad_files += 1
                offset = 0
            if rate > 0:
                paced_from = paced_from or now
                paced_bytes += len(data)
                due = paced_from + paced_bytes / rate
                if due > now:
                    time.sleep(due - now)
        except (OSError, ValueError, IndexError) as error:
            if broken is None:
                broken = {
                    "last_data": round(arrivals.last, 6),
                    "detected": round(time.time(), 6),
                    "error": type(error).__name__ + (f": {error}" if str(error) else ""),
                    "offset": offset,
                }
            if sock is not None:
                sock.close()
                sock = None
            remaining = 0
            time.sleep(0.001)
    if sock is not None:
        sock.close()
    if broken is not None:
        breaks.append(broken)
    elapsed = arrivals.last - arrivals.first
    return {
        "bytes": arrivals.bytes,
        "first": arrivals.first,
        "last": arrivals.last,
        "mbit_s": 8 * arrivals.bytes / elapsed / 1e6 if elapsed > 0 else 0.0,
        "files": files,
        "bad_files": bad_files,
        "receives": arrivals.receives,
        "gaps": arrivals.gaps,
        "breaks": breaks,
    }


def latency_client(host: str, port: int, path: str, requests: int, connects: int) -> dict[str, Any]:
    """HTTP/1.1 GET round trips in µs: ``requests`` in a row on one keep-alive connection
    (after a tenth as many for warm-up), then ``connects`` connections with one GET each
    (connect, request, response, close)."""
    one_connection: list[float] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(requests + requests // 10):
            started = time.perf_counter_ns()
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
            if index >= requests // 10:
                one_connection.append((time.perf_counter_ns() - started) / 1000)
    per_connection: list[float] = []
    for _ in range(connects):
        started = time.perf_counter_ns()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
        per_connection.append((time.perf_counter_ns() - started) / 1000)
    return {"rr_us": p50_p99(one_connection), "connect_us": p50_p99(per_connection)}


SLOW_GET_MS = 500.0


def opening_client(host: str, port: int, path: str, seconds: float) -> dict[str, Any]:
    """New connections one after another for ``seconds``, one GET each (connect, request,
    response, the server's close): how many, their times in ms, and those of ``SLOW_GET_MS``
    or more (a SYN the client's TCP had to send again waits a second) with when they began (s
    from the start). The server closes first (``Connection: close``): a client closing first
    keeps each connection in TIME_WAIT for a minute, and with some 14,000 of them to one
    address its kernel searches milliseconds for a free port at each connect."""
    times: list[float] = []
    slow: list[list[float]] = []
    failures: list[str] = []
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    start = time.perf_counter()
    while (began := time.perf_counter()) - start < seconds:
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(request)
                pending = bytearray()
                status, length = _read_head(sock, pending)
                while chunk := sock.recv(HTTP_CHUNK):
                    pending += chunk
                if status != 200 or len(pending) != length:
                    raise ConnectionError(f"status {status}, {len(pending)} of {length} bytes")
        except OSError as error:
            failures.append(f"{type(error).__name__}: {error}")
            continue
        times.append(1000 * (time.perf_counter() - began))
        if times[-1] >= SLOW_GET_MS:
            slow.append([round(began - start, 3), round(times[-1], 1)])
    return {
        "opened": len(times),
        "failed": len(failures),
        "errors": sorted(set(failures))[:5],
        "get_ms": {**p50_p99(times), "max": max(times, default=0.0)},
        "slow": len(slow),
        "slow_at": slow[:20],
    }


def hold_client(host: str, port: int, path: str, count: int) -> None:
    """Open ``count`` keep-alive connections with one GET each, report, hold them until a line
    arrives on stdin, then send one more GET on each and report again (JSON lines)."""
    limit = _raise_nofile(2 * count + 100)
    sockets: list[socket.socket] = []
    errors: list[str] = []
    started = time.time()
    for _ in range(count):
        try:
            sock = socket.create_connection((host, port), timeout=10)
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
            sockets.append(sock)
        except OSError as error:
            errors.append(f"{type(error).__name__}: {error}")
    ready = {
        "ready": time.time(),
        "setup_s": time.time() - started,
        "opened": len(sockets),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "nofile": limit,
        "ports": sorted(sock.getsockname()[1] for sock in sockets),
    }
    print(json.dumps(ready), flush=True)
    sys.stdin.readline()
    times: list[float] = []
    failures: list[str] = []
    slow: list[list[float]] = []  # [port, when it ended, ms] of GETs slower than SLOW_GET_MS
    for sock in sockets:
        began = time.perf_counter()
        try:
            sock.settimeout(10)
            if _get(sock, path, host) != 200:
                raise ConnectionError("unexpected HTTP status")
            times.append(1000 * (time.perf_counter() - began))
            if times[-1] > SLOW_GET_MS:
                slow.append([sock.getsockname()[1], round(time.time(), 3), round(times[-1], 1)])
        except OSError as error:
            failures.append(f"port {sock.getsockname()[1]}: {type(error).__name__}: {error}")
        sock.close()
    print(
        json.dumps(
            {
                "answered": len(times),
                "failed": len(failures),
                "errors": sorted(set(failures))[:5],
                "get_ms": {**p50_p99(times), "max": max(times, default=0.0)},
                "slow": slow[:20],
            }
        ),
        flush=True,
    )
