"""Live TCP connections follow the service across roams (issue: re-incarnation).

Real processes: ``roam server --migration live`` in front of python's http.server or nginx on
three server hosts, ``roam client`` on c1, curl and python's http.client as applications,
tcpdump on the client for evidence. The old server is never asked for anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from labs.clients import send_datagrams
from labs.faults import KEEPALIVE_CLIENT, handoffs, live_lab, shim_problems, unfinished
from labs.params import LinkParams
from labs.roaming import LISTEN_PORT, SERVICE_PORT, RoamingLab, roam_argv

pytestmark = [pytest.mark.system, pytest.mark.slow]

BIG = 256 * 1024 * 1024


@contextmanager
def live_pool(
    clients: int = 1, outsiders: int = 0, params: LinkParams | None = None, **options: object
) -> Iterator[RoamingLab]:
    """A three-server live deployment; after the test, no shim may have crashed or failed a
    connection with an internal error."""
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    with live_lab(params, clients=clients, outsiders=outsiders, **options) as roaming:
        yield roaming
        roaming.stop()
        assert shim_problems(roaming) == []


def started(roaming: RoamingLab) -> RoamingLab:
    roaming.start()
    roaming.wait_for_schedule(0.2)
    return roaming


def switch_times(roaming: RoamingLab, host: str = "c1") -> str:
    return ", ".join(
        f"{e['ts']:.3f}" for e in roaming.clients[host].events() if e["event"] == "switch"
    )


def diagnostics(roaming: RoamingLab) -> str:
    """What went wrong, for an assertion message: failed hand-overs and server complaints,
    counted."""
    counts: Counter[str] = Counter(
        f"epoch {e['epoch']} {e['outcome']}: {str(e['detail'])[:120]}"
        for e in unfinished(handoffs(roaming))
    )
    for shim in roaming.servers.values():
        counts.update(
            f"{shim.host}: {e['event']} {e.get('side', '')} {str(e.get('reason', ''))[:120]}"
            for e in shim.events()
            if (e["level"] != "info" or e["event"] == "connection_reset")
            and e["event"] != "checkpoint_failed"
        )
        # Checkpoint failures name the connection: count them by reason only.
        counts.update(
            f"{shim.host}: checkpoint_failed {str(e.get('reason', ''))[:80]}"
            for e in shim.events()
            if e["event"] == "checkpoint_failed"
        )
    for shim in roaming.clients.values():
        counts.update(
            f"client: {e['event']} {e.get('error', '')} {str(e.get('reason', ''))[:100]}"
            for e in shim.events()
            if e["level"] != "info"
        )
    lines = [f"{n} x {line}" for line, n in counts.most_common(15)]
    # Where the time of each failed hand-over's roam went (a late COMMIT: which step was slow).
    failed_epochs = {h["epoch"] for h in unfinished(handoffs(roaming))}
    for shim in roaming.clients.values():
        for e in shim.events():
            if e["event"] == "roam" and e["epoch"] in failed_epochs:
                lines.append(
                    f"{shim.host} roam epoch {e['epoch']} at {e['ts']:.3f}: pause "
                    f"{e['pause_ms']} ms, steps (ms from the freeze) {e['steps_ms']}"
                )
    for shim in [*roaming.clients.values(), *roaming.servers.values()]:
        with contextlib.suppress(OSError, ValueError):
            status = json.loads(shim.status_path.read_text())
            lines.append(f"{shim.kind} {shim.host} status: {_counters(status)}")
    keep = os.environ.get("ROAM_TEST_ARTIFACTS")
    if keep:
        # Keep the shims' logs of a failed run for a closer look (the lab's files go with it).
        target = Path(keep) / f"{roaming.lab.workdir.name}-{time.time():.0f}"
        shutil.copytree(roaming.workdir, target, ignore=shutil.ignore_patterns("www-*", "*.out"))
        lines.append(f"logs kept in {target}")
    carriers = [
        e for shim in roaming.servers.values() for e in shim.events() if e["event"] == "prepared"
    ]
    lines.append(f"{len(carriers)} prepared re-incarnations")
    return "\n".join(lines)


def _counters(status: object, prefix: str = "") -> str:
    """The numbers of a shim's status file, flattened: ``migration.carriers_stored=12 ...``."""
    if isinstance(status, dict):
        return " ".join(
            part for key, value in status.items() if (part := _counters(value, f"{prefix}{key}."))
        )
    if isinstance(status, int | float) and not isinstance(status, bool):
        return f"{prefix[:-1]}={status}"
    return ""


