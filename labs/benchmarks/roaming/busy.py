"""Busy keep-alive connections opened at any moment (issue 14's overload acceptance).

``python -m labs.benchmarks.roaming --role busy-client --host H --port P --path /small
--rate 50 --seconds 20 --interval 0.5``: opens ``rate`` connections a second for ``seconds``
seconds; each makes a GET every ``interval`` seconds from its opening until the last
connection has been open for ``tail`` seconds (so every connection lives through roams). Prints
one JSON line: connections opened and broken, GETs sent and answered, the first errors (with
the connection's port and when), and GET latency. Every loop is bounded: ``rate * seconds``
connections (at most ``MAX_CONNECTIONS``), each with at most one GET in flight and a timeout.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from labs.benchmarks.roaming.clients import parse_head
from labs.stats import p50_p99

MAX_CONNECTIONS = 20_000
GET_TIMEOUT_S = 10.0  # a GET unanswered this long counts as broken (a stall, not a pause)


@dataclass
class _Tally:
    opened: int = 0
    connect_failed: int = 0
    broken: int = 0
    gets: int = 0
    answered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Every break by its kind (the exception's type, or the HTTP status): the first 20 alone
    # may all be one early roam's.
    kinds: Counter[str] = field(default_factory=Counter)

    def fail(self, port: int, when: float, what: str) -> None:
        self.broken += 1
        self.kinds[what.split(":", 1)[0]] += 1
        if len(self.errors) < 20:
            self.errors.append(f"port {port} at {when:.3f}: {what}")


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status, length = parse_head(head[:-4])
    await reader.readexactly(length)
    return status


async def _connection(
    host: str, port: int, request: bytes, interval: float, until: float, tally: _Tally
) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10.0)
    except (OSError, TimeoutError) as error:
        tally.connect_failed += 1
        if len(tally.errors) < 20:
            tally.errors.append(f"connect at {time.time():.3f}: {type(error).__name__}: {error}")
        return
    tally.opened += 1
    local_port = writer.get_extra_info("sockname")[1]
    try:
        while True:
            began = time.perf_counter()
            tally.gets += 1
            writer.write(request)
            status = await asyncio.wait_for(_read_response(reader), GET_TIMEOUT_S)
            if status != 200:
                tally.fail(local_port, time.time(), f"HTTP status {status}")
                return
            tally.answered += 1
            tally.latencies_ms.append(1000 * (time.perf_counter() - began))
            if time.time() + interval > until:
                return
            await asyncio.sleep(interval)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
        tally.fail(local_port, time.time(), f"{type(error).__name__}: {error}")
    finally:
        writer.close()


async def _run(
    host: str, port: int, path: str, rate: float, seconds: float, interval: float, tail: float
) -> dict[str, Any]:
    count = min(MAX_CONNECTIONS, max(1, round(rate * seconds)))
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: busy-client\r\n\r\n".encode()
    tally = _Tally()
    started = time.time()
    until = started + count / rate + tail
    tasks = []
    for index in range(count):
        due = started + index / rate
        await asyncio.sleep(max(0.0, due - time.time()))
        tasks.append(asyncio.create_task(_connection(host, port, request, interval, until, tally)))
    await asyncio.gather(*tasks)
    return {
        "connections": count,
        "opened": tally.opened,
        "connect_failed": tally.connect_failed,
        "broken": tally.broken,
        "gets": tally.gets,
        "answered": tally.answered,
        "get_ms": {
            **p50_p99(tally.latencies_ms),
            "max": round(max(tally.latencies_ms, default=0.0), 1),
        },
        "errors": tally.errors,
        "broken_by_kind": dict(tally.kinds),
        "started": started,
        "ended": time.time(),
    }


def busy_client(
    host: str, port: int, path: str, rate: float, seconds: float, interval: float, tail: float
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, round(rate * seconds) + 100))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    result = asyncio.run(_run(host, port, path, rate, seconds, interval, tail))
    print(json.dumps(result), flush=True)
