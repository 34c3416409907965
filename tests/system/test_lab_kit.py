"""The lab kit on a real kernel: shaped links, routing, hosts, services, clients, capture."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from labs import (
    CommandFailedError,
    CommandTimeoutError,
    ConfigError,
    Lab,
    LinkParams,
    PaperTopo,
    PoolTopo,
    ServiceStartError,
    Topo,
    count_tcp_packets,
    tcp_flag_counts,
)
from labs.clients import curl, iperf3, ping, redis_benchmark
from labs.linkcheck import LinkTopo
from labs.naming import NETNS_DIR
from labs.services import start_http_server, start_iperf3_server, start_nginx, start_redis

pytestmark = pytest.mark.system

LabFactory = Callable[..., Lab]  # the lab_factory fixture (tests/system/conftest.py)

REPO = Path(__file__).resolve().parents[2]
LINKCHECK_ARGS = ["--rate-mbit", "20", "--loss-pct", "10", "--duration-s", "2", "--json"]


def test_20_mbit_link_measures_within_15_percent(lab_factory: LabFactory) -> None:
    lab = lab_factory(LinkTopo(LinkParams(rate_mbit=20)))
    with start_iperf3_server(lab["b"]):
        result = iperf3(lab["a"], lab["b"].address, duration_s=3, omit_s=1)
    print(f"20 Mbit/s link: measured {result.received_mbit:.2f} Mbit/s")
    assert 17.0 <= result.received_mbit <= 23.0


def test_linkcheck_cli_measures_10_percent_loss(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "roam_cli.main", "lab", "linkcheck", *LINKCHECK_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    print(f"linkcheck 20 Mbit/s, 10 % loss: {report}")
    assert set(report) == {
        "configured_mbit",
        "measured_mbit",
        "configured_loss_pct",
        "measured_loss_pct",
    }
    assert report["configured_mbit"] == 20
    assert report["configured_loss_pct"] == 10
    assert 5.0 <= report["measured_loss_pct"] <= 15.0
    assert 0 < report["measured_mbit"] <= 23.0


def test_loss_measured_by_fast_ping_over_2000_probes(lab_factory: LabFactory) -> None:
    class OneWayLoss(Topo):
        def build(self) -> None:
            a, b = self.add_host("a"), self.add_host("b")
            # loss only from a to b, so that a ping's round trip sees it once
            self.add_link(a, b, LinkParams(loss_pct=10), reverse=LinkParams())

    lab = lab_factory(OneWayLoss())
    result = ping(lab["a"], lab["b"].address, count=2000, interval_s=0.002, wait_s=1)
    print(f"10 % loss, ping: measured {result.loss_pct:.2f} % of {result.transmitted}")
    assert result.transmitted == 2000
    assert 5.0 <= result.loss_pct <= 15.0


@pytest.mark.parametrize("lab", [PaperTopo(scale=10)], indirect=True)
def test_paper_topology_routes_end_to_end(lab: Lab, tmp_path: Path) -> None:
    for router in PaperTopo.ROUTERS:
        assert lab[router].read_sysctl("net.ipv4.ip_forward") == "1"
    content = {}
    for server in PaperTopo.SERVERS:
        root = tmp_path / server
        root.mkdir()
        content[server] = f"hello from {server}\n".encode() * 100
        (root / "file.txt").write_bytes(content[server])
    services = [
        start_http_server(lab["s1"], tmp_path / "s1", port=8000),
        start_nginx(lab["s2"], tmp_path / "s2", port=80),
    ]
    for server, service in zip(PaperTopo.SERVERS, services, strict=True):
        result = curl(lab["c"], service.url("/file.txt"), timeout_s=20)
        assert result.ok, result.error
        assert result.body == content[server]
        assert result.time_total_s > 0
    # the attacker's side is routed too
    assert ping(lab["a"], lab["s2"].address, count=3, interval_s=0.05).received == 3


def test_hosts_have_loopback_sysctls_and_tracked_programs(lab: Lab) -> None:
    # `lab` is the conftest's default PoolTopo(servers=2, clients=1, outsiders=1)
    host = lab["s1"]
    assert host.netns.startswith(f"roam-{lab.id}-")
    assert ping(host, "127.0.0.1", count=2, interval_s=0.05).received == 2
    host.sysctl("net.ipv4.conf.all.route_localnet", "1")
    assert host.read_sysctl("net.ipv4.conf.all.route_localnet") == "1"
    assert lab["s2"].read_sysctl("net.ipv4.conf.all.route_localnet") == "0"
    subnet = lab.subnet(PoolTopo.SWITCH)
    assert subnet.prefixlen == 24
    names = ["s1", "s2", "c1", "o1"]
    assert all(lab[name].address in subnet for name in names)
    assert len({lab[name].address for name in names}) == len(names)
    assert lab["c1"].run(["ping", "-c", "1", "-W", "2", str(lab["o1"].address)]).returncode == 0
    # the bridge lives in the switch's own namespace
    switch_links = lab[PoolTopo.SWITCH].run(["ip", "-br", "link"], check=True).stdout
    assert "br0" in switch_links
    # a VIP outside the subnet, routed through the LAN (what a client shim would add)
    lab["c1"].add_route("10.200.0.1/32", ifname="eth0")
    assert "10.200.0.1 dev eth0" in lab["c1"].run(["ip", "route"], check=True).stdout
    sleeper = lab["c1"].popen(["sleep", "60"])
    assert sleeper.poll() is None
    with pytest.raises(CommandFailedError) as failed:
        host.run(["false"], check=True)
    assert isinstance(failed.value, subprocess.CalledProcessError)
    assert "false in s1 exited with status 1" in str(failed.value)
    with pytest.raises(CommandTimeoutError):
        host.run(["sleep", "5"], timeout=0.3)
    with pytest.raises(ConfigError, match="missing programs: no-such-program"):
        host.run(["no-such-program"])
    # the fixture checks that the sleeper is stopped and nothing is left


def test_shaped_link_turns_offloads_off(lab_factory: LabFactory) -> None:
    lab = lab_factory(LinkTopo(LinkParams(rate_mbit=50)))
    features = lab["a"].run(["ethtool", "-k", "eth0"], check=True).stdout
    assert "tcp-segmentation-offload: off" in features
    assert "generic-receive-offload: off" in features


def test_services_clients_and_rst_capture(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(PoolTopo(servers=2, clients=1))
    server, client = lab["s1"], lab["c1"]
    redis = start_redis(server, port=6379)
    bench = redis_benchmark(client, redis.address, requests=2000, clients=4, tests=("set", "get"))
    assert {"SET", "GET"} <= set(bench.tests)
    assert bench.tests["GET"].requests_per_s > 0
    assert bench.tests["GET"].p50_latency_ms is not None
    with pytest.raises(ServiceStartError, match="redis-server on s1"):
        start_redis(server, port=6379, ready_timeout_s=5)  # the port is taken
    pcap = tmp_path / "c1.pcap"
    with client.capture("eth0", pcap) as capture:
        refused = curl(client, f"http://{server.address}:9/", timeout_s=5)
    assert refused.exit_status == 7  # could not connect
    assert not refused.ok
    assert (capture.packets_captured or 0) >= 2
    assert count_tcp_packets(pcap, "R") >= 1
    assert tcp_flag_counts(pcap)["S"] >= 1
    redis.stop()
    assert not redis.running


def test_two_labs_at_once(lab_factory: LabFactory) -> None:
    first = lab_factory(LinkTopo(LinkParams()))
    second = lab_factory(LinkTopo(LinkParams()))
    assert first.id != second.id
    assert not set(first.namespaces) & set(second.namespaces)
    # the same addresses in both: each lab is its own world
    assert first["b"].address == second["b"].address
    for lab in (first, second):
        assert ping(lab["a"], lab["b"].address, count=2, interval_s=0.05).received == 2
    first.close()
    assert not any((NETNS_DIR / name).exists() for name in first.namespaces)
    assert ping(second["a"], second["b"].address, count=2, interval_s=0.05).received == 2


def test_lab_is_removed_when_the_block_raises() -> None:
    lab = Lab(LinkTopo(LinkParams()))

    def fail_inside_the_lab() -> None:
        with lab:
            lab["a"].popen(["sleep", "60"])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside_the_lab()
    namespaces = lab.namespaces
    assert namespaces
    assert lab.state == "closed"
    assert not any((NETNS_DIR / name).exists() for name in namespaces)
    assert all(p.poll() is not None for p in lab.processes)