def resets(capture: Path) -> list[str]:
    """The RST segments in a capture, one line each (who sent it, where in the stream)."""
    from scapy.all import TCP, rdpcap

    return [
        f"{p['IP'].src}:{p[TCP].sport} > {p['IP'].dst}:{p[TCP].dport} {p[TCP].flags} "
        f"seq {p[TCP].seq} at {float(p.time):.3f}"
        for p in rdpcap(str(capture))
        if p.haslayer(TCP) and p[TCP].flags & 0x04
    ]


def download(roaming: RoamingLab, name: str, rate: str, out: Path) -> tuple[int, str, list[str]]:
    """curl through the VIP; returns its status, its error output and the RSTs seen."""
    capture = roaming.workdir / f"{name}.pcap"
    with roaming.lab["c1"].capture(
        "eth0", capture, bpf_filter=["tcp", "port", str(LISTEN_PORT)], snaplen_bytes=96
    ):
        result = roaming.lab["c1"].run(
            ["curl", "-sS", "--limit-rate", rate, "-o", str(out), roaming.url(f"/{name}")],
            timeout=300,
        )
    return result.returncode, result.stderr, resets(capture)


# A service without byte ranges (Python's http.server) is regenerated from the response's
# start up to the client's position at every hand-over: the client prepares that much earlier
# (REGENERATE_BYTES_PER_S), up to MAX_PREPARE_LEAD_S, so such a response migrates reliably up
# to a few hundred MB only, less on a busy machine (docs/architecture.md). nginx answers
# ranges: its hand-over costs the same at any position.
LONG_DOWNLOADS = {
    # service: (bytes, link Mbit/s, curl's rate), about 30 s each
    "http": (64 * 1024 * 1024, 18, "2300K"),
    "nginx": (BIG, 72, "9M"),
}


@pytest.mark.parametrize("service", ["http", "nginx"])
def test_a_long_download_survives_ten_roams_intact_without_a_reset(service: str) -> None:
    size, link_mbit, rate = LONG_DOWNLOADS[service]
    data = os.urandom(size)
    # The links hold the download for about 30 s: curl's --limit-rate alone lets some
    # transfers through at full speed, and then fewer than ten roams happen.
    with live_pool(
        params=LinkParams(rate_mbit=link_mbit),
        tick=1.0,
        m=1,
        service=service,
        content={"big": data},
        min_switches=12,
        switch_window=32.0,
    ) as pool:
        started(pool)
        out = pool.workdir / "big.out"
        status, detail, rsts = download(pool, "big", rate, out)
        assert status == 0, f"{detail}\n{diagnostics(pool)}"
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert rsts == [], f"{rsts}\n{diagnostics(pool)}\n{switch_times(pool)}"
        migrated = [h for h in handoffs(pool) if h["outcome"] == "migrated"]
        assert len(migrated) >= 10, diagnostics(pool)
        # Every hand-over migrated the connection (or found it already finished, or held it
        # for the next roam, which moved it).
        assert unfinished(handoffs(pool)) == [], diagnostics(pool)


def _block_and_kill(pool: RoamingLab, host: str) -> None:
    """The old server dies: shim and service SIGKILLed, its host drops every packet."""
    pool.servers[host].stop(signal.SIGKILL)
    pool.services[host].kill()
    pool.lab[host].run(
        ["nft", "-f", "-"],
        check=True,
        input=(
            "table inet roam_blackhole {\n"
            "  chain in { type filter hook prerouting priority -500; policy drop; }\n"
            "  chain out { type filter hook output priority -500; policy drop; }\n"
            "}\n"
        ),
    )


