"""An unmodified memcached behind the shims: long-lived connections survive roams (issue 15).

Three servers run memcached from Debian with the same items; a client in c1 holds four
connections through the VIP doing get, multi-key gets and version in a loop while the service
roams about every 0.75 s. Every reply must be the right one, no connection may be reset, every
hand-over must migrate, and the server shims must say they recognised memcached.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from labs.faults import handoffs, live_lab, shim_problems
from labs.roaming import LISTEN_PORT

ITEMS = {f"item{i}": os.urandom(40 + 11 * i).hex() for i in range(20)}

MEMCACHED_CLIENT = r"""
import json, socket, sys, time

vip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
items = json.loads(sys.argv[4])

class Conn:
    def __init__(self):
        self.sock = socket.create_connection((vip, port), timeout=30)
        self.buffer = b""
    def until(self, end):
        while end not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.buffer += data
        cut = self.buffer.index(end) + len(end)
        head, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return head
    def get(self, *keys):
        self.sock.sendall(b"get " + b" ".join(k.encode() for k in keys) + b"\r\n")
        found, text = {}, self.until(b"END\r\n")
        lines = text.split(b"\r\n")
        i = 0
        while lines[i] != b"END":
            _, key, _, size = lines[i].split()
            found[key.decode()] = lines[i + 1].decode()
            assert len(lines[i + 1]) == int(size)
            i += 2
        return found
    def version(self):
        self.sock.sendall(b"version\r\n")
        return self.until(b"\r\n")

conns = [Conn() for _ in range(4)]
ports = [c.sock.getsockname()[1] for c in conns]
names = sorted(items)
done, wrong = 0, []
end = time.time() + seconds
i = 0
while time.time() < end:
    for c in conns:
        name = names[i % len(names)]
        if c.get(name) != {name: items[name]}:
            wrong.append(("get", name))
        pair = [names[(i + 3) % len(names)], names[(i + 9) % len(names)]]
        if c.get(*pair) != {k: items[k] for k in pair}:
            wrong.append(("gets", pair))
        if not c.version().startswith(b"VERSION "):
            wrong.append(("version",))
        done += 3
    i += 1
    time.sleep(0.002)
print(json.dumps({"replies": done, "wrong": wrong[:10], "ports": ports}))
"""


def test_four_memcached_connections_keep_their_replies_across_roams() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    content = {name: value.encode() for name, value in ITEMS.items()}
    with live_lab(
        tick=0.5, m=1, service="memcached", content=content, min_switches=6, switch_window=12.0
    ) as roaming:
        roaming.start()
        roaming.wait_for_schedule(0.2)
        argv = [sys.executable, "-c", MEMCACHED_CLIENT, str(roaming.vip), str(LISTEN_PORT)]
        result = roaming.lab["c1"].run([*argv, "8", json.dumps(ITEMS)], timeout=120)
        events = handoffs(roaming)
        chosen = {
            e["codec"]
            for shim in roaming.servers.values()
            for e in shim.events()
            if e["event"] == "codec_chosen"
        }
        roaming.stop()
        problems = shim_problems(roaming)
    assert result.returncode == 0, f"{result.stderr[-800:]}\n{summary(events)}"
    report = json.loads(result.stdout)
    assert report["wrong"] == [], report
    assert report["replies"] > 300, report
    ours = [e for e in events if e["port"] in report["ports"]]
    others = [e for e in ours if e["outcome"] not in ("migrated", "closed")]
    assert others == [], summary(others)
    assert len([e for e in ours if e["outcome"] == "migrated"]) >= 4 * 3, summary(ours)
    assert problems == []
    assert chosen == {"memcached"}, chosen


def summary(events: list[dict[str, object]]) -> str:
    return "; ".join(
        f"epoch {e.get('epoch')} port {e.get('port')} {e.get('outcome')}: "
        f"{str(e.get('detail'))[:100]}"
        for e in events[:12]
    )
