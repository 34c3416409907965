"""Policy-routing recipes of the shims, recorded in their ``Instance`` so a crash leaves nothing.

``TransparentReturnPath`` (server side). The shim connects to the unmodified service with
IP_TRANSPARENT, bound to the client's own address (HAProxy's ``usesrc clientip``), so the service
sees who its client is. The service's replies are addressed to that non-local client address and
would leave through the default route; they must come back into the local stack instead::

    ip rule add pref P from <service_ip> ipproto tcp sport <service_port> lookup T
    ip route add local 0.0.0.0/0 dev lo table T

and, for a service on loopback, ``net.ipv4.conf.{all,lo}.route_localnet=1`` (a packet from
127.0.0.0/8 to a non-loopback address is otherwise a martian). The selector is the service's
own address and port, so only the service's replies are caught; production deployments that
prefer marks (the usual TPROXY recipe) can add a fwmark ``RuleSpec`` instead. IPv4 only.

``HostRoute`` (client side): a /32 route for the VIP copied from the route the kernel uses
toward a real server (device, gateway, source), so connections to the VIP leave through the
right interface before the nft rewrite sends them to the active server.

Table ids and rule priorities are chosen free: neither used by any rule or route in the
namespace nor claimed by another live instance record, under the run-directory lock.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from migrate.errors import ConfigError
from migrate.kernel.instances import (
    Created,
    Instance,
    InstanceError,
    IpRoute,
    IpRule,
    RouteSpec,
    RuleSpec,
    SysctlRestore,
    call_in_netns,
    live_records,
    locked,
)

# Ranges that stay clear of the kernel's (local 255, main 254, default 253), of common VPN and
# container tools (which use small ids and priorities near 32765) and of each other.
TABLE_RANGE: Final = range(4700, 5700)
PRIORITY_RANGE: Final = range(4700, 5700)
IPPROTO_TCP: Final = 6
ROUTE_LOCALNET_KEYS: Final = (
    "net.ipv4.conf.all.route_localnet",
    "net.ipv4.conf.lo.route_localnet",
)
T = TypeVar("T")
_ROUTE_TYPES: Final = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable"}


def _dump_ids(ipr: IPRoute) -> tuple[set[int], set[int]]:
    """(tables, priorities) used by any rule or route of either family in this namespace."""
    tables: set[int] = set()
    priorities: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for rule in ipr.rule("dump", family=family):
            tables.add(int(rule.get("table")))
            priorities.add(int(rule.get("priority") or 0))
        for route in ipr.route("dump", family=family):
            tables.add(int(route.get("table")))
    return tables, priorities


def _claimed_ids(instance: Instance) -> tuple[set[int], set[int]]:
    """Tables and priorities other live instances of the same namespace have recorded."""
    tables: set[int] = set()
    priorities: set[int] = set()
    for _, record in live_records(instance.directory):
        if record.netns_inode != instance.record.netns_inode:
            continue
        for rule in record.rules:
            tables.add(rule.table)
            priorities.add(rule.priority)
        for route in record.routes:
            tables.add(route.table)
    return tables, priorities


def free_table_and_priority(instance: Instance) -> tuple[int, int]:
    """A routing table id and a rule priority nobody uses in the instance's namespace.

    Call with the instance's run-directory lock held, and record the objects before releasing it.
    """
    kernel_tables, kernel_priorities = call_in_netns(instance.netns, _with_iproute(_dump_ids))
    claimed_tables, claimed_priorities = _claimed_ids(instance)
    used_tables = kernel_tables | claimed_tables
    used_priorities = kernel_priorities | claimed_priorities
    table = next((t for t in TABLE_RANGE if t not in used_tables), None)
    priority = next((p for p in PRIORITY_RANGE if p not in used_priorities), None)
    if table is None or priority is None:
        raise InstanceError(
            f"no free routing table id or rule priority in {TABLE_RANGE.start}.."
            f"{TABLE_RANGE.stop - 1}; remove stale rules (roam cleanup)"
        )
    return table, priority


def _with_iproute(action: Callable[[IPRoute], T]) -> Callable[[], T]:
    def run() -> T:
        with IPRoute() as ipr:
            return action(ipr)

    return run


def _interface_index(instance: Instance, ifname: str) -> int:
    def lookup(ipr: IPRoute) -> list[int]:
        return list(ipr.link_lookup(ifname=ifname))

    found: list[int] = call_in_netns(instance.netns, _with_iproute(lookup))
    if not found:
        raise InstanceError(f"no interface {ifname} in the instance's namespace")
    return found[0]


def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected an IPv4 address") from None
    if not isinstance(address, ipaddress.IPv4Address):
        raise ConfigError(f"{what} {text} is IPv6; only IPv4 is supported")
    return address


@dataclass
class TransparentReturnPath:
    """Route a local service's replies to non-local (client) addresses back into this host."""

    service_ip: str
    service_port: int
    table: int | None = None  # None: choose a free one at setup
    priority: int | None = None  # None: choose a free one at setup
    _instance: Instance | None = field(default=None, init=False, repr=False)
    _created: list[Created] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        _ipv4(self.service_ip, "service address")
        if isinstance(self.service_port, bool) or not 1 <= self.service_port <= 65535:
            raise ConfigError(f"invalid service port {self.service_port!r}: expected 1..65535")

    @property
    def loopback(self) -> bool:
        return _ipv4(self.service_ip, "service address").is_loopback

    def setup(self, instance: Instance) -> None:
        """Install the rule, the local route and (for loopback) route_localnet, recorded."""
        if self._instance is not None:
            raise InstanceError("this transparent return path is already set up")
        self._instance = instance
        try:
            with locked(instance.directory):
                if self.table is None or self.priority is None:
                    table, priority = free_table_and_priority(instance)
                    self.table = self.table if self.table is not None else table
                    self.priority = self.priority if self.priority is not None else priority
                if self.loopback:
                    for key in ROUTE_LOCALNET_KEYS:
                        self._created.append(instance.set_sysctl(key, "1"))
                route = RouteSpec(
                    dst="0.0.0.0/0",
                    table=self.table,
                    type="local",
                    oif=_interface_index(instance, "lo"),
                    dev="lo",
                    scope=254,  # host: the kernel rejects a local route of another scope
                )
                self._created.append(instance.add_route(route))
                rule = RuleSpec(
                    priority=self.priority,
                    table=self.table,
                    src=f"{self.service_ip}/32",
                    ip_proto=IPPROTO_TCP,
                    sport=self.service_port,
                )
                self._created.append(instance.add_rule(rule))
        except BaseException:
            self.teardown()
            raise

    @property
    def rule(self) -> RuleSpec | None:
        return next((o.spec for o in self._created if isinstance(o, IpRule)), None)

    @property
    def route(self) -> RouteSpec | None:
        return next((o.spec for o in self._created if isinstance(o, IpRoute)), None)

    @property
    def sysctls(self) -> list[str]:
        return [o.key for o in self._created if isinstance(o, SysctlRestore)]

    def teardown(self) -> list[str]:
        """Remove what ``setup`` created, newest first; idempotent. Lines saying what went."""
        lines = []
        instance = self._instance
        if instance is not None and not instance.closed:
            while self._created:
                obj = self._created.pop()
                if obj in instance.record.created:
                    lines.append(instance.undo(obj))
        self._created.clear()
        self._instance = None
        return lines