def _revive(pool: RoamingLab, host: str) -> None:
    pool.lab[host].run(["nft", "delete", "table", "inet", "roam_blackhole"], check=True)
    pool.lab[host].run(roam_argv("cleanup"), check=True, timeout=60)
    pool.start_service(host)
    pool.start_server(host)


@contextmanager
def killing_each_old_server(pool: RoamingLab) -> Iterator[list[str]]:
    """For the block: right after each of c1's switches, the server it left is cut off and
    its shim and service SIGKILLed, then revived; yields the hosts killed so far."""
    stop = threading.Event()
    killed: list[str] = []

    def assassin() -> None:
        seen = 0
        while not stop.is_set():
            switches = [e for e in pool.clients["c1"].events() if e["event"] == "switch"]
            for event in switches[seen:]:
                old = pool.host_of(str(event["previous"]))
                _block_and_kill(pool, old)
                killed.append(old)
                time.sleep(0.2)
                _revive(pool, old)
            seen = len(switches)
            time.sleep(0.05)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join(timeout=30)


def test_download_completes_although_each_old_server_dies_after_the_roam() -> None:
    data = os.urandom(BIG)
    # Epochs of 3 to 6 s: a killed server is back (0.2 s blackhole, `roam cleanup`, then a
    # fresh service and shim, a few seconds on a busy machine) before the client asks it to
    # prepare for an epoch of its own again.
    with live_pool(
        tick=3.0, m=1, content={"big": data}, min_switches=6, switch_window=42.0
    ) as pool:
        started(pool)
        out = pool.workdir / "big.out"
        with killing_each_old_server(pool) as killed:
            status, detail, _ = download(pool, "big", "6M", out)
        assert status == 0, f"{detail}\n{diagnostics(pool)}"
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert len(killed) >= 5, killed
        # Every hand-over migrated the connection (or found it already finished, or held it
        # for the next roam, which moved it).
        assert unfinished(handoffs(pool)) == [], diagnostics(pool)


# One keep-alive connection fetching a file flat out, again and again, hashing each copy, until
# a stop file appears (or a bound): the test decides when enough roams happened, not the speed.
FLAT_OUT_CLIENT = """
import hashlib, http.client, json, os, sys, time
host, path, stop_file = sys.argv[1], sys.argv[2], sys.argv[3]
max_copies, bound_s = int(sys.argv[4]), float(sys.argv[5])
conn = http.client.HTTPConnection(host, 80, timeout=30)
digests, ports, started = [], set(), time.monotonic()
while len(digests) < max_copies and time.monotonic() - started < bound_s:
    if os.path.exists(stop_file):
        break
    conn.request("GET", path)
    response = conn.getresponse()
    digest = hashlib.sha256()
    while chunk := response.read(1 << 20):
        digest.update(chunk)
    digests.append(digest.hexdigest() if response.status == 200 else f"status {response.status}")
    ports.add(conn.sock.getsockname()[1])
print(json.dumps({"digests": digests, "ports": sorted(ports)}))
"""
FLAT_OUT_KILLS = 5  # old servers killed (roams) before the client is told to stop


