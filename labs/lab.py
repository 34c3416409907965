"""``Lab``: a running topology, created on ``__enter__`` and always removed.

Theory of operation: the constructor checks everything that can be checked without touching the
kernel (the topology, the link parameters against the kernel's features, the programs needed),
so a bad lab fails before any namespace exists. ``start()`` picks a lab id, writes the lab
record (an instance record of kind ``lab``, ``migrate.kernel.instances``) listing its work
directory and every namespace it will create, registers the lab for cleanup on signals and at
exit, then builds the network. ``close()`` (from ``__exit__``, a signal or ``atexit``) stops
the lab's programs, removes its namespaces, its work directory and its record; it is
idempotent. A crash that skips all of that (SIGKILL) leaves a record that ``roam lab cleanup``
acts on.
"""

from __future__ import annotations

import os
import tempfile
import threading
from ipaddress import IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

from labs import lifecycle
from labs.cleanup import LAB_KIND, TeardownReport, report_of
from labs.errors import LabError
from labs.naming import RECORD_DIR, LabId
from labs.node import Host, Interface, Node, Router, Switch
from labs.nsexec import require_tools
from labs.plumbing import build_network
from labs.routing import Route, static_routes
from labs.shaping import netem_available
from labs.topo import NodeKind, Topo
from migrate.errors import ConfigError, RoamError
from migrate.kernel.instances import Instance
from migrate.kernel.processes import DEFAULT_GRACE_S, stop_children

_NODE_CLASSES: dict[NodeKind, type[Node]] = {
    NodeKind.HOST: Host,
    NodeKind.ROUTER: Router,
    NodeKind.SWITCH: Switch,
}


def check_kernel_support(topo: Topo) -> None:
    """Refuse, with a ``ConfigError``, what this kernel or machine cannot do."""
    needed = ["ip", "sysctl"]
    for link in topo.links():
        for end in (link.end1, link.end2):
            where = f"link {link.end1.node}-{link.end2.node} ({end.node} -> {end.peer})"
            if end.egress.delay_ms > 0 and not netem_available():
                raise ConfigError(
                    f"{where} asks for delay_ms={end.egress.delay_ms:g}, but this kernel has no "
                    "netem qdisc; remove the delay (rate and loss work without netem)"
                )
            if end.egress.loss_pct > 0:
                needed.append("nft")
            if end.offloads_off:
                needed.append("ethtool")
    require_tools(*dict.fromkeys(needed))


