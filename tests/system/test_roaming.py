"""The roaming data path on a real pool: 3 servers, 2 subscribed clients, 1 outsider.

Real processes throughout: ``roam server`` in front of python's http.server on each server
host, ``roam client`` on c1, curl as the client application, tcpdump for evidence.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labs import Lab, PoolTopo
from labs.capture import tcp_flag_counts
from labs.clients import send_datagrams
from labs.roaming import RoamingLab, roam_argv
from migrate.channel import Kind, Sealer, derive_key
from migrate.ratelog import RejectionLimiter
from migrate.registration import Bundle
from migrate.updates import EpochSync, RoamingUpdate, encode_update, update_context
from proxy.daemon import DEFAULT_CONTROL_PORT

pytestmark = pytest.mark.system

ROAM_SECONDS = 20.0
TICK = 0.25


@pytest.fixture(scope="module")
def pool() -> Iterator[RoamingLab]:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    lab = Lab(PoolTopo(servers=3, clients=2, outsiders=1)).start()
    try:
        roaming = RoamingLab(lab, tick=TICK, m=2, update_period=0.5, start_delay=2.0)
        roaming.create()
        for host in roaming.server_hosts:
            roaming.start_service(host)
            roaming.start_server(host)
        roaming.start_client("c1")
        roaming.wait_ready()
        roaming.wait_for_schedule(0.5)
        yield roaming
        roaming.stop()
    finally:
        lab.close()


def windows(roaming: RoamingLab, first: int, last: int) -> dict[str, list[tuple[float, float]]]:
    """Each server host's open windows for epochs first..last, from ``roam schedule``."""
    result: dict[str, list[tuple[float, float]]] = {h: [] for h in roaming.server_hosts}
    for epoch in roaming.schedule(first, last - first + 1):
        host = roaming.host_of(epoch["server"])
        result[host].append(
            (
                epoch["start"] - roaming.delta,
                epoch["start"] + epoch["length"] + roaming.delta + roaming.gamma,
            )
        )
    return result


def current_epoch(roaming: RoamingLab, now: float) -> int:
    for epoch in roaming.schedule(1, 100_000):
        if epoch["start"] <= now < epoch["start"] + epoch["length"]:
            return int(epoch["epoch"])
    raise AssertionError("now is outside the first 100000 epochs")


def test_new_connections_reach_the_scheduled_server_and_services_see_only_their_windows(
    pool: RoamingLab,
) -> None:
    lab = pool.lab
    captures = {}
    for host in pool.server_hosts:
        path = pool.workdir / f"lo-{host}.pcap"
        captures[host] = (lab[host].capture("lo", path, bpf_filter=["tcp", "port", "8000"]), path)
    for context, _ in captures.values():
        context.__enter__()
    first_epoch = current_epoch(pool, time.time())
    answers = []
    try:
        deadline = time.time() + ROAM_SECONDS
        while time.time() < deadline:
            began = time.time()
            result = lab["c1"].run(["curl", "-s", "--max-time", "2", pool.url("/whoami")])
            answers.append((began, time.time(), result.returncode, result.stdout.strip()))
            time.sleep(0.05)
    finally:
        for context, _ in captures.values():
            context.__exit__(None, None, None)
    last_epoch = current_epoch(pool, time.time()) + 1
    open_windows = windows(pool, max(1, first_epoch - 1), last_epoch)

    served = [a for a in answers if a[2] == 0]
    assert len(answers) >= 100
    assert len(served) >= 0.85 * len(answers), answers
    hosts_seen = set()
    for began, ended, _, host in served:
        assert host in open_windows, f"unexpected answer {host!r}"
        assert any(a < ended and began < b for a, b in open_windows[host]), (
            f"{host} answered between {began:.3f} and {ended:.3f}, outside its windows"
        )
        hosts_seen.add(host)
    assert hosts_seen == set(pool.server_hosts), "20 s of roaming should visit every server"

    from scapy.all import rdpcap

    for host, (_, path) in captures.items():
        packets = rdpcap(str(path))
        for packet in packets:
            when = float(packet.time)
            assert any(a - 0.01 <= when <= b + 0.1 for a, b in open_windows[host]), (
                f"the service on {host} got a packet at {when:.3f}, outside its windows"
            )
    # The service saw the client's own address (transparent inner connection).
    service_log = pool.services["s1"].log_path.read_text()
    assert str(lab["c1"].address) in service_log