def test_flat_out_downloads_on_one_connection_survive_each_old_server_dying() -> None:
    """Issue 14's flat-out download with the old server's host cut off and its processes
    SIGKILLed right after each roam: nginx, no rate limit, one keep-alive connection fetching
    the file again and again until FLAT_OUT_KILLS roams passed; every copy intact, no RST, no
    failed hand-over. The new server never needs the old one (Range hand-overs read nginx at
    the new server)."""
    data = os.urandom(BIG // 2)
    expected = hashlib.sha256(data).hexdigest()
    with live_pool(
        tick=3.0, m=1, service="nginx", content={"big": data}, min_switches=10, switch_window=60.0
    ) as pool:
        started(pool)
        capture = pool.workdir / "killed.pcap"
        stop_file = pool.workdir / "stop-fetching"
        argv = [sys.executable, "-c", FLAT_OUT_CLIENT, str(pool.vip), "/big", str(stop_file)]
        with (
            killing_each_old_server(pool) as killed,
            pool.lab["c1"].capture(
                "eth0", capture, bpf_filter=["tcp", "port", str(LISTEN_PORT)], snaplen_bytes=96
            ),
        ):
            done = threading.Event()

            def stop_after_enough_roams() -> None:
                while not done.is_set() and len(killed) < FLAT_OUT_KILLS:
                    time.sleep(0.1)
                stop_file.touch()

            watcher = threading.Thread(target=stop_after_enough_roams, daemon=True)
            watcher.start()
            try:
                result = pool.lab["c1"].run([*argv, "400", "200"], timeout=300)
            finally:
                done.set()
                watcher.join(timeout=5)
        rsts = resets(capture)
        print(f"old servers killed during the copies: {killed}")
        assert result.returncode == 0, f"{result.stderr}\n{diagnostics(pool)}"
        fetched = json.loads(result.stdout)
        assert len(fetched["ports"]) == 1, fetched["ports"]  # one connection throughout
        assert fetched["digests"], "no copy fetched"
        assert set(fetched["digests"]) == {expected}, diagnostics(pool)
        assert rsts == [], f"{rsts}\n{diagnostics(pool)}"
        assert len(killed) >= FLAT_OUT_KILLS, f"only {len(killed)} roams in 200 s: {killed}"
        assert unfinished(handoffs(pool)) == [], diagnostics(pool)


@pytest.mark.parametrize("stream_hash", ["sha256", "blake3"])
def test_keep_alive_connection_makes_200_requests_across_roams(stream_hash: str) -> None:
    files = {f"k{i}": os.urandom(20_000 + 97 * i) for i in range(200)}
    with live_pool(
        tick=0.5,
        m=1,
        service="nginx",
        content=files,
        min_switches=6,
        switch_window=10.0,
        server_extra=("--stream-hash", stream_hash),
    ) as pool:
        started(pool)
        for shim in pool.servers.values():
            [start] = [e for e in shim.events() if e["event"] == "start"]
            assert start["stream_hash"] == stream_hash
        result = pool.lab["c1"].run(
            [sys.executable, "-c", KEEPALIVE_CLIENT, str(pool.vip), "200", "0.04"], timeout=120
        )
        assert result.returncode == 0, f"{result.stderr[-500:]}\n{diagnostics(pool)}"
        report = json.loads(result.stdout)
        assert len(report["ports"]) == 1, "the client had to open a second connection"
        expected = [hashlib.sha256(files[f"k{i}"]).hexdigest() for i in range(200)]
        assert report["digests"] == expected
        migrated = [h for h in handoffs(pool) if h["outcome"] == "migrated"]
        assert len(migrated) >= 3, diagnostics(pool)


ASK_AND_LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3.0)
s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))
try:
    print(s.recv(65535).hex())
except TimeoutError:
    print("")
