"""Real clients run inside lab hosts, with their output parsed into typed results.

Every runner has a bounded timeout and returns a frozen dataclass; the parsers are separate
pure functions (``parse_*``) so they can be tested without a lab. A client that cannot do its
job at all (iperf3 cannot reach its server, say) raises ``LabError`` with its own one-line
message; curl and ping report failure in their results instead, because a failed fetch or lost
probes are often what a test wants to observe.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from labs.errors import LabError
from labs.node import Node
from migrate.errors import ConfigError

CURL_WRITE_OUT = "%{json}"  # curl >= 7.70 prints every transfer variable as one JSON object


# --- curl ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurlResult:
    exit_status: int  # curl's own exit status (0, 7 = could not connect, 28 = timeout, ...)
    http_code: int  # 0 when no response arrived
    size_download_bytes: int
    time_connect_s: float
    time_starttransfer_s: float
    time_total_s: float
    speed_download_bytes_per_s: float
    error: str  # curl's error message, "" on success
    body: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and 200 <= self.http_code < 400


def parse_curl_write_out(
    stdout: str, exit_status: int, stderr: str = "", body: bytes | None = None
) -> CurlResult:
    """Parse the ``-w '%{json}'`` object curl printed (missing or broken: zeros)."""
    data: dict[str, Any] = {}
    text = stdout.strip()
    start = text.rfind('{"')
    if start >= 0:
        try:
            data = json.loads(text[start:])
        except json.JSONDecodeError:
            data = {}
    error = str(data.get("errormsg") or "").strip()
    if not error and exit_status != 0:
        lines = stderr.strip().splitlines()
        error = lines[-1] if lines else f"curl exited with status {exit_status}"
    return CurlResult(
        exit_status=exit_status,
        http_code=int(data.get("http_code") or data.get("response_code") or 0),
        size_download_bytes=int(data.get("size_download") or 0),
        time_connect_s=float(data.get("time_connect") or 0.0),
        time_starttransfer_s=float(data.get("time_starttransfer") or 0.0),
        time_total_s=float(data.get("time_total") or 0.0),
        speed_download_bytes_per_s=float(data.get("speed_download") or 0.0),
        error=error,
        body=body,
    )


def curl(
    node: Node,
    url: str,
    *,
    timeout_s: float = 30.0,
    keep_body: bool = True,
    extra_args: Sequence[str] = (),
) -> CurlResult:
    """Fetch ``url`` from ``node``; the body is returned when ``keep_body`` (for small files)."""
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be positive, got {timeout_s!r}")
    handle, name = tempfile.mkstemp(
        prefix=f"curl-{node.name}-", suffix=".body", dir=node.lab.workdir
    )
    os.close(handle)
    body_path = Path(name)
    argv = [
        "curl",
        "-sS",
        "--max-time",
        f"{timeout_s:g}",
        "-o",
        str(body_path) if keep_body else "/dev/null",
        "-w",
        CURL_WRITE_OUT,
        *extra_args,
        url,
    ]
    completed = node.run(argv, timeout=timeout_s + 10)
    body = body_path.read_bytes() if keep_body else None
    body_path.unlink(missing_ok=True)
    return parse_curl_write_out(completed.stdout, completed.returncode, completed.stderr, body)


# --- ping ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    rtt_avg_ms: float | None  # None when nothing came back

    @property
    def loss_pct(self) -> float:
        if self.transmitted == 0:
            return 100.0
        return 100.0 * (self.transmitted - self.received) / self.transmitted


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+")


def parse_ping(stdout: str) -> PingResult:
    counts = _PING_COUNTS.search(stdout)
    if counts is None:
        raise LabError("ping printed no statistics")
    rtt = _PING_RTT.search(stdout)
    return PingResult(
        transmitted=int(counts[1]),
        received=int(counts[2]),
        rtt_avg_ms=float(rtt[1]) if rtt else None,
    )


def ping(
    node: Node,
    address: str | IPv4Address,
    *,
    count: int = 5,
    interval_s: float = 0.2,
    wait_s: float = 1.0,
) -> PingResult:
    """Send ``count`` echo requests ``interval_s`` apart (intervals under 0.2 s need root, which
    labs have); each reply is awaited at most ``wait_s`` after the last request."""
    if not 1 <= count <= 1_000_000:
        raise ConfigError(f"count must be in [1, 1000000], got {count!r}")
    if not 0.001 <= interval_s <= 60:
        raise ConfigError(f"interval_s must be in [0.001, 60], got {interval_s!r}")
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval_s:g}", "-W", f"{wait_s:g}"]
    timeout = count * interval_s + wait_s + 10
    completed = node.run([*argv, str(address)], timeout=timeout)
    return parse_ping(completed.stdout)


# --- iperf3 -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IperfResult:
    protocol: str  # "TCP" or "UDP"
    duration_s: float
    sent_bytes: int
    received_bytes: int
    sent_mbit: float  # sender's average rate, Mbit/s
    received_mbit: float  # receiver's average rate, Mbit/s: the throughput
    retransmits: int | None = None  # TCP only
    packets: int | None = None  # UDP only
    lost_packets: int | None = None
    lost_pct: float | None = None
    jitter_ms: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def parse_iperf3_json(text: str) -> IperfResult:
    """Parse ``iperf3 -J`` output (client side)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise LabError(f"iperf3 printed no JSON: {error}") from None
    if data.get("error"):
        raise LabError(f"iperf3: {data['error']}")
    try:
        protocol = str(data["start"]["test_start"]["protocol"])
        end = data["end"]
        sent = end["sum_sent"]
        received = end["sum_received"]
    except (KeyError, TypeError) as error:
        raise LabError(f"iperf3 JSON lacks {error}") from None
    udp = protocol == "UDP"
    return IperfResult(
        protocol=protocol,
        duration_s=float(received.get("seconds") or sent.get("seconds") or 0.0),
        sent_bytes=int(sent["bytes"]),
        received_bytes=int(received["bytes"]),
        sent_mbit=float(sent["bits_per_second"]) / 1e6,
        received_mbit=float(received["bits_per_second"]) / 1e6,
        retransmits=None if udp else int(sent.get("retransmits", 0)),
        packets=int(received["packets"]) if udp else None,
        lost_packets=int(received["lost_packets"]) if udp else None,
        lost_pct=float(received["lost_percent"]) if udp else None,
        jitter_ms=float(received["jitter_ms"]) if udp else None,
        raw=data,
    )


