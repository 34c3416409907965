"""A network-namespace lab kit: topologies, shaped links, real services, guaranteed cleanup.

::

    from labs import Lab, LinkParams, Topo

    class Two(Topo):
        def build(self) -> None:
            a, b = self.add_host("a"), self.add_host("b")
            self.add_link(a, b, LinkParams(rate_mbit=20))

    with Lab(Two()) as lab:
        lab["a"].run(["ping", "-c", "1", str(lab["b"].address)], check=True, timeout=10)

See docs/labs.md.
"""

from labs.capture import Capture, count_tcp_packets, tcp_flag_counts
from labs.cleanup import CleanupSummary, TeardownReport, cleanup_dead_labs
from labs.errors import (
    CommandFailedError,
    CommandTimeoutError,
    ConfigError,
    LabError,
    ServiceStartError,
)
from labs.lab import Lab
from labs.naming import LabId
from labs.node import Host, Interface, Node, Router, Switch
from labs.params import LinkParams
from labs.routing import Route
from labs.shaping import netem_available
from labs.topo import NodeKind, Topo
from labs.topologies import PaperTopo, PoolTopo

__all__ = [
    "Capture",
    "CleanupSummary",
    "CommandFailedError",
    "CommandTimeoutError",
    "ConfigError",
    "Host",
    "Interface",
    "Lab",
    "LabError",
    "LabId",
    "LinkParams",
    "Node",
    "NodeKind",
    "PaperTopo",
    "PoolTopo",
    "Route",
    "Router",
    "ServiceStartError",
    "Switch",
    "TeardownReport",
    "Topo",
    "cleanup_dead_labs",
    "count_tcp_packets",
    "netem_available",
    "tcp_flag_counts",
]