def test_status_logs_and_state_files_are_for_the_shims_user_only(pool: RoamingLab) -> None:
    """They name the active server and the epoch ends: 0600 files in 0700 directories."""
    shims = [*pool.servers.values(), *pool.clients.values()]
    files = [path for s in shims for path in (s.status_path, s.log_json, s.stderr_path)]
    # A client's saved state (its chain key and counters): written at its first update.
    files += [Path(f"{pool.bundle_path(host)}.state") for host in pool.clients]
    deadline = time.monotonic() + 10
    while not all(path.exists() for path in files):
        missing = [str(path) for path in files if not path.exists()]
        assert time.monotonic() < deadline, f"never written: {missing}"
        time.sleep(0.05)
    files += sorted((pool.deployment_dir / "state").glob("*"))
    modes = {str(path): oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    print(modes)
    assert set(modes.values()) == {"0o600"}, modes
    for directory in {pool.workdir, pool.deployment_dir / "state"}:
        if directory.exists():  # the servers' state directory: made at the first control message
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_outsider_gets_no_answer_from_any_server(pool: RoamingLab) -> None:
    lab = pool.lab
    path = pool.workdir / "outsider.pcap"
    with lab["o1"].capture("eth0", path):
        for host in pool.server_hosts:
            result = lab["o1"].run(
                ["curl", "-s", "--max-time", "1.5", f"http://{lab[host].address}:80/whoami"]
            )
            assert result.returncode == 28, f"{host} answered the outsider: {result}"
    from scapy.all import ICMP, TCP, rdpcap

    packets = rdpcap(str(path))
    servers = {str(lab[h].address) for h in pool.server_hosts}
    from_servers = [p for p in packets if p.haslayer(TCP) and p["IP"].src in servers]
    assert from_servers == [], "a server answered the outsider's SYNs"
    assert not [p for p in packets if p.haslayer(ICMP)], "an ICMP error reached the outsider"
    assert tcp_flag_counts(path).get("R", 0) == 0


def _client_status(pool: RoamingLab) -> dict[str, object]:
    return json.loads(pool.clients["c1"].status_path.read_text())


def test_forged_replayed_and_foreign_updates_are_rejected(pool: RoamingLab) -> None:
    lab = pool.lab
    bundle = Bundle.decode(pool.bundle_path("c1").read_bytes())
    bob = Bundle.decode(pool.bundle_path("c2").read_bytes())
    c1 = str(lab["c1"].address)
    # A genuine update, captured on the wire.
    capture_path = pool.workdir / "updates.pcap"
    with lab["c1"].capture("eth0", capture_path, bpf_filter=["udp", "port", "47474"]):
        time.sleep(1.5)
    from scapy.all import UDP, rdpcap

    genuine = [bytes(p[UDP].payload) for p in rdpcap(str(capture_path)) if p.haslayer(UDP)]
    assert genuine, "no roaming update was seen on the wire"
    before = _client_status(pool)
    rejected_before = int(before["updates_rejected"])  # type: ignore[call-overload]
    now = time.time()
    sync = encode_update(RoamingUpdate(sync=EpochSync(1, 2, 1.0)))
    forged = Sealer(os.urandom(32), 0, update_context(bundle.deployment_id, bundle.client_id))
    for_bob = Sealer(
        derive_key(bob.channel_key, "roaming update s2c"),
        0,
        update_context(bob.deployment_id, bob.client_id),
    )
    attempts = {
        "MalformedMessageError": b"\x00garbage",
        "AuthenticationError": forged.seal(Kind.ROAMING_UPDATE, sync, now),
        "ReplayedMessageError": genuine[0],
        "AuthenticationError (for bob)": for_bob.seal(Kind.ROAMING_UPDATE, sync, now),
    }
    for payload in attempts.values():
        send_datagrams(pool.lab["o1"], c1, bundle.roaming_port, [payload])
    time.sleep(0.5)
    events = pool.clients["c1"].events()
    # Rejections are logged in full once per kind and period (migrate.ratelog), so each kind
    # shows within one period of now: this test's or an earlier one of the same period.
    period = RejectionLimiter().period_s
    rejections = [
        e for e in events if e["event"] == "update_rejected" and e["ts"] >= now - period - 0.1
    ]
    errors = [e["error"] for e in rejections]
    for expected in attempts:
        name = expected.split(" ")[0]
        assert name in errors or (
            name == "ReplayedMessageError" and "ReorderedMessageError" in errors
        ), f"{expected} not logged: {errors}"
    assert all(e["reason"] for e in rejections)
    # The counts reach the status file with the next accepted update (not once per rejection).
    deadline = time.monotonic() + 10
    after = _client_status(pool)
    while int(after["updates_rejected"]) < rejected_before + 4:  # type: ignore[call-overload]
        assert time.monotonic() < deadline, after
        time.sleep(0.1)
        after = _client_status(pool)
    assert after["key_index"] == before["key_index"]
    assert after["m"] == before["m"]
    # The shim kept following the schedule after the attempts.
    time.sleep(1.0)
    assert any(e["event"] == "epoch" and e["ts"] > now for e in pool.clients["c1"].events())


def random_datagrams(count: int) -> list[bytes]:
    """An outsider's flood: ``count`` datagrams of 64 random bytes."""
    return [os.urandom(64) for _ in range(count)]


def test_a_flood_of_forged_updates_writes_a_bounded_log(pool: RoamingLab) -> None:
    """An outsider's datagrams cannot write the client's log at the rate of its link."""
    bundle = Bundle.decode(pool.bundle_path("c1").read_bytes())
    c1 = str(pool.lab["c1"].address)
    flood = 1_000
    before = _client_status(pool)
    sent_at = time.time()
    send_datagrams(pool.lab["o1"], c1, bundle.roaming_port, random_datagrams(flood))

    def counted() -> int:
        return int(_client_status(pool)["updates_rejected"])  # type: ignore[call-overload]

    # The counts reach the status file with the next accepted update, not once per datagram.
    deadline = time.monotonic() + 10
    # (Most of them: the kernel may drop some of a burst before the shim reads them.)
    while counted() < int(before["updates_rejected"]) + flood // 2:  # type: ignore[call-overload]
        assert time.monotonic() < deadline, f"{counted()} rejections counted"
        time.sleep(0.1)
    lines = [
        e
        for e in pool.clients["c1"].events()
        if e["event"] in ("update_rejected", "rejections_suppressed") and e["ts"] >= sent_at
    ]
    print(f"{counted() - int(before['updates_rejected'])} rejected, {len(lines)} log lines")  # type: ignore[call-overload]
    # One full line per kind of error (a handful), no count yet: the period has not ended.
    assert len(lines) <= 8, lines[:10]


def test_a_flood_of_forged_control_datagrams_writes_a_bounded_server_log(
    pool: RoamingLab,
) -> None:
    """An outsider's datagrams at a server's group-control port cannot write its log at the
    rate of its link: the first of each kind in full, then counts (``--rejection-log-period``,
    60 s by default)."""
    host = pool.server_hosts[0]
    server = str(pool.lab[host].address)
    flood = 1_000

    def counted() -> int:
        status = json.loads(pool.servers[host].status_path.read_text())
        return int(status.get("control_rejected", 0))

    before = counted()
    sent_at = time.time()
    send_datagrams(pool.lab["o1"], server, DEFAULT_CONTROL_PORT, random_datagrams(flood))
    # The count reaches the status file at the server's next tick (most of the flood: the
    # kernel may drop some of a burst before the shim reads it).
    deadline = time.monotonic() + 4 * TICK + 10
    while counted() < before + flood // 2:
        assert time.monotonic() < deadline, f"{counted() - before} rejections counted"
        time.sleep(0.1)
    lines = [
        e
        for e in pool.servers[host].events()
        if e["event"] in ("control_rejected", "rejections_suppressed") and e["ts"] >= sent_at
    ]
    print(f"{counted() - before} rejected, {len(lines)} log lines")
    assert 1 <= len(lines) <= 8, lines[:10]


def test_revoked_client_gets_no_updates(pool: RoamingLab) -> None:
    result = pool.operate("revoke", str(pool.deployment_dir), "c2")
    assert result.stdout.count(": applied") == 3, result.stdout
    time.sleep(1.5)
    for host, shim in pool.servers.items():
        events = shim.events()
        assert any(e["event"] == "control_applied" and e["message"] == "Revoke" for e in events), (
            host
        )
        assert any(
            e["event"] == "update_skipped"
            and e["client"] == "c2"
            and e["error"] == "RevokedClientError"
            for e in events
        ), host
    # The legitimate client still receives updates.
    recent = [e for e in pool.clients["c1"].events() if e["event"] == "update_accepted"]
    assert recent
    assert recent[-1]["ts"] > time.time() - 2.0


def _epoch_starts(shim_events: list[dict[str, object]]) -> dict[int, float]:
    return {
        int(e["epoch"]): float(e["start"])  # type: ignore[arg-type]
        for e in shim_events
        if e["event"] == "epoch"
    }


def test_threat_change_and_trigger_take_effect_everywhere_at_the_same_epoch(
    pool: RoamingLab,
) -> None:
    result = pool.operate(
        "threat", "--deployment", str(pool.deployment_dir), "--m", "1", "--lead", "1.5"
    )
    assert result.stdout.count(": applied") == 3, result.stdout
    from_epoch = int(result.stdout.split("from epoch ")[1].split()[0])
    time.sleep(4.0)
    shims = [*pool.servers.values(), pool.clients["c1"]]
    starts = [_epoch_starts(shim.events()) for shim in shims]
    common = sorted(set.intersection(*(set(s) for s in starts)))
    after_change = [e for e in common if e >= from_epoch]
    assert len(after_change) >= 3, (from_epoch, common[-5:])
    for epoch in after_change:
        values = [s[epoch] for s in starts]
        assert max(values) - min(values) < 0.05, (epoch, values)
    for earlier, later in itertools.pairwise(after_change):
        if later == earlier + 1:
            assert starts[0][later] - starts[0][earlier] <= 2 * TICK + 1e-6  # m = 1

    result = pool.operate("trigger", "--deployment", str(pool.deployment_dir))
    assert result.stdout.count(": applied") == 3, result.stdout
    line = result.stdout.splitlines()[0]
    next_epoch = int(line.split("for epoch ")[1].split()[0])
    time.sleep(2.0)
    starts = [_epoch_starts(shim.events()) for shim in shims]
    assert all(next_epoch in s for s in starts), f"epoch {next_epoch} missing somewhere"
    values = [s[next_epoch] for s in starts]
    assert max(values) - min(values) < 0.05, values


def _leftovers(lab: Lab, host: str) -> list[str]:
    node = lab[host]
    found = []
    tables = node.run(["nft", "list", "tables"], check=True).stdout
    found += [line for line in tables.splitlines() if "roam_" in line]
    rules = node.run(["ip", "rule", "show"], check=True).stdout
    found += [
        line
        for line in rules.splitlines()
        if "lookup" in line and not any(name in line for name in ("local", "main", "default"))
    ]
    return found


def test_sigterm_and_sigkill_with_cleanup_leave_nothing(pool: RoamingLab) -> None:
    lab = pool.lab
    codes = {
        f"{s.kind}-{s.host}": s.stop(signal.SIGTERM)
        for s in [*pool.clients.values(), *pool.servers.values()]
    }
    assert set(codes.values()) == {0}, codes
    for host in [*pool.server_hosts, "c1"]:
        assert _leftovers(lab, host) == [], host
    routes = lab["c1"].run(["ip", "route", "show"], check=True).stdout
    assert str(pool.vip) not in routes
    # Crash: SIGKILL leaves state behind; roam cleanup removes it.
    server = pool.start_server("s1")
    client = pool.start_client("c1")
    pool.wait_ready()
    for shim in (server, client):
        shim.stop(signal.SIGKILL)
    assert _leftovers(lab, "s1"), "a killed server shim should have left its table"
    cleanup = subprocess.run(
        roam_argv("cleanup"), capture_output=True, text=True, timeout=60, check=False
    )
    assert cleanup.returncode == 0, cleanup.stderr
    for host in ("s1", "c1"):
        assert _leftovers(lab, host) == [], host
    routes = lab["c1"].run(["ip", "route", "show"], check=True).stdout
    assert str(pool.vip) not in routes
    localnet = lab["s1"].run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"], check=True)
    assert localnet.stdout.strip() == "0"
    records = Path(os.environ.get("SERVER_ROAMING_RUN_DIR", "/run/server-roaming")) / "instances"
    killed = {str(server.process.pid), str(client.process.pid)}
    left = [p.name for p in records.glob("*") if any(pid in p.name for pid in killed)]
    assert left == [], left