def iperf3(
    node: Node,
    server: str | IPv4Address,
    *,
    port: int = 5201,
    duration_s: float = 3.0,
    udp: bool = False,
    bitrate_mbit: float | None = None,
    length_bytes: int | None = None,
    blocks: int | None = None,
    reverse: bool = False,
    omit_s: float = 0.0,
    timeout_s: float | None = None,
) -> IperfResult:
    """Run an iperf3 client against ``server`` (started with ``start_iperf3_server``).

    ``blocks`` (``-k``) bounds the test by packet count instead of time, e.g. for a UDP loss
    probe; ``omit_s`` leaves the first seconds (slow start) out of the averages.
    """
    if not 0 < duration_s <= 600:
        raise ConfigError(f"duration_s must be in (0, 600], got {duration_s!r}")
    argv = ["iperf3", "-c", str(server), "-p", str(port), "-J"]
    argv += ["-k", str(blocks)] if blocks is not None else ["-t", f"{duration_s:g}"]
    if udp:
        argv.append("-u")
    if bitrate_mbit is not None:
        argv += ["-b", f"{round(bitrate_mbit * 1_000_000)}"]
    if length_bytes is not None:
        argv += ["-l", str(length_bytes)]
    if reverse:
        argv.append("-R")
    if omit_s > 0:
        argv += ["-O", f"{omit_s:g}"]
    # iperf3 needs its duration plus a few seconds of setup and result exchange
    limit = timeout_s if timeout_s is not None else duration_s + omit_s + 20
    completed = node.run(argv, timeout=limit)
    if not completed.stdout.strip():
        detail = completed.stderr.strip().splitlines()
        raise LabError(f"iperf3 from {node.name} failed: {detail[-1] if detail else 'no output'}")
    return parse_iperf3_json(completed.stdout)


# --- UDP loss probe -----------------------------------------------------------------------

PROBE_SCRIPT = Path(__file__).with_name("udp_probe.py")
PROBE_READY_TIMEOUT_S = 10.0
PROBE_HEADERS_BYTES = 42  # Ethernet 14 + IPv4 20 + UDP 8, for pacing against a rate


@dataclass(frozen=True)
class LossProbeResult:
    sent: int
    received: int

    @property
    def loss_pct(self) -> float:
        if self.sent == 0:
            return 100.0
        return 100.0 * (self.sent - self.received) / self.sent


def probe_interval_s(rate_mbit: float, size_bytes: int) -> float:
    """The gap between probes that keeps them at ``rate_mbit`` on the wire."""
    return (size_bytes + PROBE_HEADERS_BYTES) * 8 / (rate_mbit * 1e6)


