"""Topologies as pure data: names, addressing, routes. No kernel, no root."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from labs import ConfigError, LinkParams, NodeKind, PaperTopo, PoolTopo, Topo
from labs.naming import LabId, check_node_name, parse_namespace
from labs.routing import DEFAULT_ROUTE, static_routes


def test_paper_topology_shape_rates_and_addresses() -> None:
    topo = PaperTopo(scale=5)
    kinds = {node.name: node.kind for node in topo.nodes()}
    assert kinds == {
        "r1": NodeKind.ROUTER,
        "r2": NodeKind.ROUTER,
        "c": NodeKind.HOST,
        "a": NodeKind.HOST,
        "s1": NodeKind.HOST,
        "s2": NodeKind.HOST,
    }
    assert topo.bottleneck_mbit == 10.0
    assert all(link.end1.egress.rate_mbit == 10.0 for link in topo.links())
    assert all(link.end2.egress.rate_mbit == 10.0 for link in topo.links())
    # routers add their links first, so they hold the .1 of every access segment
    assert topo.addresses_of("c") == [IPv4Interface("10.0.1.2/24")]
    assert topo.addresses_of("r1")[0] == IPv4Interface("10.0.1.1/24")
    assert [i.ifname for i in topo.interfaces("r1")] == ["eth0", "eth1", "eth2"]


def test_paper_topology_routes_follow_shortest_paths() -> None:
    topo = PaperTopo()
    routes = static_routes(topo)
    s1_net = topo.addresses_of("s1")[0].network
    r2_on_bottleneck = topo.interfaces("r2")[0].address
    assert r2_on_bottleneck is not None
    r1_routes = {route.destination: route for route in routes["r1"]}
    assert r1_routes[s1_net].gateway == r2_on_bottleneck.ip
    assert r1_routes[s1_net].ifname == "eth2"
    c_routes = {route.destination: route for route in routes["c"]}
    assert c_routes[DEFAULT_ROUTE].gateway == IPv4Address("10.0.1.1")
    assert c_routes[s1_net].gateway == IPv4Address("10.0.1.1")
    assert DEFAULT_ROUTE not in {route.destination for route in routes["r1"]}


def test_routes_never_cross_a_host() -> None:
    class HostInTheMiddle(Topo):
        def build(self) -> None:
            a, m, b = self.add_host("a"), self.add_host("m"), self.add_host("b")
            self.add_link(a, m)
            self.add_link(m, b)

    assert static_routes(HostInTheMiddle()) == {"a": [], "m": [], "b": []}


def test_pool_topology_is_one_switched_subnet() -> None:
    topo = PoolTopo(servers=3, clients=2, outsiders=1)
    assert topo.subnet() == IPv4Network("10.0.1.0/24")
    names = ["s1", "s2", "s3", "c1", "c2", "o1"]
    assert [n.name for n in topo.nodes() if n.kind is NodeKind.HOST] == names
    addresses = [topo.addresses_of(name)[0] for name in names]
    assert all(address.network == topo.subnet() for address in addresses)
    assert len(set(addresses)) == len(names)
    assert topo.interfaces("lan")[0].address is None
    assert all(routes == [] for routes in static_routes(topo).values())


def test_pool_topology_takes_a_given_subnet() -> None:
    topo = PoolTopo(servers=1, clients=1, subnet="192.168.77.0/24")
    assert topo.subnet() == IPv4Network("192.168.77.0/24")
    assert topo.addresses_of("s1") == [IPv4Interface("192.168.77.1/24")]


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoolTopo(servers=-1),
        lambda: PoolTopo(servers=0, clients=0, outsiders=0),
        lambda: PoolTopo(servers=True),
        lambda: PaperTopo(scale=0),
        lambda: PaperTopo(rate_mbit=-1),
    ],
)
def test_bad_ready_made_topologies_are_refused(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]


def test_explicit_addresses_and_subnets() -> None:
    topo = Topo()
    a, b = topo.add_host("a"), topo.add_host("b")
    topo.add_link(a, b, address1="172.16.5.10/24")
    assert topo.addresses_of("a") == [IPv4Interface("172.16.5.10/24")]
    assert topo.addresses_of("b") == [IPv4Interface("172.16.5.1/24")]
    topo.add_link(a, b, subnet="10.99.0.0/30")
    assert topo.addresses_of("b")[1] == IPv4Interface("10.99.0.2/30")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda t: t.add_host("bad name"), "invalid node name"),
        (lambda t: t.add_host("x" * 30), "invalid node name"),
        (lambda t: (t.add_host("a"), t.add_host("a")), "duplicate node name"),
        (lambda t: t.add_link("a", "nobody"), "unknown node"),
        (lambda t: (t.add_host("a"), t.add_link("a", "a")), "cannot link to itself"),
        (
            lambda t: (t.add_switch("sw1"), t.add_switch("sw2"), t.add_link("sw1", "sw2")),
            "links between switches",
        ),
        (
            lambda t: (
                t.add_host("a"),
                t.add_switch("sw", subnet="10.5.0.0/24"),
                t.add_link("a", "sw", address1="10.6.0.1/24"),
            ),
            "not in subnet",
        ),
        (
            lambda t: (
                t.add_host("a"),
                t.add_host("b"),
                t.add_switch("sw", subnet="10.5.0.0/24"),
                t.add_link("a", "sw", address1="10.5.0.7"),
                t.add_link("b", "sw", address1="10.5.0.7"),
            ),
            "used twice",
        ),
        (
            lambda t: (t.add_switch("sw1", subnet="10.0.1.0/24"), t.add_switch("sw2")),
            None,
        ),
        (lambda t: t.add_switch("sw", subnet="10.0.0.0/31"), "at least a /30"),
        (
            lambda t: (
                t.add_host("a"),
                t.add_host("b"),
                t.add_link("a", "b", params={"rate_mbit": 1}),
            ),
            "must be LinkParams",
        ),
    ],
)
def test_topology_mistakes_are_config_errors(build: object, message: str | None) -> None:
    topo = Topo()
    if message is None:
        build(topo)  # type: ignore[operator]
        # an automatic subnet skips the one taken explicitly
        assert topo.subnet_of("sw2") != topo.subnet_of("sw1")
        return
    with pytest.raises(ConfigError, match=message):
        build(topo)  # type: ignore[operator]


def test_build_runs_once_and_an_empty_topology_is_refused() -> None:
    calls = []

    class Counting(Topo):
        def build(self) -> None:
            calls.append(1)
            self.add_host("h")

    topo = Counting()
    topo.nodes()
    topo.links()
    assert calls == [1]
    with pytest.raises(ConfigError, match="has no nodes"):
        Topo().nodes()


def test_lab_ids_and_namespace_names() -> None:
    lab_id = LabId(4711, "3f9a")
    assert str(lab_id) == "4711-3f9a"
    assert LabId.parse("4711-3f9a") == lab_id
    assert lab_id.namespace("r1") == "roam-4711-3f9a-r1"
    assert lab_id.nft_table == "roam_4711_3f9a"
    assert parse_namespace("roam-4711-3f9a-r1") == (lab_id, "r1")
    for foreign in ("roamtr123a", "roam-x-3f9a-r1", "sr-1-abcd-h", "roam-4711-3f9a-"):
        assert parse_namespace(foreign) is None
    with pytest.raises(ConfigError):
        LabId.parse("../etc")
    new = LabId.new()
    assert new.owner_pid > 0
    assert len(new.token) == 4
    assert check_node_name("s1") == "s1"


def test_params_apply_per_direction() -> None:
    topo = Topo()
    a, b = topo.add_host("a"), topo.add_host("b")
    topo.add_link(a, b, LinkParams(loss_pct=5), reverse=LinkParams(rate_mbit=3))
    link = topo.links()[0]
    assert link.end1.egress.loss_pct == 5
    assert link.end2.egress.rate_mbit == 3
    assert link.end1.offloads_off
    assert link.end2.offloads_off