"""


def test_a_repeated_commit_after_the_connection_moved_is_answered_ready() -> None:
    # A COMMIT whose READY was lost is sent again; if it arrives after the connection went
    # live at the new server (the GO, or the server's own GO timeout), the answer must still
    # be READY: a FAILED would make the client reset a connection that has in fact moved.
    from scapy.all import IP, UDP, rdpcap

    from migrate.channel import Kind
    from migrate.cover import unframe
    from migrate.registration import Bundle
    from migrate.reincarnation import (
        Answer,
        Phase,
        Request,
        Status,
        answer_opener,
        request_opener,
        request_sealer,
    )

    files = {f"k{i}": os.urandom(5_000 + 97 * i) for i in range(60)}
    # The test seals the client's COMMIT again beside the client's shim: with its cover
    # traffic on, the shim's newer counters would put the test's request below the server's
    # replay window (refused as stale, not answered).
    with live_pool(
        tick=4.0,
        m=1,
        service="nginx",
        content=files,
        min_switches=2,
        switch_window=16.0,
        client_extra=("--cover-rate", "0"),
    ) as pool:
        started(pool)
        bundle = Bundle.decode(pool.bundle_path("c1").read_bytes())
        capture = pool.workdir / "requests.pcap"
        with pool.lab["c1"].capture("eth0", capture, bpf_filter=["udp", "dst", "port", "47476"]):
            client = pool.lab["c1"].popen(
                [sys.executable, "-c", KEEPALIVE_CLIENT, str(pool.vip), "60", "0.25"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.time() + 25
            while time.time() < deadline and not any(
                h["outcome"] == "migrated" for h in handoffs(pool)
            ):
                time.sleep(0.1)
            # Past the GO and the server's own GO timeout: the connection is live there.
            time.sleep(1.5)
        first = next((h for h in handoffs(pool) if h["outcome"] == "migrated"), None)
        assert first is not None, diagnostics(pool)
        opener = request_opener(bundle.channel_key, bundle.deployment_id, bundle.client_id)
        commits = []
        for packet in rdpcap(str(capture)):
            if packet.haslayer(UDP):
                opened = opener.open(bytes(packet[UDP].payload), float(packet.time))
                body = unframe(opened.plaintext)  # cover cells (migrate.cover) hold no request
                if body is None:
                    continue
                request = Request.decode(body)
                if request.phase is Phase.COMMIT and request.epoch == first["epoch"]:
                    commits.append((packet[IP].dst, request))
        assert commits, f"no COMMIT for epoch {first['epoch']} captured"
        target, commit = commits[-1]
        sealer = request_sealer(bundle.channel_key, bundle.deployment_id, bundle.client_id)
        answers = answer_opener(bundle.channel_key, bundle.deployment_id, bundle.client_id)

        def ask(request: Request) -> Answer:
            sealed = sealer.seal(Kind.REINCARNATE_REQUEST, request.encode(), time.time())
            reply = pool.lab["c1"].run(
                [sys.executable, "-c", ASK_AND_LISTEN, sealed.hex(), target, "47476"],
                check=True,
                timeout=10,
            )
            assert reply.stdout.strip(), "no answer"
            return Answer.decode(answers.open(bytes.fromhex(reply.stdout), time.time()).plaintext)

        again = ask(commit)
        assert (again.phase, again.client_port, again.status) == (
            Phase.COMMIT,
            commit.client_port,
            Status.READY,
        ), again
        # Another COMMIT (other positions) for the same connection is not the one that was
        # done: there is nothing prepared for it.
        other = ask(dataclasses.replace(commit, s2c_received=commit.s2c_received + 1))
        assert other.status is Status.FAILED, other
        assert "no prepared re-incarnation" in other.detail, other
        # The answers changed nothing: the keep-alive connection goes on, intact, alone.
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, f"{err[-500:]}\n{diagnostics(pool)}"
        report = json.loads(out)
        assert len(report["ports"]) == 1, "the client had to open a second connection"
        expected = [hashlib.sha256(files[f"k{i}"]).hexdigest() for i in range(60)]
        assert report["digests"] == expected


def test_a_connection_back_at_a_server_that_still_relays_its_earlier_incarnation_moves_intact() -> (
    None
):
    # Windows so wide (delta and gamma 0.8 s, epochs of 1 or 2 s) that a server the service
    # leaves for one epoch keeps its gate open until the service comes back: it never drops
    # the connection's earlier incarnation, whose socket holds the 4-tuple the new one needs.
    # (Production meets it when a server's tick runs late on a busy host, or when a roam
    # away from a server held the connections and the next one goes back there.) The server
    # drops the stale incarnation silently at the COMMIT; before, the restore failed with
    # EADDRNOTAVAIL and the client's connection was reset.
    files = {f"k{i}": os.urandom(3_000 + 89 * i) for i in range(40)}
    with live_pool(
        tick=1.0,
        m=1,
        delta=0.8,
        gamma=0.8,
        service="nginx",
        content=files,
        min_switches=4,
        min_returns=2,
        switch_window=10.0,
    ) as pool:
        started(pool)
        client = pool.lab["c1"].popen(
            [sys.executable, "-c", KEEPALIVE_CLIENT, str(pool.vip), "40", "0.25"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = client.communicate(timeout=90)
        replaced = [
            e for shim in pool.servers.values() for e in shim.events()
            if e["event"] == "incarnation_replaced"
        ]  # fmt: skip
        assert client.returncode == 0, f"{err[-500:]}\n{diagnostics(pool)}"
        report = json.loads(out)
        assert report["digests"] == [hashlib.sha256(files[f"k{i}"]).hexdigest() for i in range(40)]
        assert len(report["ports"]) == 1, "the client had to open a second connection"
        assert unfinished(handoffs(pool)) == [], diagnostics(pool)
        # The service came back to a server that still relayed the connection, at least once.
        assert replaced, f"no incarnation replaced: {switch_times(pool)}\n{diagnostics(pool)}"


def paced_read(
    processes: list[subprocess.Popen[bytes]], rate_bps: int, timeout_s: float
) -> list[tuple[bytes, int]]:
    """Read every process's stdout at ``rate_bps`` bytes per second each (a slow application
    behind each connection: the pipe fills, the program blocks, its TCP window closes, and the
    transfer stays on the wire for as long as the pace says). Returns (sha256, size) each."""
    tick = 0.1
    per_tick = max(1, int(rate_bps * tick))
    hashes = [hashlib.sha256() for _ in processes]
    sizes = [0] * len(processes)
    reading = set(range(len(processes)))
    for process in processes:
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + timeout_s
    while reading and time.monotonic() < deadline:
        for i in list(reading):
            stdout = processes[i].stdout
            assert stdout is not None
            try:
                chunk = os.read(stdout.fileno(), per_tick)
            except BlockingIOError:
                continue
            if not chunk:
                reading.discard(i)
                continue
            hashes[i].update(chunk)
            sizes[i] += len(chunk)
        time.sleep(tick)
    return [(h.digest(), n) for h, n in zip(hashes, sizes, strict=True)]


def test_200_concurrent_downloads_survive_the_same_roam() -> None:
    # Each curl writes to a pipe that the test drains at 20 KiB/s: about 50 s per 1 MiB
    # transfer, so that all 200 are open across the first roams. (curl's own --limit-rate lets
    # some transfers through at full speed.) Small receive buffers keep each transfer's
    # unread bytes on the server side rather than in the client's socket buffer.
    data = os.urandom(1024 * 1024)
    with live_pool(
        tick=3.0,
        m=1,
        content={"f": data},
        min_switches=4,
        switch_window=24.0,
        first_switch_after=6.0,
    ) as pool:
        pool.lab["c1"].sysctl("net.ipv4.tcp_rmem", "4096 16384 32768")
        started(pool)
        processes = [
            pool.lab["c1"].popen(
                ["curl", "-sS", pool.url("/f")],
                stderr=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for _ in range(200)
        ]
        results = paced_read(processes, rate_bps=20 * 1024, timeout_s=240)
        codes = [p.wait(timeout=30) for p in processes]
        failures = [p.stderr.read() for p in processes if p.returncode and p.stderr]
        roams = [e for e in pool.clients["c1"].events() if e["event"] == "roam"]
        summary = "\n".join(f"epoch {e['epoch']}: {e['outcomes']}" for e in roams)
        assert codes == [0] * 200, f"{failures[:3]}\n{summary}\n{diagnostics(pool)}"
        digest = hashlib.sha256(data).digest()
        assert [r for r in results if r != (digest, len(data))] == [], summary
        # All 200 were open at one roam, and every one of them moved.
        busiest = max(roams, key=lambda e: e["connections"])
        assert busiest["connections"] == 200, f"{summary}\n{diagnostics(pool)}"
        assert busiest["outcomes"] == {"migrated": 200}, f"{summary}\n{diagnostics(pool)}"


DIVERGENT_SERVICE = """
import hashlib, http.server, sys
name, port = sys.argv[1].encode(), int(sys.argv[2])
def stream(n):
    out, block, i = bytearray(), b"", 0
    while len(out) < n:
        block = hashlib.sha256(name + i.to_bytes(8, "big")).digest() * 32
        out += block
        i += 1
    return bytes(out[:n])