def udp_loss_probe(
    sender: Node,
    receiver: Node,
    *,
    address: str | IPv4Address | None = None,
    port: int = 9000,
    count: int = 3000,
    interval_s: float = 0.0005,
    size_bytes: int = 200,
    idle_s: float = 1.0,
) -> LossProbeResult:
    """Send ``count`` numbered UDP datagrams from ``sender`` to ``receiver`` (at ``address``,
    default its primary address) and count how many arrive: one-way loss, bounded in time."""
    if not 1 <= count <= 1_000_000:
        raise ConfigError(f"count must be in [1, 1000000], got {count!r}")
    if not 0 < interval_s <= 1 or not 8 <= size_bytes <= 1400:
        raise ConfigError("interval_s must be in (0, 1] and size_bytes in [8, 1400]")
    target = str(address) if address is not None else str(receiver.address)
    send_time_s = count * interval_s
    listener = receiver.popen(
        [
            sys.executable,
            str(PROBE_SCRIPT),
            "receive",
            "--bind",
            target,
            "--port",
            str(port),
            "--count",
            str(count),
            "--idle-s",
            f"{idle_s:g}",
            "--timeout-s",
            f"{send_time_s + idle_s + PROBE_READY_TIMEOUT_S + 10:g}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_line(
            listener, "ready", PROBE_READY_TIMEOUT_S, f"UDP probe receiver on {receiver.name}"
        )
        sender.run(
            [
                sys.executable,
                str(PROBE_SCRIPT),
                "send",
                "--to",
                target,
                "--port",
                str(port),
                "--count",
                str(count),
                "--interval-s",
                f"{interval_s:g}",
                "--size",
                str(size_bytes),
            ],
            check=True,
            timeout=send_time_s + 30,
        )
        stdout, stderr = listener.communicate(timeout=send_time_s + idle_s + 30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate(timeout=10)
    lines = stdout.strip().splitlines()
    try:
        received = int(json.loads(lines[-1])["received"])
    except (IndexError, KeyError, ValueError):
        raise LabError(f"UDP probe receiver on {receiver.name} failed: {stderr.strip()}") from None
    return LossProbeResult(sent=count, received=received)


def _wait_for_line(
    process: subprocess.Popen[str], wanted: str, timeout_s: float, what: str
) -> None:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=timeout_s):
            raise LabError(f"{what} did not start within {timeout_s:g} s")
        line = process.stdout.readline().strip()
    if line != wanted:
        raise LabError(f"{what} did not start: {line or 'no output'}")


# --- redis-benchmark ----------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTestResult:
    test: str
    requests_per_s: float
    avg_latency_ms: float | None = None
    min_latency_ms: float | None = None
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    max_latency_ms: float | None = None


@dataclass(frozen=True)
class RedisBenchmarkResult:
    tests: dict[str, RedisTestResult]
    exit_status: int


def _optional_float(row: dict[str, str], key: str) -> float | None:
    value = row.get(key)
    return float(value) if value not in (None, "") else None


def parse_redis_benchmark_csv(text: str) -> dict[str, RedisTestResult]:
    """Parse ``redis-benchmark --csv``: redis 7 prints a header row with latency columns,
    older versions print ``"TEST","rps"`` rows only."""
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    results: dict[str, RedisTestResult] = {}
    if rows and rows[0][0] == "test":
        header = rows[0]
        for values in rows[1:]:
            row = dict(zip(header, values, strict=False))
            results[row["test"]] = RedisTestResult(
                test=row["test"],
                requests_per_s=float(row["rps"]),
                avg_latency_ms=_optional_float(row, "avg_latency_ms"),
                min_latency_ms=_optional_float(row, "min_latency_ms"),
                p50_latency_ms=_optional_float(row, "p50_latency_ms"),
                p95_latency_ms=_optional_float(row, "p95_latency_ms"),
                p99_latency_ms=_optional_float(row, "p99_latency_ms"),
                max_latency_ms=_optional_float(row, "max_latency_ms"),
            )
        return results
    for values in rows:
        if len(values) >= 2:
            try:
                results[values[0]] = RedisTestResult(values[0], float(values[1]))
            except ValueError:
                continue
    return results


def redis_benchmark(
    node: Node,
    server: str | IPv4Address,
    *,
    port: int = 6379,
    requests: int = 10_000,
    clients: int = 10,
    tests: Sequence[str] = ("set", "get"),
    timeout_s: float = 60.0,
) -> RedisBenchmarkResult:
    """Run redis-benchmark (it retries forever without a server: the timeout bounds it)."""
    if not 1 <= requests <= 10_000_000 or not 1 <= clients <= 10_000:
        raise ConfigError("requests must be in [1, 1e7] and clients in [1, 1e4]")
    argv = [
        "redis-benchmark",
        "-h",
        str(server),
        "-p",
        str(port),
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-t",
        ",".join(tests),
        "--csv",
    ]
    completed = node.run(argv, timeout=timeout_s)
    results = parse_redis_benchmark_csv(completed.stdout)
    if not results:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise LabError(
            f"redis-benchmark from {node.name} produced no results: "
            f"{detail[-1] if detail else 'no output'}"
        )
    return RedisBenchmarkResult(results, completed.returncode)


# --- raw UDP --------------------------------------------------------------------------------

MAX_DATAGRAMS = 100_000  # one call's bound: floods in tests stay bounded in count

_SEND_DATAGRAMS = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "target=(sys.argv[1], int(sys.argv[2]))\n"
    "for line in sys.stdin:\n"
    "    s.sendto(bytes.fromhex(line.strip()), target)\n"
)


def send_datagrams(
    node: Node, target: str, port: int, payloads: Sequence[bytes], *, timeout: float = 30
) -> None:
    """Send each of ``payloads`` as one UDP datagram from ``node`` to ``target:port`` (an
    outsider's crafted or forged datagrams), in order, as fast as the socket takes them."""
    if len(payloads) > MAX_DATAGRAMS:
        raise ConfigError(f"{len(payloads)} datagrams: at most {MAX_DATAGRAMS} per call")
    text = "".join(payload.hex() + "\n" for payload in payloads)
    node.run(
        [sys.executable, "-c", _SEND_DATAGRAMS, target, str(port)],
        input=text,
        check=True,
        timeout=timeout,
    )
