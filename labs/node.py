"""The running nodes of a lab: hosts, routers and switches, each a network namespace.

``lab["c"].run([...])`` runs a program to completion inside the node, ``popen`` starts one in
the background; the lab stops every program it started (SIGTERM, then SIGKILL) when it closes.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from labs.capture import Capture, start_capture
from labs.errors import LabError
from labs.nsexec import DEFAULT_TIMEOUT_S, netns_argv, run_in_netns
from labs.params import LinkParams
from labs.shaping import set_offloads
from labs.topo import NodeKind
from migrate.errors import ConfigError

if TYPE_CHECKING:
    from labs.lab import Lab

_SYSCTL_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
_FORBIDDEN_POPEN_ARGS = {"shell", "preexec_fn", "args", "executable"}


@dataclass(frozen=True)
class Interface:
    """One interface of a node, as seen inside its namespace."""

    name: str
    address: IPv4Interface | None
    peer: str  # the node at the other end of the veth pair
    peer_ifname: str
    egress: LinkParams


class Node:
    """A network namespace of the lab."""

    kind = NodeKind.HOST

    def __init__(self, lab: Lab, name: str, netns: str, interfaces: list[Interface]) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns
        self._interfaces = list(interfaces)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} netns={self.netns}>"

    # --- addresses -------------------------------------------------------------------------

    @property
    def interfaces(self) -> list[Interface]:
        return list(self._interfaces)

    @property
    def addresses(self) -> list[IPv4Address]:
        """Every IPv4 address of the node, in interface order."""
        return [i.address.ip for i in self._interfaces if i.address is not None]

    @property
    def address(self) -> IPv4Address:
        """The primary address: the one on the first addressed interface."""
        addresses = self.addresses
        if not addresses:
            raise LabError(f"{self.name} has no address")
        return addresses[0]

    def interface(self, ifname: str) -> Interface:
        for interface in self._interfaces:
            if interface.name == ifname:
                return interface
        raise LabError(f"{self.name} has no interface {ifname}")

    def interface_to(self, peer: str) -> Interface:
        """The first interface whose veth peer is node ``peer``."""
        for interface in self._interfaces:
            if interface.peer == peer:
                return interface
        raise LabError(f"{self.name} has no link to {peer}")

    # --- programs --------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = DEFAULT_TIMEOUT_S,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this node and wait for it (at most ``timeout`` seconds, then it is
        killed and ``CommandTimeoutError`` raised). Output is captured as text. With ``check``,
        a non-zero exit raises ``CommandFailedError`` (a ``CalledProcessError``)."""
        self.lab.require_running()
        return run_in_netns(
            self.netns,
            argv,
            where=self.name,
            check=check,
            timeout_s=timeout,
            input_text=input,
            env=env,
            cwd=str(cwd) if cwd is not None else None,
        )

    def popen(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this node in the background (``subprocess.Popen`` arguments apply,
        except ``shell``). The lab terminates it, by pid, when it closes. The program gets its
        own session, so a Ctrl-C in the terminal reaches the lab's handler, which stops
        programs in order, rather than every program at once."""
        self.lab.require_running()
        forbidden = _FORBIDDEN_POPEN_ARGS & popen_kwargs.keys()
        if forbidden:
            raise ConfigError(f"popen does not take {', '.join(sorted(forbidden))}")
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        process: subprocess.Popen[Any] = subprocess.Popen(
            netns_argv(self.netns, argv), **popen_kwargs
        )
        self.lab.track(process)
        return process

    # --- kernel settings -------------------------------------------------------------------

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl in this node's namespace, e.g. ``net.ipv4.conf.all.route_localnet``."""
        if not _SYSCTL_KEY.match(key):
            raise ConfigError(f"invalid sysctl key {key!r}")
        self.run(["sysctl", "-q", "-w", f"{key}={value}"], check=True, timeout=10)

    def read_sysctl(self, key: str) -> str:
        if not _SYSCTL_KEY.match(key):
            raise ConfigError(f"invalid sysctl key {key!r}")
        return self.run(["sysctl", "-n", key], check=True, timeout=10).stdout.strip()

    def set_offloads(self, ifname: str, *, enabled: bool) -> None:
        """Turn TSO/GSO/GRO on or off (off is what packet rewriting and shaping want)."""
        self.interface(ifname)
        set_offloads(self.netns, self.name, ifname, enabled=enabled)

    def add_route(
        self,
        destination: str | IPv4Network,
        *,
        gateway: str | IPv4Address | None = None,
        ifname: str | None = None,
    ) -> None:
        """Add a static route (e.g. to a service VIP); give a gateway, an interface or both."""
        self.lab.require_running()
        try:
            network = ip_network(destination)
        except ValueError as error:
            raise ConfigError(f"invalid route destination {destination!r}: {error}") from None
        if gateway is None and ifname is None:
            raise ConfigError("a route needs a gateway or an interface")
        spec: dict[str, object] = {"dst": str(network)}
        if gateway is not None:
            spec["gateway"] = str(gateway)
        try:
            with IPRoute(netns=self.netns) as ipr:
                if ifname is not None:
                    found = ipr.link_lookup(ifname=ifname)
                    if not found:
                        raise LabError(f"{self.name} has no interface {ifname}")
                    spec["oif"] = found[0]
                ipr.route("add", **spec)
        except NetlinkError as error:
            raise LabError(f"route to {network} in {self.name} failed: {error}") from None

    # --- capture ---------------------------------------------------------------------------

    @contextmanager
    def capture(
        self,
        ifname: str,
        path: str | Path,
        *,
        bpf_filter: Sequence[str] = (),
        snaplen_bytes: int | None = None,
    ) -> Iterator[Capture]:
        """Capture ``ifname`` into the pcap ``path`` for the duration of the ``with`` block."""
        if ifname not in {"any", "lo"}:
            self.interface(ifname)
        capture = start_capture(self, ifname, Path(path), bpf_filter, snaplen_bytes)
        try:
            yield capture
        finally:
            capture.stop()


class Host(Node):
    """An end host."""


class Router(Host):
    """A host with forwarding on and routes computed by the kit."""

    kind = NodeKind.ROUTER


class Switch(Node):
    """A bridge (``br0``) alone in its namespace; its ports are ``eth0``, ``eth1``, ..."""

    kind = NodeKind.SWITCH