class HostRoute:
    """VIP host routes of a client shim, each a copy of the route toward a real server."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.routes: dict[str, RouteSpec] = {}

    def route_toward(self, address: str) -> RouteSpec:
        """The route the kernel uses toward ``address`` (``ip route get``), as a spec."""
        destination = _ipv4(address, "server address")

        def get(ipr: IPRoute) -> dict[str, Any]:
            answer = ipr.route("get", dst=str(destination))[0]
            oif = answer.get("oif")
            return {
                "type": int(answer["type"]),
                "table": int(answer.get("table")),
                "oif": int(oif) if oif is not None else None,
                "gateway": answer.get("gateway"),
                "prefsrc": answer.get("prefsrc"),
                "dev": ipr.get_links(oif)[0].get("ifname") if oif is not None else None,
            }

        try:
            found = call_in_netns(self.instance.netns, _with_iproute(get))
        except NetlinkError as error:
            raise InstanceError(f"no route toward {address}: {os.strerror(error.code)}") from None
        kind = _ROUTE_TYPES.get(found["type"], str(found["type"]))
        if kind != "unicast":
            raise InstanceError(f"the route toward {address} is {kind}, not a unicast route")
        return RouteSpec(
            dst=f"{destination}/32",
            table=found["table"],
            oif=found["oif"],
            dev=found["dev"],
            gateway=found["gateway"],
            prefsrc=found["prefsrc"],
        )

    def add_vip_route(self, vip: str, *, toward: str) -> RouteSpec:
        """Add ``vip/32`` through the same device, gateway and source as ``toward``."""
        address = _ipv4(vip, "VIP")
        if vip in self.routes:
            raise InstanceError(f"a route for VIP {vip} was already added")
        template = self.route_toward(toward)
        spec = RouteSpec(
            dst=f"{address}/32",
            table=template.table,
            oif=template.oif,
            dev=template.dev,
            gateway=template.gateway,
            prefsrc=template.prefsrc,
            # as `ip route add`: an on-link route (no gateway) has link scope
            scope=None if template.gateway is not None else 253,
        )
        self.instance.add_route(spec)
        self.routes[vip] = spec
        return spec

    def remove_vip_route(self, vip: str) -> str:
        spec = self.routes.pop(vip, None)
        if spec is None:
            raise InstanceError(f"no route for VIP {vip} was added")
        return self.instance.undo(IpRoute(spec))

    def remove_all(self) -> list[str]:
        return [self.remove_vip_route(vip) for vip in list(self.routes)]
