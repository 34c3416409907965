"""Topologies: small classes whose ``build()`` adds hosts, routers, switches and links.

In the style of Mininet's ``Topo``: subclass, override ``build()``, call ``add_host``,
``add_router``, ``add_switch`` and ``add_link``. A topology is pure data: nothing touches the
kernel until a ``Lab`` is entered, so a mistake (bad name, bad address, bad link parameter)
raises a ``ConfigError`` before any namespace exists.

Addressing: every layer-2 segment (a point-to-point link, or a switch with everything attached
to it) gets a /24 from the topology's address pool (``10.0.0.0/16`` by default, starting at
``10.0.1.0/24``) unless a subnet is given; hosts and routers get the next free address of the
segment, in the order their links are added, unless an address is given. Address plans of two
labs may overlap: each lab lives in its own namespaces, never connected to the root namespace.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from labs.naming import check_node_name, interface_name
from labs.params import UNSHAPED, LinkParams
from migrate.errors import ConfigError

DEFAULT_ADDRESS_POOL = "10.0.0.0/16"
SEGMENT_PREFIXLEN = 24


class NodeKind(enum.Enum):
    HOST = "host"
    ROUTER = "router"  # a host with forwarding on and routes computed by the kit
    SWITCH = "switch"  # a bridge, alone in its own namespace


@dataclass(frozen=True)
class NodeSpec:
    name: str
    kind: NodeKind
    disable_offloads: bool = False


@dataclass(frozen=True)
class Segment:
    """One layer-2 segment: a point-to-point link or a switch and everything on it."""

    index: int
    subnet: IPv4Network
    switch: str | None


@dataclass(frozen=True)
class InterfaceSpec:
    """One end of a veth pair, as the namespace of ``node`` will see it."""

    node: str
    ifname: str
    peer: str
    peer_ifname: str
    address: IPv4Interface | None  # None on switch ports
    egress: LinkParams  # what this interface does to the traffic it sends
    offloads_off: bool
    segment: int


@dataclass(frozen=True)
class LinkSpec:
    end1: InterfaceSpec
    end2: InterfaceSpec


def _parse_network(value: str | IPv4Network, what: str) -> IPv4Network:
    try:
        network = ipaddress.ip_network(value, strict=True)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"invalid {what} {value!r}: {error}") from None
    if not isinstance(network, IPv4Network):
        raise ConfigError(f"invalid {what} {value!r}: only IPv4 is supported")
    if network.prefixlen > 30:
        raise ConfigError(f"invalid {what} {value!r}: a segment needs at least a /30")
    return network


def _parse_interface(value: str | IPv4Interface | IPv4Address, what: str) -> IPv4Interface:
    try:
        interface = ipaddress.ip_interface(value)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"invalid {what} {value!r}: {error}") from None
    if not isinstance(interface, IPv4Interface):
        raise ConfigError(f"invalid {what} {value!r}: only IPv4 is supported")
    return interface


class Topo:
    """A network of hosts, routers, switches and links; override ``build()``."""

    def __init__(self, *, address_pool: str | IPv4Network = DEFAULT_ADDRESS_POOL) -> None:
        pool = _parse_network(address_pool, "address pool")
        if pool.prefixlen > SEGMENT_PREFIXLEN - 1:
            raise ConfigError(f"invalid address pool {address_pool!r}: needs at least a /23")
        self._pool = pool
        self._nodes: dict[str, NodeSpec] = {}
        self._interfaces: dict[str, list[InterfaceSpec]] = {}
        self._links: list[LinkSpec] = []
        self._segments: list[Segment] = []
        self._segment_used: list[set[IPv4Address]] = []
        self._switch_segment: dict[str, int] = {}
        self._built = False

    # --- to override ---------------------------------------------------------------------

    def build(self) -> None:
        """Add nodes and links; called once, the first time the topology is used."""

    # --- building --------------------------------------------------------------------------

    def add_host(self, name: str, *, disable_offloads: bool = False) -> str:
        """Add a host (one network namespace); returns its name for ``add_link``."""
        return self._add_node(NodeSpec(check_node_name(name), NodeKind.HOST, disable_offloads))

    def add_router(self, name: str, *, disable_offloads: bool = False) -> str:
        """Add a router: a host with IPv4 forwarding on and static routes along shortest paths."""
        return self._add_node(NodeSpec(check_node_name(name), NodeKind.ROUTER, disable_offloads))

    def add_switch(self, name: str, *, subnet: str | IPv4Network | None = None) -> str:
        """Add a switch (a bridge in its own namespace); everything on it shares one subnet."""
        name = self._add_node(NodeSpec(check_node_name(name), NodeKind.SWITCH))
        network = _parse_network(subnet, "subnet") if subnet is not None else None
        self._switch_segment[name] = self._new_segment(network, switch=name)
        return name

    def add_link(
        self,
        node1: str,
        node2: str,
        params: LinkParams | None = None,
        *,
        reverse: LinkParams | None = None,
        address1: str | IPv4Interface | IPv4Address | None = None,
        address2: str | IPv4Interface | IPv4Address | None = None,
        subnet: str | IPv4Network | None = None,
    ) -> None:
        """Connect two nodes with a veth pair.

        ``params`` shapes traffic from ``node1`` to ``node2``; ``reverse`` the other direction
        (default: the same as ``params``). Addresses are allocated unless given (``"10.9.0.5"``
        or ``"10.9.0.5/24"``); ``subnet`` sets a point-to-point link's subnet.
        """
        spec1, spec2 = self._node(node1), self._node(node2)
        if node1 == node2:
            raise ConfigError(f"invalid link {node1}-{node2}: a node cannot link to itself")
        for value, what in ((params, "params"), (reverse, "reverse")):
            if value is not None and not isinstance(value, LinkParams):
                raise ConfigError(f"invalid link {node1}-{node2}: {what} must be LinkParams")
        forward = params if params is not None else UNSHAPED
        backward = reverse if reverse is not None else forward
        switches = [s for s in (spec1, spec2) if s.kind is NodeKind.SWITCH]
        if len(switches) == 2:
            raise ConfigError(
                f"invalid link {node1}-{node2}: links between switches are not supported "
                "(put a router between them)"
            )
        if switches:
            if subnet is not None:
                raise ConfigError(
                    f"invalid link {node1}-{node2}: a switch's subnet is set on add_switch"
                )
            segment = self._switch_segment[switches[0].name]
        else:
            network = _parse_network(subnet, "subnet") if subnet is not None else None
            if network is None:
                for given in (address1, address2):
                    if given is not None and "/" in str(given):
                        network = _parse_interface(given, "address").network
                        break
            segment = self._new_segment(network, switch=None)
        offloads_off = (
            forward.offloads_off
            or backward.offloads_off
            or spec1.disable_offloads
            or spec2.disable_offloads
        )
        ifname1 = interface_name(len(self._interfaces[node1]))
        ifname2 = interface_name(len(self._interfaces[node2]))
        end1 = InterfaceSpec(
            node=node1,
            ifname=ifname1,
            peer=node2,
            peer_ifname=ifname2,
            address=self._address_for(spec1, segment, address1),
            egress=forward,
            offloads_off=offloads_off,
            segment=segment,
        )
        end2 = InterfaceSpec(
            node=node2,
            ifname=ifname2,
            peer=node1,
            peer_ifname=ifname1,
            address=self._address_for(spec2, segment, address2),
            egress=backward,
            offloads_off=offloads_off,
            segment=segment,
        )
        self._interfaces[node1].append(end1)
        self._interfaces[node2].append(end2)
        self._links.append(LinkSpec(end1, end2))

    # --- queries (each builds the topology on first use) ----------------------------------

    def ensure_built(self) -> None:
        """Run ``build()`` once; later calls do nothing."""
        if self._built:
            return
        self._built = True
        self.build()
        if not self._nodes:
            raise ConfigError(f"topology {type(self).__name__} has no nodes")

    def nodes(self) -> list[NodeSpec]:
        self.ensure_built()
        return list(self._nodes.values())

    def node(self, name: str) -> NodeSpec:
        self.ensure_built()
        return self._node(name)

    def links(self) -> list[LinkSpec]:
        self.ensure_built()
        return list(self._links)

    def interfaces(self, node: str) -> list[InterfaceSpec]:
        self.ensure_built()
        self._node(node)
        return list(self._interfaces[node])

    def segments(self) -> list[Segment]:
        self.ensure_built()
        return list(self._segments)

    def subnet_of(self, switch: str) -> IPv4Network:
        """The subnet shared by everything attached to ``switch``."""
        self.ensure_built()
        if switch not in self._switch_segment:
            raise ConfigError(f"{switch!r} is not a switch of {type(self).__name__}")
        return self._segments[self._switch_segment[switch]].subnet

    def addresses_of(self, node: str) -> list[IPv4Interface]:
        """A node's addresses, in the order of its interfaces."""
        return [i.address for i in self.interfaces(node) if i.address is not None]

    # --- internals -------------------------------------------------------------------------

    def _node(self, name: str) -> NodeSpec:
        try:
            return self._nodes[name]
        except KeyError:
            raise ConfigError(f"unknown node {name!r} in {type(self).__name__}") from None

    def _add_node(self, spec: NodeSpec) -> str:
        if spec.name in self._nodes:
            raise ConfigError(f"duplicate node name {spec.name!r}")
        if not isinstance(spec.disable_offloads, bool):
            raise ConfigError(f"disable_offloads of {spec.name!r} must be a bool")
        self._nodes[spec.name] = spec
        self._interfaces[spec.name] = []
        return spec.name

    def _new_segment(self, network: IPv4Network | None, *, switch: str | None) -> int:
        taken = [segment.subnet for segment in self._segments]
        if network is None:
            network = self._next_free_subnet(taken)
        elif any(network.overlaps(other) for other in taken):
            raise ConfigError(f"subnet {network} overlaps another segment of the topology")
        self._segments.append(Segment(len(self._segments), network, switch))
        self._segment_used.append(set())
        return len(self._segments) - 1

    def _next_free_subnet(self, taken: list[IPv4Network]) -> IPv4Network:
        candidates = self._pool.subnets(new_prefix=SEGMENT_PREFIXLEN)
        next(candidates)  # skip x.x.0.0/24: addresses ending in .0.x read like mistakes
        for candidate in candidates:
            if not any(candidate.overlaps(other) for other in taken):
                return candidate
        raise ConfigError(f"address pool {self._pool} is exhausted")

    def _address_for(
        self,
        spec: NodeSpec,
        segment_index: int,
        given: str | IPv4Interface | IPv4Address | None,
    ) -> IPv4Interface | None:
        segment = self._segments[segment_index]
        used = self._segment_used[segment_index]
        if spec.kind is NodeKind.SWITCH:
            if given is not None:
                raise ConfigError(f"switch {spec.name!r} has no address on its links")
            return None
        subnet = segment.subnet
        if given is not None:
            interface = _parse_interface(given, f"address of {spec.name}")
            address = interface.ip
            if "/" in str(given) and interface.network != subnet:
                raise ConfigError(f"address {given} of {spec.name} is not in subnet {subnet}")
            if address not in subnet or address in (
                subnet.network_address,
                subnet.broadcast_address,
            ):
                raise ConfigError(f"address {given} of {spec.name} is not a host of {subnet}")
            if address in used:
                raise ConfigError(f"address {address} is used twice in {subnet}")
        else:
            free = (host for host in subnet.hosts() if host not in used)
            found = next(free, None)
            if found is None:
                raise ConfigError(f"subnet {subnet} has no free address for {spec.name}")
            address = found
        used.add(address)
        return IPv4Interface(f"{address}/{subnet.prefixlen}")