class Lab:
    """A topology brought to life in network namespaces. Use as a context manager."""

    def __init__(
        self,
        topo: Topo,
        *,
        stop_grace_s: float = DEFAULT_GRACE_S,
        record_dir: Path = RECORD_DIR,
    ) -> None:
        if not isinstance(topo, Topo):
            raise ConfigError(f"Lab needs a Topo, got {type(topo).__name__}")
        topo.ensure_built()
        self.topo = topo
        self.routes: dict[str, list[Route]] = static_routes(topo)
        check_kernel_support(topo)
        self.stop_grace_s = stop_grace_s
        self._record_dir = record_dir
        self._id: LabId | None = None
        self._workdir: Path | None = None
        self._instance: Instance | None = None
        self._namespaces: list[str] = []
        self._nodes: dict[str, Node] = {}
        self._processes: list[Any] = []
        self._state = "new"
        self._lock = threading.RLock()

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    def start(self) -> Lab:
        """Create every namespace, link, address, route and shaping rule of the topology."""
        with self._lock:
            if self._state != "new":
                raise LabError(f"a lab can be started once (this one is {self._state})")
            if os.geteuid() != 0:
                raise LabError("labs need root (network namespaces, tc, nftables); run as root")
            lab_id = LabId.new()
            namespaces = {node.name: lab_id.namespace(node.name) for node in self.topo.nodes()}
            self._id = lab_id
            self._namespaces = list(namespaces.values())
            self._workdir = Path(tempfile.mkdtemp(prefix=f"roam-{lab_id}-"))
            try:
                self._instance = self._record_lab(lab_id, self._workdir, self._namespaces)
            except (OSError, RoamError) as error:
                os.rmdir(self._workdir)
                reason = error.strerror if isinstance(error, OSError) else error
                raise LabError(
                    f"cannot write the lab record in {self._record_dir}: {reason}"
                ) from None
            self._state = "running"
            lifecycle.register(self)
        try:
            build_network(self.topo, self.routes, namespaces, lab_id.nft_table)
        except BaseException:
            self.close(raise_errors=False)
            raise
        for spec in self.topo.nodes():
            interfaces = [
                Interface(i.ifname, i.address, i.peer, i.peer_ifname, i.egress)
                for i in self.topo.interfaces(spec.name)
            ]
            node_class = _NODE_CLASSES[spec.kind]
            self._nodes[spec.name] = node_class(self, spec.name, namespaces[spec.name], interfaces)
        return self

    def _record_lab(self, lab_id: LabId, workdir: Path, namespaces: list[str]) -> Instance:
        """The lab's record, written before any namespace exists."""
        instance = Instance.start(LAB_KIND, directory=self._record_dir, token=lab_id.token)
        try:
            instance.add_workdir(workdir)
            for name in namespaces:
                instance.add_netns(name)
        except BaseException:
            instance.close()  # nothing of it exists yet: this only removes the record
            raise
        return instance

    def _teardown(self) -> TeardownReport:
        assert self._id is not None
        assert self._instance is not None
        undone, failures = self._instance.remove(grace_s=self.stop_grace_s)
        return report_of(self._id, undone, failures)

    def close(self, *, raise_errors: bool = True) -> None:
        """Stop the lab's programs and remove everything it created. Safe to call twice."""
        with self._lock:
            if self._state != "running":
                return
            self._state = "closing"
        try:
            stop_children(self._processes, grace_s=self.stop_grace_s)
            report = self._teardown()
        except BaseException:
            # interrupted (a second Ctrl-C): the next close, at the latest atexit's, finishes
            self._state = "running"
            raise
        self._state = "closed"
        lifecycle.unregister(self)
        if report.errors and raise_errors:
            raise LabError(f"lab {self._id} was not fully removed: {'; '.join(report.errors)}")

    # --- used by nodes ---------------------------------------------------------------------

    def require_running(self) -> None:
        if self._state != "running":
            raise LabError(f"lab {self._id or '(not started)'} is {self._state}, not running")

    def track(self, process: Any) -> None:
        """Remember a program started in the lab, to stop it at close."""
        with self._lock:
            # Not recorded: every program of the lab lives in one of its namespaces, where the
            # removal of each recorded namespace finds and stops it.
            self._processes.append(process)

    # --- queries ---------------------------------------------------------------------------

    @property
    def id(self) -> LabId:
        if self._id is None:
            raise LabError("the lab has not been started")
        return self._id

    @property
    def workdir(self) -> Path:
        """A private directory for the lab's files (configs, logs); removed at close."""
        if self._workdir is None:
            raise LabError("the lab has not been started")
        return self._workdir

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def state(self) -> str:
        """``new``, ``running``, ``closing`` or ``closed``."""
        return self._state

    @property
    def namespaces(self) -> list[str]:
        """Every namespace the lab creates (also those of a partly built lab)."""
        return list(self._namespaces)

    def subnet(self, switch: str) -> IPv4Network:
        """The subnet of everything attached to ``switch``."""
        return self.topo.subnet_of(switch)

    @property
    def processes(self) -> list[Any]:
        with self._lock:
            return list(self._processes)

    def __getitem__(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            if self._state != "running":
                raise LabError(f"lab is {self._state}: no node {name!r}") from None
            raise LabError(f"no node {name!r} in this lab") from None

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    @property
    def hosts(self) -> list[Node]:
        """Hosts and routers (every node that has addresses and runs programs)."""
        return [n for n in self._nodes.values() if n.kind is not NodeKind.SWITCH]

    @property
    def switches(self) -> list[Node]:
        return [n for n in self._nodes.values() if n.kind is NodeKind.SWITCH]
