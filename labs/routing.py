"""Static routes along shortest paths, computed from a topology (pure, no kernel).

For every host and router, every segment it is not attached to gets one route via the first
router on a shortest path (fewest router hops; ties go to the first interface, then to router
names in order, so the plan is the same on every run). Only routers forward: a path never
crosses a host. A host whose routes all leave through one gateway also gets a default route
through it, so that addresses outside the topology (a service VIP, say) are routable as on a
real network; routers get none, so a packet to nowhere is dropped instead of looping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from labs.topo import InterfaceSpec, NodeKind, Topo

DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class Route:
    destination: IPv4Network
    gateway: IPv4Address
    ifname: str


def _addressed_members(topo: Topo) -> dict[int, list[InterfaceSpec]]:
    """Per segment, the interfaces with an address (hosts and routers), by node name."""
    members: dict[int, list[InterfaceSpec]] = {s.index: [] for s in topo.segments()}
    for node in topo.nodes():
        for interface in topo.interfaces(node.name):
            if interface.address is not None:
                members[interface.segment].append(interface)
    for interfaces in members.values():
        interfaces.sort(key=lambda i: (i.node, i.ifname))
    return members


def static_routes(topo: Topo) -> dict[str, list[Route]]:
    """The routes each host and router needs, in a stable order."""
    members = _addressed_members(topo)
    subnets = {s.index: s.subnet for s in topo.segments()}
    kinds = {node.name: node.kind for node in topo.nodes()}
    plan: dict[str, list[Route]] = {}
    for node in topo.nodes():
        if node.kind is NodeKind.SWITCH:
            continue
        own = [i for i in topo.interfaces(node.name) if i.address is not None]
        reached: dict[int, tuple[IPv4Address, str] | None] = {i.segment: None for i in own}
        visited_routers = {node.name}
        queue: deque[tuple[str, tuple[IPv4Address, str]]] = deque()
        for interface in own:
            for neighbour in members[interface.segment]:
                if kinds[neighbour.node] is not NodeKind.ROUTER:
                    continue
                if neighbour.node in visited_routers or neighbour.address is None:
                    continue
                visited_routers.add(neighbour.node)
                queue.append((neighbour.node, (neighbour.address.ip, interface.ifname)))
        while queue:
            router, first_hop = queue.popleft()
            for interface in topo.interfaces(router):
                if interface.address is None or interface.segment in reached:
                    continue
                reached[interface.segment] = first_hop
                for neighbour in members[interface.segment]:
                    if kinds[neighbour.node] is not NodeKind.ROUTER:
                        continue
                    if neighbour.node in visited_routers:
                        continue
                    visited_routers.add(neighbour.node)
                    queue.append((neighbour.node, first_hop))
        routes = [
            Route(subnets[segment], hop[0], hop[1])
            for segment, hop in sorted(reached.items())
            if hop is not None
        ]
        gateways = {(route.gateway, route.ifname) for route in routes}
        if node.kind is NodeKind.HOST and len(gateways) == 1:
            gateway, ifname = gateways.pop()
            routes.append(Route(DEFAULT_ROUTE, gateway, ifname))
        plan[node.name] = routes
    return plan
