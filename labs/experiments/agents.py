"""The client and the attacker of the Figure 2 experiment, run inside the lab's namespaces::

    python -m labs.experiments.agents legit --plan PLAN.json --out OUT.json     # in c
    python -m labs.experiments.agents attack --plan PLAN.json --out OUT.json    # in a

Both read a plan written by ``labs.experiments.fig2`` (absolute Unix times: the lab's
namespaces share one clock) and write one JSON object when done, or when SIGTERM arrives.

``legit``: one thread per request, started at the request's arrival time, fetching the file
with HTTP/1.1 (``Connection: close``). A broken transfer (reset, closed early, no data for the
stall timeout) is resumed on a new connection with a ``Range`` request for the rest, as
``curl -C - --retry`` would, after a short retry delay; in ``roaming-reconnect`` mode the
client also drops its connection at each roam and resumes on a new one, as the paper's
prototype client did on its roaming trigger (``reconnect_at``: when the old server drops
its connections). Every completed body is checked against the file's SHA-256. A request
is accounted for as completed, or failed with a reason (``timeout``, ``corrupt``,
``interrupted``, or the HTTP error).

``stream`` and ``requests`` (``labs.experiments.overhead``): one long download with its receive
gaps time-stamped, and a keep-alive loop of small requests.

``attack``: one asyncio loop; at each arrival, a connection to the planned server, one GET for
the file, read to the end and thrown away. Requests to a server whose gate is closed get no
answer and give up after the connect timeout; the follow attacker also abandons its pending
attempts at a server when it turns to another (``abandon_on_retarget``). At the end of the
attack every attack connection is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from migrate.kernel.files import write_private

RECV_BYTES = 64 * 1024
HEAD_LIMIT = 16 * 1024


class ProtocolError(Exception):
    """The server answered something other than the file (or the rest of it)."""


def http_request(path: str, host: str, offset: int) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", "User-Agent: fig2"]
    if offset:
        lines.append(f"Range: bytes={offset}-")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers (lower-case names) of an HTTP response head."""
    text = head.decode("iso-8859-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def check_response(status: int, headers: dict[str, str], offset: int, size: int) -> None:
    """The answer must be the whole file (200, from 0) or its rest (206 from ``offset``)."""
    if offset == 0 and status == 200:
        length = headers.get("content-length")
        if length is not None and int(length) != size:
            raise ProtocolError(f"content-length {length}, expected {size}")
        return
    if offset > 0 and status == 206:
        content_range = headers.get("content-range", "")
        expected = f"bytes {offset}-{size - 1}/{size}"
        if content_range != expected:
            raise ProtocolError(f"content-range {content_range!r}, expected {expected!r}")
        return
    raise ProtocolError(f"HTTP status {status} for a request from byte {offset}")


def read_response_head(
    sock: socket.socket, offset: int, size: int, timeout: Callable[[], float] | None = None
) -> bytes:
    """Read and check a response's head (see ``check_response``); returns the body bytes that
    came with it. ``timeout`` gives each read's timeout (a deadline's remaining time)."""
    pending = b""
    while b"\r\n\r\n" not in pending:
        if timeout is not None:
            sock.settimeout(timeout())
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionError("closed before the response head")
        pending += chunk
        if b"\r\n\r\n" not in pending and len(pending) > HEAD_LIMIT:
            raise ProtocolError("response head too long")
    head, _, body = pending.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    check_response(status, headers, offset, size)
    return body


class RoamCut(OSError):
    """The roaming client drops its connection at a roam (the paper's prototype)."""


class Fetch:
    """One legitimate request, with resumption."""

    def __init__(self, request: dict[str, Any], plan: dict[str, Any], stop: threading.Event):
        self.request = request
        self.plan = plan
        self.stop = stop
        self.size = int(plan["file_bytes"])
        self.received = 0
        self.digest = hashlib.sha256()
        self.attempts = 0
        self.breaks: list[str] = []
        self.started = 0.0
        self.reconnect_at = sorted(float(t) for t in plan.get("reconnect_at", []))

    def run(self) -> dict[str, Any]:
        at = float(self.request["at"])
        deadline = at + float(self.plan["timeout_s"])
        self.started = time.time()
        reason = ""
        while self.received < self.size:
            now = time.time()
            if self.stop.is_set():
                reason = "interrupted"
                break
            if now >= deadline:
                reason = "timeout"
                break
            self.attempts += 1
            try:
                self._attempt(deadline)
            except (OSError, ProtocolError, ValueError) as error:
                self.breaks.append(f"{time.time() - at:.3f} {type(error).__name__}: {error}"[:200])
                if isinstance(error, ProtocolError):
                    reason = f"http: {error}"
                    break
                if not isinstance(error, RoamCut):
                    self.stop.wait(float(self.plan["retry_delay_s"]))
        ended = time.time()
        ok = self.received >= self.size and not reason
        if ok and self.digest.hexdigest() != self.plan["sha256"]:
            ok, reason = False, "corrupt"
        return {
            "index": self.request["index"],
            "target": self.request["target"],
            "at": at,
            "started": round(self.started, 6),
            "ended": round(ended, 6),
            "response_s": round(ended - at, 6),
            "ok": ok,
            "reason": reason,
            "bytes": self.received,
            "attempts": self.attempts,
            "breaks": self.breaks,
        }

    def _cut_after(self, opened: float) -> float | None:
        """The first roam after this connection was opened (reconnect mode)."""
        for moment in self.reconnect_at:
            if moment > opened:
                return moment
        return None

    def _attempt(self, deadline: float) -> None:
        host, port, path = self.request["host"], int(self.request["port"]), self.plan["path"]
        stall = float(self.plan["stall_timeout_s"])
        opened = time.time()
        cut = self._cut_after(opened)

        def timeout() -> float:
            now = time.time()
            limit = min(stall, deadline - now)
            if cut is not None:
                limit = min(limit, cut - now)
            if limit <= 0:
                if cut is not None and now >= cut:
                    raise RoamCut("dropped at the roam")
                raise TimeoutError("deadline")
            return limit

        with socket.create_connection((host, port), timeout=timeout()) as sock:
            sock.settimeout(timeout())
            sock.sendall(http_request(path, host, self.received))
            body = read_response_head(sock, self.received, self.size, timeout)
            while True:
                if body:
                    body = body[: self.size - self.received]
                    self.digest.update(body)
                    self.received += len(body)
                if self.received >= self.size:
                    return
                try:
                    sock.settimeout(timeout())
                    body = sock.recv(RECV_BYTES)
                except TimeoutError:
                    if cut is not None and time.time() >= cut:
                        raise RoamCut("dropped at the roam") from None
                    raise
                if not body:
                    raise ConnectionError(f"closed at byte {self.received}")


def run_legit(plan: dict[str, Any]) -> dict[str, Any]:
    stop = threading.Event()
    requests = plan["requests"]
    results: dict[int, dict[str, Any]] = {}

    def work(request: dict[str, Any]) -> None:
        results[int(request["index"])] = Fetch(request, plan, stop).run()

    def terminate(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, terminate)
    threads = []
    for request in sorted(requests, key=lambda r: float(r["at"])):
        if stop.wait(max(0.0, float(request["at"]) - time.time())):
            break
        thread = threading.Thread(target=work, args=(request,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    out = []
    for request in requests:
        index = int(request["index"])
        out.append(
            results.get(index)
            or {
                "index": index,
                "target": request["target"],
                "at": float(request["at"]),
                "ok": False,
                "reason": "interrupted",
                "bytes": 0,
                "attempts": 0,
                "breaks": [],
            }
        )
    return {"requests": out}


# --- overhead workloads ---------------------------------------------------------------------

GAP_FLOOR_S = 0.002  # receive gaps longer than this are reported (pauses are far longer)


def run_stream(plan: dict[str, Any]) -> dict[str, Any]:
    """Download one large file for ``duration_s``, time-stamping the gaps between receives. A
    broken connection is resumed with a Range request (in reconnect mode, also at each roam,
    as the paper's client did). Reports the SHA-256 of what arrived, to be checked against
    the same prefix of the file."""
    host, port, path = plan["host"], int(plan["port"]), plan["path"]
    size = int(plan["file_bytes"])
    end = time.time() + float(plan["duration_s"])
    reconnect_at = sorted(float(t) for t in plan.get("reconnect_at", []))
    stall = float(plan.get("stall_timeout_s", 5.0))
    digest = hashlib.sha256()
    received = 0
    first = last = 0.0
    gaps: list[list[float]] = []
    breaks: list[dict[str, Any]] = []
    while time.time() < end and received < size:
        opened = time.time()
        cut = next((t for t in reconnect_at if t > opened), None)
        try:
            with socket.create_connection((host, port), timeout=stall) as sock:
                sock.sendall(http_request(path, host, received))
                body = read_response_head(sock, received, size)
                while True:
                    now = time.time()
                    if body:
                        if last and now - last > GAP_FLOOR_S:
                            gaps.append([round(last, 6), round(now, 6)])
                        first = first or now
                        last = now
                        digest.update(body)
                        received += len(body)
                    if received >= size or now >= end:
                        break
                    limit = min(stall, end - now)
                    if cut is not None:
                        limit = min(limit, cut - now)
                    if limit <= 0:
                        raise RoamCut("dropped at the roam")
                    sock.settimeout(limit)
                    try:
                        body = sock.recv(RECV_BYTES)
                    except TimeoutError:
                        if cut is not None and time.time() >= cut:
                            raise RoamCut("dropped at the roam") from None
                        if time.time() >= end:
                            break
                        raise
                    if not body:
                        raise ConnectionError(f"closed at byte {received}")
        except (OSError, ProtocolError, ValueError) as error:
            breaks.append({"at": round(time.time(), 6), "error": type(error).__name__})
            if not isinstance(error, RoamCut):
                time.sleep(0.01)
    return {
        "bytes": received,
        "first": first,
        "last": last,
        "gaps": gaps,
        "breaks": breaks,
        "sha256": digest.hexdigest(),
    }


def run_requests(plan: dict[str, Any]) -> dict[str, Any]:
    """GET a small file again and again on one HTTP/1.1 keep-alive connection for
    ``duration_s`` (a new connection after a break); every body is checked."""
    host, port, path = plan["host"], int(plan["port"]), plan["path"]
    size = int(plan["file_bytes"])
    expected = plan["sha256"]
    end = time.time() + float(plan["duration_s"])
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    done = bad = received = 0
    breaks: list[dict[str, Any]] = []
    sock: socket.socket | None = None
    while time.time() < end:
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=5.0)
            sock.sendall(request)
            body = read_response_head(sock, 0, size)
            while len(body) < size:
                chunk = sock.recv(RECV_BYTES)
                if not chunk:
                    raise ConnectionError("closed in a response")
                body += chunk
            done += 1
            received += size
            if hashlib.sha256(body[:size]).hexdigest() != expected:
                bad += 1
        except (OSError, ProtocolError, ValueError) as error:
            breaks.append({"at": round(time.time(), 6), "error": type(error).__name__})
            if sock is not None:
                sock.close()
                sock = None
            time.sleep(0.01)
    if sock is not None:
        sock.close()
    return {"requests": done, "bad": bad, "bytes": received, "breaks": breaks}


# --- attacker -----------------------------------------------------------------------------


class Attack:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.counts: dict[str, int] = {}
        self.bytes = 0
        self.open = 0
        self.max_open = 0
        self.per_target: dict[str, int] = {}
        self.connecting: dict[asyncio.Task[None], str] = {}  # attempts not yet answered

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def request(self, host: str, port: int) -> None:
        writer = None
        self.per_target[host] = self.per_target.get(host, 0) + 1
        me = asyncio.current_task()
        assert me is not None
        self.connecting[me] = host
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), float(self.plan["connect_timeout_s"])
                )
            finally:
                self.connecting.pop(me, None)
            self.count("connected")
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            try:
                writer.write(http_request(self.plan["path"], host, 0))
                while chunk := await reader.read(RECV_BYTES):
                    self.bytes += len(chunk)
                self.count("completed")
            finally:
                self.open -= 1
        except TimeoutError:
            self.count("connect_timeout")
        except OSError as error:
            self.count(type(error).__name__)
        finally:
            if writer is not None:
                writer.transport.abort()

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        end = float(self.plan["end"])
        tasks: set[asyncio.Task[None]] = set()
        issued = 0
        for at, host, port in self.plan["arrivals"]:
            delay = min(float(at), end) - time.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set() or time.time() >= end:
                break
            if self.plan.get("abandon_on_retarget"):
                # A follow attacker that has found the service elsewhere stops knocking at the
                # old address (in the paper's prototype such attempts failed at once).
                for stale, target in list(self.connecting.items()):
                    if target != str(host):
                        stale.cancel()
                        self.connecting.pop(stale, None)
                        self.count("abandoned")
            task = asyncio.create_task(self.request(str(host), int(port)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            issued += 1
        remaining = end - time.time()
        if remaining > 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), remaining)
        still_open = self.open
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "issued": issued,
            "bytes": self.bytes,
            "max_open": self.max_open,
            "open_at_end": still_open,
            "outcomes": self.counts,
            "per_target": self.per_target,
        }


ROLES = {
    "legit": run_legit,
    "attack": lambda plan: asyncio.run(Attack(plan).run()),
    "stream": run_stream,
    "requests": run_requests,
}


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labs.experiments.agents")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    _raise_nofile()
    result = ROLES[args.role](plan)
    write_private(args.out, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