BODY = stream(16 * 1024 * 1024)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_a_service_that_differs_between_replicas_is_reset_not_spliced() -> None:
    with live_pool(
        tick=1.0, m=1, service="none", min_switches=2, switch_window=12.0, first_switch_after=3.0
    ) as pool:
        # Small receive buffers: the 16 MiB answer stays on the wire at curl's 1 MiB/s.
        pool.lab["c1"].sysctl("net.ipv4.tcp_rmem", "4096 16384 65536")
        pool.create()
        script = pool.workdir / "divergent.py"
        script.write_text(DIVERGENT_SERVICE)
        for host in pool.server_hosts:
            pool.lab[host].run(["ip", "link", "set", "lo", "up"], check=True)
            pool.lab[host].popen([sys.executable, str(script), host, str(SERVICE_PORT)])
            pool.start_server(host)
        pool.start_client("c1")
        pool.wait_ready()
        pool.wait_for_schedule(1.0)
        out = pool.workdir / "divergent.out"
        status, _detail, _ = download(pool, "any", "1M", out)
        assert status != 0, "the download should have been reset at the first roam"
        outcomes = [h["outcome"] for h in handoffs(pool)]
        assert "diverged" in outcomes, outcomes
        body = out.read_bytes()
        assert len(body) > 100_000
        # Every byte received came from one replica: the stream is a prefix of exactly one.
        matches = []
        for host in pool.server_hosts:
            block = b"".join(
                hashlib.sha256(host.encode() + i.to_bytes(8, "big")).digest() * 32
                for i in range(len(body) // 1024 + 2)
            )
            if block.startswith(body):
                matches.append(host)
        assert len(matches) == 1, f"received bytes are a prefix of {matches}"
        servers = list(pool.servers.values())
        assert any(
            e["event"] == "reincarnation_failed" and e["status"] == "diverged"
            for s in servers
            for e in s.events()
        )


def test_forged_replayed_and_foreign_reincarnation_requests_create_nothing() -> None:
    from migrate.channel import Kind, Sealer
    from migrate.checkpoint import Checkpoint, TcpSnapshot, checkpoint_key, seal_checkpoint
    from migrate.kernel.deployment import DeploymentDir
    from migrate.registration import Bundle
    from migrate.reincarnation import Phase, Request, context, request_sealer

    # No cover from the shims: the crafted requests are sealed with alice's key, and her shim's
    # cover (20 a second, sealed with the same sender and counters) would push them below the
    # server's replay window before they arrive (StaleMessageError, not the error under test).
    # Every rejection logged in full: the test looks for the reason of each request it sends.
    with live_pool(
        clients=2,
        outsiders=1,
        tick=20.0,
        m=1,
        client_extra=("--cover-rate", "0"),
        server_extra=("--rejection-log-period", "0"),
    ) as pool:
        started(pool)
        secret = DeploymentDir(pool.deployment_dir).secret()
        alice = Bundle.decode(pool.bundle_path("c1").read_bytes())
        bob = Bundle.decode(pool.bundle_path("c2").read_bytes())
        pool.operate("revoke", str(pool.deployment_dir), "c2")
        # A server takes requests for an epoch from 5 s before its start to 10 s after
        # (migrate.reincarnation.in_request_window): wait for an epoch that starts about now
        # (epochs are 20 to 40 s long: a bounded wait), with seconds to spare for the sends.
        epochs = pool.schedule(1, 20)
        deadline = time.time() + 45.0
        while (
            not [e for e in epochs if -4.0 <= time.time() - e["start"] <= 4.0]
            and time.time() < deadline
        ):
            time.sleep(0.1)
        epoch = next(e for e in epochs if -4.0 <= time.time() - e["start"] <= 4.0)
        server = pool.host_of(epoch["server"])
        target = str(pool.lab[server].address)

        def request(bundle: Bundle, host: str, port: int, epoch_index: int) -> bytes:
            checkpoint = Checkpoint(
                conn_id=os.urandom(16),
                client=(str(pool.lab[host].address), port),
                vport=80,
                epoch=epoch_index,
                counter=1,
                taken_at=time.time(),
                tcp=TcpSnapshot(1000, 2000, 1448, 7, 7, True, True, 5),
                codec="http",
                c2s_fresh=0,
                c2s_pos=0,
                s2c_fresh=0,
                s2c_pos=0,
                c2s_hash=hashlib.sha256(b"").digest(),
                s2c_hash=hashlib.sha256(b"").digest(),
            )
            sealed = seal_checkpoint(
                checkpoint,
                checkpoint_key(secret.group_key, epoch_index),
                secret.deployment_id,
                os.urandom,
            )
            body = Request(Phase.PREPARE, epoch_index, port, 80, 0, 0, 0, sealed, b"").encode()
            sealer = request_sealer(bundle.channel_key, bundle.deployment_id, bundle.client_id)
            return sealer.seal(Kind.REINCARNATE_REQUEST, body, time.time())

        forged = Sealer(
            os.urandom(32), alice.client_id, context(alice.deployment_id, alice.client_id)
        ).seal(Kind.REINCARNATE_REQUEST, b"\x01" + bytes(40), time.time())
        attempts = [
            ("c1", forged, "AuthenticationError"),
            ("o1", request(alice, "c1", 55556, epoch["epoch"]), "AuthenticationError"),
            ("c1", request(alice, "c2", 55557, epoch["epoch"]), "AuthenticationError"),
            ("c1", request(alice, "c1", 55558, pool.chain_length + 1), "SubscriptionExpiredError"),
        ]
        attempts.append(("c2", request(bob, "c2", 55559, epoch["epoch"]), "RevokedClientError"))
        sent_at = time.time()
        for host, payload, _ in attempts:
            send_datagrams(pool.lab[host], target, 47476, [payload])
        # A genuine PREPARE (for a connection that does not exist) is admitted once; its
        # replay is refused. (Sealed now: a request is fresh for 5 s, and the sends above
        # each start a process.)
        genuine = request(alice, "c1", 55555, epoch["epoch"])
        send_datagrams(pool.lab["c1"], target, 47476, [genuine])
        time.sleep(0.5)
        send_datagrams(pool.lab["c1"], target, 47476, [genuine])
        time.sleep(1.0)
        events = [e for e in pool.servers[server].events() if e["ts"] >= sent_at]
        rejected = [e["error"] for e in events if e["event"] == "reincarnation_rejected"]
        for _host, _payload, error in attempts:
            assert error in rejected, (error, rejected)
        assert "ReplayedMessageError" in rejected, rejected
        prepared = [e["client"] for e in events if e["event"] == "prepared"]
        # Only the genuine one was prepared, once.
        assert prepared == [f"{pool.lab['c1'].address}:55555"], (prepared, rejected)
        # Nothing was created for the refused ones: one service connection at most (the
        # admitted PREPARE's), none for the five refused.
        services = (
            pool.lab[server]
            .run(["ss", "-tnH", "state", "established", "dst", f"127.0.0.1:{SERVICE_PORT}"])
            .stdout.splitlines()
        )
        assert len(services) <= 1, services
