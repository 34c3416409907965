"""An unmodified redis-server behind the shims: long-lived connections survive roams (issue 15).

Three servers run redis-server from Debian with the same keys; a client in c1 holds four
connections through the VIP, each first selecting database 3 (session state the new server
must restore before replaying), then doing GET, MGET and PING in a loop while the service
roams about every 0.75 s. Every reply must be the right one, no connection may be reset, and
the connections must have been handed over (migrated) several times.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from labs.faults import handoffs, live_lab, shim_problems
from labs.roaming import LISTEN_PORT

KEYS = {f"key{i}": os.urandom(64 + 13 * i).hex() for i in range(20)}

REDIS_CLIENT = r"""
import json, socket, sys, time

vip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
keys = json.loads(sys.argv[4])

def command(*parts):
    out = b"*%d\r\n" % len(parts)
    for part in parts:
        part = part.encode() if isinstance(part, str) else part
        out += b"$%d\r\n%s\r\n" % (len(part), part)
    return out

class Conn:
    def __init__(self):
        self.sock = socket.create_connection((vip, port), timeout=30)
        self.buffer = b""
    def line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n", 1)
        return head
    def exactly(self, n):
        while len(self.buffer) < n + 2:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.buffer += data
        body, self.buffer = self.buffer[:n], self.buffer[n + 2:]
        return body
    def reply(self):
        head = self.line()
        kind, rest = head[:1], head[1:]
        if kind in (b"+", b"-", b":"):
            return kind + rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.exactly(n)
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise ValueError(head)
    def ask(self, *parts):
        self.sock.sendall(command(*parts))
        return self.reply()

conns = [Conn() for _ in range(4)]
for c in conns:
    assert c.ask("SELECT", "3") == b"+OK"
ports = [c.sock.getsockname()[1] for c in conns]
names = sorted(keys)
done = errors = 0
wrong = []
end = time.time() + seconds
i = 0
while time.time() < end:
    for c in conns:
        name = names[i % len(names)]
        got = c.ask("GET", name)
        if got != keys[name].encode():
            wrong.append(("GET", name, repr(got)[:60]))
        pair = [names[(i + 1) % len(names)], names[(i + 7) % len(names)]]
        got = c.ask("MGET", *pair)
        if got != [keys[k].encode() for k in pair]:
            wrong.append(("MGET", pair, repr(got)[:60]))
        if c.ask("PING") != b"+PONG":
            wrong.append(("PING",))
        done += 3
    i += 1
    time.sleep(0.002)
print(json.dumps({"replies": done, "wrong": wrong[:10], "ports": ports}))
"""


def test_four_redis_connections_keep_their_session_and_replies_across_roams() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    content = {name: value.encode() for name, value in KEYS.items()}
    with live_lab(
        tick=0.5, m=1, service="redis", content=content, min_switches=6, switch_window=12.0
    ) as roaming:
        roaming.start()
        roaming.wait_for_schedule(0.2)
        result = roaming.lab["c1"].run(
            [
                sys.executable,
                "-c",
                REDIS_CLIENT,
                str(roaming.vip),
                str(LISTEN_PORT),
                "8",
                json.dumps(KEYS),
            ],
            timeout=120,
        )
        events = handoffs(roaming)
        complaints = [
            f"{shim.host}: {e['event']} {str(e.get('reason', ''))[:160]}"
            for shim in roaming.servers.values()
            for e in shim.events()
            if e["level"] != "info"
        ]
        chosen = {
            e["codec"]
            for shim in roaming.servers.values()
            for e in shim.events()
            if e["event"] == "codec_chosen"
        }
        roaming.stop()
        problems = shim_problems(roaming)
    assert result.returncode == 0, f"{result.stderr[-800:]}\n{summary(events)}\n{complaints[:8]}"
    report = json.loads(result.stdout)
    assert report["wrong"] == [], report
    assert report["replies"] > 300, report
    ours = [e for e in events if e["port"] in report["ports"]]
    migrated = [e for e in ours if e["outcome"] == "migrated"]
    others = [e for e in ours if e["outcome"] not in ("migrated", "closed")]
    assert others == [], summary(others)
    assert len(migrated) >= 4 * 3, summary(ours)  # each connection moved at least 3 times
    assert problems == []
    assert chosen == {"resp"}, chosen  # --codec auto recognised redis, and said so


def summary(events: list[dict[str, object]]) -> str:
    return "; ".join(
        f"epoch {e.get('epoch')} port {e.get('port')} {e.get('outcome')}: "
        f"{str(e.get('detail'))[:100]}"
        for e in events[:12]
    )
