"""Creating and removing a lab's namespaces, links, addresses and routes (pyroute2).

``build_network`` turns a ``Topo`` plus its static routes into kernel state, in an order that
makes every step valid: namespaces and their sysctls first (IPv6 off before any interface
exists, so no router solicitation or DAD packet appears in captures), bridges, veth pairs
created straight into their namespaces (so no interface ever exists in the root namespace),
addresses, shaping, links up, loss rules, offloads and finally routes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from labs.errors import LabError
from labs.naming import BRIDGE_IFNAME
from labs.nsexec import run_in_netns
from labs.routing import Route
from labs.shaping import apply_loss, apply_qdiscs, set_offloads
from labs.topo import NodeKind, Topo

# Every namespace: no IPv6, so that captures hold only the traffic a test makes.
BASE_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}
ROUTER_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.forwarding": "1",
    "net.ipv4.conf.default.forwarding": "1",
}


def create_namespace(name: str) -> None:
    try:
        netns.create(name)
    except OSError as error:
        raise LabError(f"cannot create namespace {name}: {error.strerror or error}") from None


def write_sysctls(namespace: str, where: str, values: dict[str, str]) -> None:
    """Set sysctls inside ``namespace`` (``/proc/sys/net`` is per namespace of the writer)."""
    if not values:
        return
    settings = [f"{key}={value}" for key, value in values.items()]
    run_in_netns(
        namespace, ["sysctl", "-q", "-w", *settings], where=where, check=True, timeout_s=10
    )


@contextmanager
def _netlink(namespaces: dict[str, str]) -> Iterator[dict[str, IPRoute]]:
    with ExitStack() as stack:
        sockets = {}
        for node, name in namespaces.items():
            sockets[node] = stack.enter_context(IPRoute(netns=name))
        yield sockets


def _index(ipr: IPRoute, ifname: str, where: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} not found in {where}")
    return int(found[0])


@contextmanager
def _step(description: str) -> Iterator[None]:
    """Turn a netlink or OS failure into a one-line ``LabError`` saying what was being done."""
    try:
        yield
    except NetlinkError as error:
        raise LabError(f"{description} failed: {error}") from None
    except OSError as error:
        raise LabError(f"{description} failed: {error.strerror or error}") from None


def build_network(
    topo: Topo,
    routes: dict[str, list[Route]],
    namespace_of: dict[str, str],
    table: str,
) -> None:
    """Create everything ``topo`` describes, in the namespaces ``namespace_of`` names."""
    nodes = topo.nodes()
    for node in nodes:
        create_namespace(namespace_of[node.name])
    for node in nodes:
        sysctls = dict(BASE_SYSCTLS)
        if node.kind is NodeKind.ROUTER:
            sysctls |= ROUTER_SYSCTLS
        write_sysctls(namespace_of[node.name], node.name, sysctls)

    with _netlink(namespace_of) as ipr:
        for node in nodes:
            socket = ipr[node.name]
            with _step(f"loopback up in {node.name}"):
                socket.link("set", index=_index(socket, "lo", node.name), state="up")
            if node.kind is NodeKind.SWITCH:
                with _step(f"bridge in {node.name}"):
                    socket.link("add", ifname=BRIDGE_IFNAME, kind="bridge")
                    socket.link("set", index=_index(socket, BRIDGE_IFNAME, node.name), state="up")

        for link in topo.links():
            a, b = link.end1, link.end2
            with _step(f"veth {a.node}:{a.ifname} - {b.node}:{b.ifname}"):
                # the peer is created straight in its namespace: nothing touches the root netns
                ipr[a.node].link(
                    "add",
                    ifname=a.ifname,
                    kind="veth",
                    peer={"ifname": b.ifname, "net_ns_fd": namespace_of[b.node]},
                )

        for node in nodes:
            socket = ipr[node.name]
            bridge = None
            if node.kind is NodeKind.SWITCH:
                bridge = _index(socket, BRIDGE_IFNAME, node.name)
            for interface in topo.interfaces(node.name):
                where = f"{node.name}:{interface.ifname}"
                index = _index(socket, interface.ifname, node.name)
                if bridge is not None:
                    with _step(f"attach {where} to the bridge"):
                        socket.link("set", index=index, master=bridge)
                if interface.address is not None:
                    address = interface.address
                    with _step(f"address {address} on {where}"):
                        socket.addr(
                            "add",
                            index=index,
                            address=str(address.ip),
                            prefixlen=address.network.prefixlen,
                        )
                egress = interface.egress
                if egress.rate_mbit is not None or egress.delay_ms > 0:
                    with _step(f"shaping on {where}"):
                        apply_qdiscs(socket, index, egress)
                with _step(f"{where} up"):
                    socket.link("set", index=index, state="up")

        # the loss of a direction is applied where its packets arrive (see labs.shaping)
        arriving_loss: dict[str, dict[str, int]] = {node.name: {} for node in nodes}
        for link in topo.links():
            for sender, receiver in ((link.end1, link.end2), (link.end2, link.end1)):
                if sender.egress.loss_per_10000 > 0:
                    arriving_loss[receiver.node][receiver.ifname] = sender.egress.loss_per_10000
        for node in nodes:
            apply_loss(namespace_of[node.name], node.name, table, arriving_loss[node.name])
            for interface in topo.interfaces(node.name):
                if interface.offloads_off:
                    set_offloads(
                        namespace_of[node.name], node.name, interface.ifname, enabled=False
                    )

        for node_name, node_routes in routes.items():
            socket = ipr[node_name]
            for route in node_routes:
                with _step(f"route to {route.destination} via {route.gateway} in {node_name}"):
                    socket.route(
                        "add",
                        dst=str(route.destination),
                        gateway=str(route.gateway),
                        oif=_index(socket, route.ifname, node_name),
                    )
