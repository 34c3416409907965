"""Crash-safe records of what each shim instance and each lab created in the kernel, and the
sweep that removes what dead instances left behind: the one record system of the project.

Theory of operation. An ``Instance`` writes a small JSON record under
``/run/server-roaming/instances`` (``$SERVER_ROAMING_RUN_DIR/instances`` when that variable is
set) naming its owner (pid plus the process start time from ``/proc/<pid>/stat``, so a reused pid
is never mistaken for the owner) and its network namespace (name and inode). Every kernel object
it creates -- nftables tables, ``ip rule`` entries, routes, sysctl changes, child processes,
files -- is appended to the record and the record is written *before* the object is created.
A crash at any point therefore leaves a record that lists everything that may exist; undoing
an object that was never created is harmless (deleting an absent table or rule is tolerated).
A lab (``labs.lab``) is an instance of kind ``lab`` whose records live in their own directory
(``/run/server-roaming/labs``): it records its named network namespaces (removed with every
process inside) and its work directory.

``Instance.close()`` undoes everything in reverse order and deletes the record. ``sweep_dead()``
(``roam cleanup``, and a shim's start-up) does the same for every record whose owner is dead,
inside the record's network namespace when that still exists (if it does not, the kernel has
already destroyed everything in it and only the record is removed). It also deletes nftables
tables named ``roam_<role>_<pid>`` in the current namespace whose process is dead, even without
a record. It never touches a live instance or anything not recorded or named as ours.

Sysctls are shared by every instance of a namespace: an instance records the value it found,
or, when another live instance already changed the same key, that instance's original value;
the original is written back only by the last instance that needs the change.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from migrate.errors import ConfigError, LocalError, RemoteError
from migrate.kernel import nft, xtqueue
from migrate.kernel.files import write_private
from migrate.kernel.processes import (
    DEFAULT_GRACE_S,
    is_alive,
    kill_pids,
    pids_in_namespaces,
    process_start_time,
    stop_process,
)

RUN_DIR_ENV: Final = "SERVER_ROAMING_RUN_DIR"
DEFAULT_RUN_DIR: Final = Path("/run/server-roaming")
NETNS_DIR: Final = Path("/run/netns")
RECORD_VERSION: Final = 1
CLONE_NEWNET: Final = 0x40000000
_GONE_ERRNOS: Final = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})
_KIND: Final = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
_SYSCTL_KEY: Final = re.compile(r"^net\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")
_NETNS_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_PROTOCOLS: Final = {6: "tcp", 17: "udp", 132: "sctp"}
_TABLE_NAMES: Final = {253: "default", 254: "main", 255: "local"}

T = TypeVar("T")


class InstanceError(LocalError):
    """An instance could not create or remove one of its kernel objects."""


class InstanceRecordError(RemoteError):
    """An instance record on disk does not parse."""


# --- places -------------------------------------------------------------------------------


def run_dir() -> Path:
    """``$SERVER_ROAMING_RUN_DIR`` or ``/run/server-roaming``."""
    configured = os.environ.get(RUN_DIR_ENV)
    return Path(configured) if configured else DEFAULT_RUN_DIR


def instances_dir() -> Path:
    return run_dir() / "instances"


# --- network namespaces -------------------------------------------------------------------


def _inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def current_netns_inode() -> int:
    inode = _inode("/proc/thread-self/ns/net")
    if inode is None:
        raise InstanceError("cannot read /proc/thread-self/ns/net (is /proc mounted?)")
    return inode


def netns_path(netns: str) -> str:
    """A namespace reference as a path: a bare name lives in /run/netns."""
    return netns if "/" in netns else str(NETNS_DIR / netns)


def find_netns(inode: int, name: str | None = None) -> str | None:
    """A path to the network namespace with ``inode`` if it still exists, else ``None``.

    Tried in order: ``/run/netns/<name>``, any other name in /run/netns, any process in it.
    """
    if name is not None and _inode(NETNS_DIR / name) == inode:
        return str(NETNS_DIR / name)
    if NETNS_DIR.is_dir():
        for entry in sorted(NETNS_DIR.iterdir()):
            if _inode(entry) == inode:
                return str(entry)
    for process in os.scandir("/proc"):
        if process.name.isdigit():
            path = f"/proc/{process.name}/ns/net"
            if _inode(path) == inode:
                return path
    return None


def find_netns_name(inode: int) -> str | None:
    """The name in /run/netns of the namespace with ``inode``, if it has one."""
    if NETNS_DIR.is_dir():
        for entry in sorted(NETNS_DIR.iterdir()):
            if _inode(entry) == inode and _NETNS_NAME.match(entry.name):
                return entry.name
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def call_in_netns(netns: str | None, function: Callable[[], T]) -> T:
    """Run ``function`` in network namespace ``netns`` (name or path; ``None``: here).

    It runs in a short-lived thread that enters the namespace with setns(2); sockets it
    creates stay in that namespace. ``function`` must not take the run-directory lock.
    """
    if netns is None:
        return function()
    path = netns_path(netns)
    results: list[T] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            errors.append(InstanceError(f"cannot open network namespace {netns}: {error.strerror}"))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                errors.append(
                    InstanceError(f"cannot enter network namespace {netns}: {os.strerror(code)}")
                )
                return
        finally:
            os.close(fd)
        try:
            results.append(function())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=worker, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


# --- sysctls ------------------------------------------------------------------------------


def check_sysctl_key(key: str) -> str:
    if not isinstance(key, str) or not _SYSCTL_KEY.match(key):
        raise ConfigError(
            f"invalid sysctl key {key!r}: expected a per-namespace net.* key such as "
            "net.ipv4.conf.all.route_localnet"
        )
    return key


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / check_sysctl_key(key).replace(".", "/")


def read_sysctl(key: str, *, netns: str | None = None) -> str:
    path = _sysctl_path(key)
    try:
        return call_in_netns(netns, lambda: path.read_text().strip())
    except OSError as error:
        raise InstanceError(f"cannot read sysctl {key}: {error.strerror}") from None


def write_sysctl(key: str, value: str, *, netns: str | None = None) -> None:
    path = _sysctl_path(key)
    try:
        call_in_netns(netns, lambda: path.write_text(value + "\n"))
    except OSError as error:
        raise InstanceError(f"cannot set sysctl {key}={value}: {error.strerror}") from None


# --- routing objects ----------------------------------------------------------------------


def _network(text: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected an address or prefix") from None


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected an IP address") from None


def _table_text(table: int) -> str:
    return _TABLE_NAMES.get(table, str(table))


def _check_u32(value: int | None, what: str, low: int = 0, high: int = 2**32 - 1) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
    ):
        raise ConfigError(f"invalid {what} {value!r}: expected an integer in {low}..{high}")


@dataclass(frozen=True)
class RuleSpec:
    """One ``ip rule``: a selector and the table it looks up."""

    priority: int
    table: int
    family: int = 4
    src: str | None = None
    dst: str | None = None
    ip_proto: int | None = None
    sport: int | None = None
    dport: int | None = None
    fwmark: int | None = None
    fwmask: int | None = None

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise ConfigError(f"invalid rule family {self.family!r}: expected 4 or 6")
        _check_u32(self.priority, "rule priority", 1, 32765)
        _check_u32(self.table, "routing table", 1)
        _check_u32(self.ip_proto, "IP protocol", 0, 255)
        _check_u32(self.sport, "source port", 1, 65535)
        _check_u32(self.dport, "destination port", 1, 65535)
        _check_u32(self.fwmark, "fwmark")
        _check_u32(self.fwmask, "fwmask")
        for text, what in ((self.src, "rule source"), (self.dst, "rule destination")):
            if text is not None and _network(text, what).version != self.family:
                raise ConfigError(f"{what} {text} is not an IPv{self.family} prefix")

    def kwargs(self) -> dict[str, Any]:
        """Arguments of pyroute2's ``IPRoute.rule('add'|'del', ...)``."""
        args: dict[str, Any] = {
            "family": socket.AF_INET if self.family == 4 else socket.AF_INET6,
            "priority": self.priority,
            "table": self.table,
        }
        for prefix, key in ((self.src, "src"), (self.dst, "dst")):
            if prefix is not None:
                network = _network(prefix, key)
                args[key] = str(network.network_address)
                args[f"{key}_len"] = network.prefixlen
        if self.ip_proto is not None:
            args["ip_proto"] = self.ip_proto
        if self.sport is not None:
            args["sport_range"] = f"{self.sport}:{self.sport}"
        if self.dport is not None:
            args["dport_range"] = f"{self.dport}:{self.dport}"
        if self.fwmark is not None:
            args["fwmark"] = self.fwmark
        if self.fwmask is not None:
            args["fwmask"] = self.fwmask
        return args

    def describe(self) -> str:
        parts = [f"ip{'' if self.family == 4 else ' -6'} rule pref {self.priority}"]
        parts.append(f"from {self.src or 'all'}")
        if self.dst is not None:
            parts.append(f"to {self.dst}")
        if self.ip_proto is not None:
            parts.append(f"ipproto {_PROTOCOLS.get(self.ip_proto, str(self.ip_proto))}")
        if self.sport is not None:
            parts.append(f"sport {self.sport}")
        if self.dport is not None:
            parts.append(f"dport {self.dport}")
        if self.fwmark is not None:
            mask = f"/{self.fwmask:#x}" if self.fwmask is not None else ""
            parts.append(f"fwmark {self.fwmark:#x}{mask}")
        parts.append(f"lookup {_table_text(self.table)}")
        return " ".join(parts)


@dataclass(frozen=True)
class RouteSpec:
    """One route: ``type dst [via gateway] dev oif [src prefsrc] table table``."""

    dst: str
    table: int = 254
    type: str = "unicast"
    oif: int | None = None
    dev: str | None = None  # the interface name at creation time, for messages only
    gateway: str | None = None
    prefsrc: str | None = None
    scope: int | None = None

    def __post_init__(self) -> None:
        _network(self.dst, "route destination")
        _check_u32(self.table, "routing table", 1)
        _check_u32(self.oif, "interface index", 1)
        _check_u32(self.scope, "route scope", 0, 255)
        if self.type not in ("unicast", "local", "blackhole", "unreachable", "prohibit"):
            raise ConfigError(f"invalid route type {self.type!r}")
        if self.gateway is not None:
            _address(self.gateway, "gateway")
        if self.prefsrc is not None:
            _address(self.prefsrc, "preferred source")

    @property
    def family(self) -> int:
        return _network(self.dst, "route destination").version

    def kwargs(self) -> dict[str, Any]:
        """Arguments of pyroute2's ``IPRoute.route('add'|'del', ...)``."""
        args: dict[str, Any] = {
            "family": socket.AF_INET if self.family == 4 else socket.AF_INET6,
            "dst": self.dst,
            "table": self.table,
            "type": self.type,
        }
        for key in ("oif", "gateway", "prefsrc", "scope"):
            value = getattr(self, key)
            if value is not None:
                args[key] = value
        return args

    def describe(self) -> str:
        parts = ["ip route"]
        if self.type != "unicast":
            parts.append(self.type)
        parts.append(self.dst)
        if self.gateway is not None:
            parts.append(f"via {self.gateway}")
        if self.dev is not None or self.oif is not None:
            parts.append(f"dev {self.dev or f'#{self.oif}'}")
        if self.prefsrc is not None:
            parts.append(f"src {self.prefsrc}")
        parts.append(f"table {_table_text(self.table)}")
        return " ".join(parts)


def _netlink(netns: str | None, action: Callable[[IPRoute], T]) -> T:
    def run() -> T:
        with IPRoute() as ipr:
            return action(ipr)

    return call_in_netns(netns, run)


def _netlink_error(error: NetlinkError) -> str:
    return os.strerror(error.code) if error.code else str(error)


def add_rule(spec: RuleSpec, *, netns: str | None = None) -> None:
    try:
        _netlink(netns, lambda ipr: ipr.rule("add", **spec.kwargs()))
    except NetlinkError as error:
        raise InstanceError(f"cannot add {spec.describe()}: {_netlink_error(error)}") from None


def delete_rule(spec: RuleSpec, *, netns: str | None = None) -> bool:
    """Delete the rule; ``False`` if it was already gone."""
    try:
        _netlink(netns, lambda ipr: ipr.rule("del", **spec.kwargs()))
    except NetlinkError as error:
        if error.code in _GONE_ERRNOS:
            return False
        raise InstanceError(f"cannot delete {spec.describe()}: {_netlink_error(error)}") from None
    return True


def add_route(spec: RouteSpec, *, netns: str | None = None) -> None:
    try:
        _netlink(netns, lambda ipr: ipr.route("add", **spec.kwargs()))
    except NetlinkError as error:
        raise InstanceError(f"cannot add {spec.describe()}: {_netlink_error(error)}") from None


def delete_route(spec: RouteSpec, *, netns: str | None = None) -> bool:
    """Delete the route; ``False`` if it (or its interface) was already gone."""
    try:
        _netlink(netns, lambda ipr: ipr.route("del", **spec.kwargs()))
    except NetlinkError as error:
        if error.code in _GONE_ERRNOS:
            return False
        raise InstanceError(f"cannot delete {spec.describe()}: {_netlink_error(error)}") from None
    return True


# --- created objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class NftTable:
    family: str
    name: str

    def __post_init__(self) -> None:
        nft.check_family(self.family)
        nft.check_identifier(self.name)

    def describe(self) -> str:
        return f"nft table {self.family} {self.name}"


@dataclass(frozen=True)
class XtQueueRule:
    """The iptables ``raw`` rule queueing the client shim's frozen segments
    (``migrate.kernel.xtqueue``)."""

    family: str
    queue: int

    def __post_init__(self) -> None:
        if self.family not in ("ip", "ip6"):
            raise ConfigError(f"an NFQUEUE rule's family must be ip or ip6, not {self.family!r}")
        _check_u32(self.queue, "NFQUEUE number", 0, 0xFFFF)

    def describe(self) -> str:
        return f"{xtqueue._binary(self.family)} raw rule for NFQUEUE {self.queue}"


@dataclass(frozen=True)
class IpRule:
    spec: RuleSpec

    def describe(self) -> str:
        return self.spec.describe()


@dataclass(frozen=True)
class IpRoute:
    spec: RouteSpec

    def describe(self) -> str:
        return self.spec.describe()


@dataclass(frozen=True)
class ChildProcess:
    pid: int
    starttime: int

    def describe(self) -> str:
        return f"process {self.pid}"


@dataclass(frozen=True)
class OwnedFile:
    path: str

    def __post_init__(self) -> None:
        if not os.path.isabs(self.path):
            raise ConfigError(f"an instance file must be an absolute path, got {self.path!r}")

    def describe(self) -> str:
        return f"file {self.path}"


@dataclass(frozen=True)
class SysctlRestore:
    key: str
    old: str

    def __post_init__(self) -> None:
        check_sysctl_key(self.key)

    def describe(self) -> str:
        return f"sysctl {self.key} (restore {self.old})"


@dataclass(frozen=True)
class Netns:
    """A named network namespace (``/run/netns/<name>``) the instance made: removing it stops
    every process still inside, then unmounts it (the kernel destroys its interfaces, routes,
    qdiscs and nftables tables with it)."""

    name: str

    def __post_init__(self) -> None:
        if not _NETNS_NAME.match(self.name):
            raise ConfigError(f"invalid network namespace name {self.name!r}")

    def describe(self) -> str:
        return f"netns {self.name}"


@dataclass(frozen=True)
class WorkDir:
    """A directory tree the instance made (a lab's work directory): removed whole."""

    path: str

    def __post_init__(self) -> None:
        if not os.path.isabs(self.path):
            raise ConfigError(f"an instance directory must be an absolute path, got {self.path!r}")

    def describe(self) -> str:
        return f"directory {self.path}"


Created = (
    NftTable
    | XtQueueRule
    | IpRule
    | IpRoute
    | ChildProcess
    | OwnedFile
    | SysctlRestore
    | Netns
    | WorkDir
)
C = TypeVar(
    "C",
    NftTable,
    XtQueueRule,
    IpRule,
    IpRoute,
    ChildProcess,
    OwnedFile,
    SysctlRestore,
    Netns,
    WorkDir,
)


def _req(data: dict[str, Any], key: str, kind: type[T]) -> T:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InstanceRecordError(f"field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _opt(data: dict[str, Any], key: str, kind: type[T]) -> T | None:
    return None if data.get(key) is None else _req(data, key, kind)


def created_to_json(obj: Created) -> dict[str, Any]:
    if isinstance(obj, NftTable):
        return {"object": "nft_table", "family": obj.family, "name": obj.name}
    if isinstance(obj, XtQueueRule):
        return {"object": "xt_queue", "family": obj.family, "queue": obj.queue}
    if isinstance(obj, IpRule):
        spec = obj.spec
        return {"object": "rule", **{k: v for k, v in vars(spec).items() if v is not None}}
    if isinstance(obj, IpRoute):
        return {"object": "route", **{k: v for k, v in vars(obj.spec).items() if v is not None}}
    if isinstance(obj, ChildProcess):
        return {"object": "child", "pid": obj.pid, "starttime": obj.starttime}
    if isinstance(obj, OwnedFile):
        return {"object": "file", "path": obj.path}
    if isinstance(obj, Netns):
        return {"object": "netns", "name": obj.name}
    if isinstance(obj, WorkDir):
        return {"object": "workdir", "path": obj.path}
    return {"object": "sysctl", "key": obj.key, "old": obj.old}


_RULE_INTS: Final = ("ip_proto", "sport", "dport", "fwmark", "fwmask")
_ROUTE_FIELDS: Final = ("oif", "scope", "dev", "gateway", "prefsrc")


def created_from_json(data: object) -> Created:
    if not isinstance(data, dict):
        raise InstanceRecordError(f"a created object must be an object, got {data!r}")
    kind = data.get("object")
    allowed: set[str]
    try:
        if kind == "nft_table":
            allowed = {"family", "name"}
            obj: Created = NftTable(_req(data, "family", str), _req(data, "name", str))
        elif kind == "xt_queue":
            allowed = {"family", "queue"}
            obj = XtQueueRule(_req(data, "family", str), _req(data, "queue", int))
        elif kind == "rule":
            allowed = {"priority", "table", "family", "src", "dst", *_RULE_INTS}
            obj = IpRule(
                RuleSpec(
                    priority=_req(data, "priority", int),
                    table=_req(data, "table", int),
                    family=_req(data, "family", int),
                    src=_opt(data, "src", str),
                    dst=_opt(data, "dst", str),
                    **{k: _opt(data, k, int) for k in _RULE_INTS},
                )
            )
        elif kind == "route":
            allowed = {"dst", "table", "type", *_ROUTE_FIELDS}
            obj = IpRoute(
                RouteSpec(
                    dst=_req(data, "dst", str),
                    table=_req(data, "table", int),
                    type=_req(data, "type", str),
                    oif=_opt(data, "oif", int),
                    dev=_opt(data, "dev", str),
                    gateway=_opt(data, "gateway", str),
                    prefsrc=_opt(data, "prefsrc", str),
                    scope=_opt(data, "scope", int),
                )
            )
        elif kind == "child":
            allowed = {"pid", "starttime"}
            obj = ChildProcess(_req(data, "pid", int), _req(data, "starttime", int))
        elif kind == "file":
            allowed = {"path"}
            obj = OwnedFile(_req(data, "path", str))
        elif kind == "netns":
            allowed = {"name"}
            obj = Netns(_req(data, "name", str))
        elif kind == "workdir":
            allowed = {"path"}
            obj = WorkDir(_req(data, "path", str))
        elif kind == "sysctl":
            allowed = {"key", "old"}
            obj = SysctlRestore(_req(data, "key", str), _req(data, "old", str))
        else:
            raise InstanceRecordError(f"unknown created object type {kind!r}")
    except ConfigError as error:
        raise InstanceRecordError(str(error)) from None
    unknown = set(data) - allowed - {"object"}
    if unknown:
        raise InstanceRecordError(f"unknown fields in {kind} entry: {', '.join(sorted(unknown))}")
    return obj


# --- records ------------------------------------------------------------------------------


@dataclass
class InstanceRecord:
    """Who owns an instance, where it runs, and what it created (in creation order)."""

    kind: str
    pid: int
    starttime: int
    token: str
    netns: str | None
    netns_inode: int
    created: list[Created] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"{self.kind}-{self.pid}-{self.token}.json"

    def describe(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        return f"{self.kind} instance of pid {self.pid}{where}"

    @property
    def tables(self) -> list[tuple[str, str]]:
        return [(o.family, o.name) for o in self.created if isinstance(o, NftTable)]

    @property
    def rules(self) -> list[RuleSpec]:
        return [o.spec for o in self.created if isinstance(o, IpRule)]

    @property
    def routes(self) -> list[RouteSpec]:
        return [o.spec for o in self.created if isinstance(o, IpRoute)]

    @property
    def children(self) -> list[tuple[int, int]]:
        return [(o.pid, o.starttime) for o in self.created if isinstance(o, ChildProcess)]

    @property
    def files(self) -> list[str]:
        return [o.path for o in self.created if isinstance(o, OwnedFile)]

    @property
    def sysctls(self) -> list[tuple[str, str]]:
        return [(o.key, o.old) for o in self.created if isinstance(o, SysctlRestore)]

    def owner_alive(self) -> bool:
        return is_alive(self.pid, self.starttime)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "kind": self.kind,
            "pid": self.pid,
            "starttime": self.starttime,
            "token": self.token,
            "netns": self.netns,
            "netns_inode": self.netns_inode,
            "created": [created_to_json(obj) for obj in self.created],
        }

    def encode(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: object) -> InstanceRecord:
        if not isinstance(data, dict):
            raise InstanceRecordError("an instance record must be a JSON object")
        version = data.get("version")
        if version != RECORD_VERSION:
            raise InstanceRecordError(f"unsupported instance record version {version!r}")
        known = {"version", "kind", "pid", "starttime", "token", "netns", "netns_inode", "created"}
        unknown = set(data) - known
        if unknown:
            raise InstanceRecordError(f"unknown fields: {', '.join(sorted(unknown))}")
        kind = _req(data, "kind", str)
        if not _KIND.match(kind):
            raise InstanceRecordError(f"invalid instance kind {kind!r}")
        token = _req(data, "token", str)
        if not re.fullmatch(r"[0-9a-f]{1,32}", token):
            raise InstanceRecordError(f"invalid token {token!r}")
        netns = _opt(data, "netns", str)
        if netns is not None and not _NETNS_NAME.match(netns):
            raise InstanceRecordError(f"invalid namespace name {netns!r}")
        created = data.get("created")
        if not isinstance(created, list):
            raise InstanceRecordError("field 'created' must be a list")
        return cls(
            kind=kind,
            pid=_req(data, "pid", int),
            starttime=_req(data, "starttime", int),
            token=token,
            netns=netns,
            netns_inode=_req(data, "netns_inode", int),
            created=[created_from_json(item) for item in created],
        )

    @classmethod
    def decode(cls, raw: bytes) -> InstanceRecord:
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise InstanceRecordError(f"not JSON: {error}") from None
        return cls.from_json(data)

    @classmethod
    def load(cls, path: Path) -> InstanceRecord:
        try:
            return cls.decode(path.read_bytes())
        except InstanceRecordError as error:
            raise InstanceRecordError(f"{path}: {error}") from None


def record_paths(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))


# One lock per run directory: flock(2) across processes, an RLock across this process's threads
# (re-entrant, so a routing recipe can hold it while its instance records objects).
_process_lock = threading.RLock()
_held: dict[Path, tuple[int, int]] = {}


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serialise record changes that depend on other records (sysctls, id choice, sweeps)."""
    with _process_lock:
        key = directory.absolute()
        entry = _held.get(key)
        if entry is None:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            entry = (fd, 0)
        _held[key] = (entry[0], entry[1] + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            if depth == 1:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            else:
                _held[key] = (fd, depth - 1)


def live_records(directory: Path) -> list[tuple[Path, InstanceRecord]]:
    """Readable records whose owner still runs."""
    found = []
    for path in record_paths(directory):
        try:
            record = InstanceRecord.load(path)
        except (InstanceRecordError, OSError):
            continue
        if record.owner_alive():
            found.append((path, record))
    return found


def _other_live_sysctl(directory: Path, key: str, inode: int, exclude: Path) -> str | None:
    """The original value another live instance of the namespace recorded for ``key``."""
    for path, record in live_records(directory):
        if path == exclude or record.netns_inode != inode:
            continue
        for obj in record.created:
            if isinstance(obj, SysctlRestore) and obj.key == key:
                return obj.old
    return None


@dataclass(frozen=True)
class _Place:
    """Where a record's objects are undone: the namespace to act in, or that it is gone."""

    netns: str | None
    gone: bool
    directory: Path
    inode: int
    record_path: Path
    grace_s: float = DEFAULT_GRACE_S  # for the processes left in a recorded namespace

    @classmethod
    def of(
        cls,
        record: InstanceRecord,
        directory: Path,
        record_path: Path,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> _Place:
        if record.netns_inode == current_netns_inode():
            return cls(None, False, directory, record.netns_inode, record_path, grace_s)
        found = find_netns(record.netns_inode, record.netns)
        return cls(found, found is None, directory, record.netns_inode, record_path, grace_s)


@dataclass(frozen=True)
class Undone:
    """What undoing one recorded object did: a line for people, whether the object was still
    there, and the processes stopped on the way (for the lab's cleanup report)."""

    obj: Created
    line: str
    removed: bool
    stopped: tuple[int, ...] = ()


def _lives_in_netns(obj: Created) -> bool:
    return isinstance(obj, NftTable | XtQueueRule | IpRule | IpRoute | SysctlRestore)


def remove_netns(name: str, *, grace_s: float = DEFAULT_GRACE_S) -> tuple[list[int], bool]:
    """Stop every process inside the named namespace (SIGTERM, SIGKILL after ``grace_s``), then
    unmount and unlink it: the pids signalled, and whether the namespace was there."""
    path = NETNS_DIR / name
    stopped = kill_pids(pids_in_namespaces([path]), grace_s=grace_s, still_ours=[path])
    if not path.exists():
        return stopped, False
    try:
        pyroute2_netns.remove(name)
    except FileNotFoundError:
        return stopped, False
    return stopped, True


def _remove_tree(path: str) -> bool:
    if os.path.islink(path):
        raise InstanceError(f"{path} is a symbolic link now, not the directory made; left alone")
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise InstanceError(f"cannot remove {path}: {error.strerror or error}") from None
    return True


def _done(obj: Created, removed: bool, verb: str = "deleted") -> Undone:
    line = f"{verb} {obj.describe()}" if removed else f"{obj.describe()} already gone"
    return Undone(obj, line, removed)


def _undo(obj: Created, place: _Place) -> Undone:
    """Remove one created object, saying what happened. Raises on real failures."""
    netns = place.netns
    if place.gone and _lives_in_netns(obj):
        return Undone(obj, f"{obj.describe()} gone with its network namespace", False)
    if isinstance(obj, NftTable):
        return _done(obj, nft.delete_table(obj.family, obj.name, missing_ok=True, netns=netns))
    if isinstance(obj, XtQueueRule):
        return _done(obj, xtqueue.delete(obj.family, obj.queue, netns=netns))
    if isinstance(obj, IpRule):
        return _done(obj, delete_rule(obj.spec, netns=netns))
    if isinstance(obj, IpRoute):
        return _done(obj, delete_route(obj.spec, netns=netns))
    if isinstance(obj, ChildProcess):
        stopped = stop_process(obj.pid, obj.starttime)
        return replace(_done(obj, stopped, "stopped"), stopped=(obj.pid,) if stopped else ())
    if isinstance(obj, OwnedFile):
        try:
            os.unlink(obj.path)
        except FileNotFoundError:
            return _done(obj, False)
        except OSError as error:
            raise InstanceError(f"cannot remove {obj.path}: {error.strerror}") from None
        return _done(obj, True, "removed")
    if isinstance(obj, Netns):
        pids, removed = remove_netns(obj.name, grace_s=place.grace_s)
        undone = _done(obj, removed, "removed")
        if pids:
            undone = replace(
                undone, line=f"{undone.line} (stopped pids {', '.join(map(str, pids))})"
            )
        return replace(undone, stopped=tuple(pids))
    if isinstance(obj, WorkDir):
        return _done(obj, _remove_tree(obj.path), "removed")
    if _other_live_sysctl(place.directory, obj.key, place.inode, place.record_path) is not None:
        return Undone(obj, f"left sysctl {obj.key} as it is: a live instance still needs it", False)
    write_sysctl(obj.key, obj.old, netns=netns)
    return Undone(obj, f"restored sysctl {obj.key}={obj.old}", True)


def _would_undo(obj: Created, place: _Place) -> str:
    if place.gone and _lives_in_netns(obj):
        return f"{obj.describe()} gone with its network namespace"
    if isinstance(obj, SysctlRestore):
        return f"would restore sysctl {obj.key}={obj.old}"
    if isinstance(obj, ChildProcess):
        return f"would stop {obj.describe()}"
    return f"would delete {obj.describe()}"


# --- instances ----------------------------------------------------------------------------


class Instance:
    """One shim instance's kernel objects, recorded before they are created.

    ::

        with Instance.start("server") as instance:
            instance.add_table("inet", instance.table_name("srv"), body)
            ...
        # everything removed, record deleted

    ``netns`` (a name in /run/netns) makes every object of the instance live in that
    namespace; by default they live in the caller's.
    """

    def __init__(self, record: InstanceRecord, directory: Path, *, act_in: str | None) -> None:
        self.record = record
        self.directory = directory
        self.path = directory / record.filename
        self._act_in = act_in
        self._closed = False

    @classmethod
    def start(
        cls,
        kind: str,
        *,
        netns: str | None = None,
        directory: Path | None = None,
        token: str | None = None,
    ) -> Instance:
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ConfigError(
                f"invalid instance kind {kind!r}: use a lowercase letter, then up to 15 "
                "lowercase letters, digits or -"
            )
        name = netns
        if netns is None:
            inode = current_netns_inode()
            # a daemon started under `ip netns exec NAME`: record NAME for people to read
            name = find_netns_name(inode)
        else:
            if not _NETNS_NAME.match(netns):
                raise ConfigError(f"invalid network namespace name {netns!r}")
            found = _inode(NETNS_DIR / netns)
            if found is None:
                raise ConfigError(f"network namespace {netns} does not exist")
            inode = found
        pid = os.getpid()
        starttime = process_start_time(pid)
        if starttime is None:
            raise InstanceError("cannot read this process's start time from /proc")
        if token is not None and not re.fullmatch(r"[0-9a-f]{1,32}", token):
            raise ConfigError(f"invalid instance token {token!r}: up to 32 lowercase hex digits")
        token = token if token is not None else secrets.token_hex(4)
        record = InstanceRecord(kind, pid, starttime, token, name, inode)
        directory = directory if directory is not None else instances_dir()
        instance = cls(record, directory, act_in=netns)
        instance._save()
        return instance

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def netns(self) -> str | None:
        """The namespace this instance acts in (``None``: the caller's own)."""
        return self._act_in

    @property
    def closed(self) -> bool:
        return self._closed

    def table_name(self, role: str) -> str:
        """This instance's table name for ``role``: ``roam_<role>_<pid>``."""
        return nft.instance_table_name(role, self.pid)

    def _save(self) -> None:
        write_private(self.path, self.record.encode())

    def _check_open(self) -> None:
        if self._closed:
            raise InstanceError(f"{self.record.describe()} is closed")

    def _record(self, obj: Created) -> None:
        self._check_open()
        self.record.created.append(obj)
        self._save()

    def _forget(self, obj: Created) -> None:
        # the last matching entry: the one just recorded when a creation failed
        for index in range(len(self.record.created) - 1, -1, -1):
            if self.record.created[index] == obj:
                del self.record.created[index]
                break
        self._save()

    def _create(self, obj: C, create: Callable[[], None]) -> C:
        self._record(obj)
        try:
            create()
        except BaseException:
            self._forget(obj)
            raise
        return obj

    # nftables

    def add_table(self, family: str, name: str, body: str = "") -> NftTable:
        """Record, then atomically create (or replace) table ``family name`` with ``body``."""
        table = NftTable(family, name)
        if table in self.record.created:
            self.replace_table(family, name, body)
            return table
        self._record(table)
        try:
            nft.replace_table(family, name, body, netns=self.netns)
        except BaseException:
            if not nft.table_exists(family, name, netns=self.netns):
                self._forget(table)
            raise
        return table

    def replace_table(self, family: str, name: str, body: str) -> None:
        """Atomically replace the contents of a table this instance created."""
        self._check_open()
        if NftTable(family, name) not in self.record.created:
            raise InstanceError(f"table {family} {name} is not one of this instance's tables")
        nft.replace_table(family, name, body, netns=self.netns)

    def apply(self, script: str) -> None:
        """Run an nft script (e.g. set element updates) in this instance's namespace."""
        self._check_open()
        nft.apply(script, netns=self.netns)

    def add_xt_queue(self, family: str, queue: int) -> XtQueueRule:
        """Record, then add the iptables rule queueing segments marked for ``queue``."""
        rule = XtQueueRule(family, queue)
        with locked(self.directory):  # its removal may delete the raw table: not meanwhile
            return self._create(rule, lambda: xtqueue.add(family, queue, netns=self.netns))

    # routing

    def add_rule(self, spec: RuleSpec) -> IpRule:
        """Record, then add an ``ip rule``."""
        return self._create(IpRule(spec), lambda: add_rule(spec, netns=self.netns))

    def add_route(self, spec: RouteSpec) -> IpRoute:
        """Record, then add a route (an existing identical route is an error)."""
        return self._create(IpRoute(spec), lambda: add_route(spec, netns=self.netns))

    # sysctls

    def add_sysctl_restore(self, key: str, old: str) -> None:
        """Record that ``key`` must be set back to ``old`` (call before changing it)."""
        self._record(SysctlRestore(key, old))

    def set_sysctl(self, key: str, value: str) -> SysctlRestore:
        """Record the value to restore, then set ``key`` to ``value`` in the namespace."""
        with locked(self.directory):
            old = _other_live_sysctl(self.directory, key, self.record.netns_inode, self.path)
            if old is None:
                old = read_sysctl(key, netns=self.netns)
            obj = SysctlRestore(key, old)
            return self._create(obj, lambda: write_sysctl(key, value, netns=self.netns))

    # processes and files

    def add_child(self, pid: int) -> None:
        """Record a process this instance started; it is stopped when the instance ends."""
        starttime = process_start_time(pid)
        if starttime is None:
            raise InstanceError(f"process {pid} does not run")
        self._record(ChildProcess(pid, starttime))

    def add_netns(self, name: str) -> Netns:
        """Record a named network namespace (call before creating it); it is removed, with the
        processes inside, when the instance ends."""
        obj = Netns(name)
        self._record(obj)
        return obj

    def add_workdir(self, path: str | os.PathLike[str]) -> WorkDir:
        """Record a directory tree to remove when the instance ends."""
        obj = WorkDir(os.path.abspath(path))
        self._record(obj)
        return obj

    def add_file(self, path: str | os.PathLike[str]) -> None:
        """Record a file to delete when the instance ends (call before creating it)."""
        self._record(OwnedFile(os.path.abspath(path)))

    # removal

    def undo(self, obj: Created) -> str:
        """Remove one recorded object now and forget it; a line saying what happened."""
        self._check_open()
        if obj not in self.record.created:
            raise InstanceError(f"{obj.describe()} is not recorded by this instance")
        with locked(self.directory):
            line = _undo(obj, _Place.of(self.record, self.directory, self.path)).line
            self._forget(obj)
        return line

    def close(self) -> list[str]:
        """Remove everything recorded, newest first, then the record; idempotent.

        Every object is tried; if some could not be removed, their entries stay in the record
        (for ``roam cleanup``) and an ``InstanceError`` lists them.
        """
        undone, failures = self.remove()
        if failures:
            raise InstanceError(
                f"{self.record.describe()}: could not remove everything "
                f"({'; '.join(failures)}); run 'roam cleanup' after this process exits"
            )
        return [u.line for u in undone]

    def remove(self, *, grace_s: float = DEFAULT_GRACE_S) -> tuple[list[Undone], list[str]]:
        """``close``, reporting instead of raising: what was undone, and one line per object
        that could not be (those stay recorded, the record stays for ``roam cleanup``).
        ``grace_s``: how long processes left in a recorded namespace get after SIGTERM."""
        if self._closed:
            return [], []
        undone: list[Undone] = []
        failures: list[str] = []
        with locked(self.directory):
            place = _Place.of(self.record, self.directory, self.path, grace_s)
            for obj in reversed(list(self.record.created)):
                try:
                    undone.append(_undo(obj, place))
                except (nft.NftError, InstanceError, OSError) as error:
                    failures.append(str(error))
                    continue
                self.record.created.remove(obj)
            if failures:
                self._save()
                return undone, failures
            self._closed = True
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        return undone, failures


# --- sweeping -----------------------------------------------------------------------------


@dataclass
class Swept:
    """What sweeping one dead instance's record did."""

    lines: list[str] = field(default_factory=list)
    undone: list[Undone] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def sweep_record(
    path: Path,
    record: InstanceRecord,
    directory: Path,
    *,
    dry_run: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
) -> Swept:
    """Undo everything of one dead instance's record, newest first, then delete the record
    (kept with what could not be removed). Call with ``locked(directory)`` held."""
    head = f"{record.describe()} (dead)"
    place = _Place.of(record, directory, path, grace_s)
    swept = Swept()
    failed: list[Created] = []
    for obj in reversed(list(record.created)):
        if dry_run:
            swept.lines.append(f"{head}: {_would_undo(obj, place)}")
            continue
        try:
            undone = _undo(obj, place)
        except (nft.NftError, InstanceError, OSError) as error:
            failed.append(obj)
            swept.failures.append(str(error))
            swept.lines.append(f"{head}: FAILED: {error}")
            continue
        swept.undone.append(undone)
        swept.lines.append(f"{head}: {undone.line}")
    if dry_run:
        swept.lines.append(f"{head}: would remove record {path.name}")
    elif failed:
        record.created = [obj for obj in record.created if obj in failed]
        write_private(path, record.encode())
        swept.lines.append(f"{head}: kept record {path.name} for what could not be removed")
    else:
        path.unlink(missing_ok=True)
        swept.lines.append(f"{head}: removed record {path.name}")
    return swept


def sweep_dead(*, dry_run: bool = False, directory: Path | None = None) -> list[str]:
    """Remove the leftovers of every instance whose owner is dead; lines saying what went.

    Also deletes tables named ``roam_<role>_<pid>`` in the current namespace whose pid is not
    running and that no live record claims. Unreadable records are reported and left alone.
    """
    directory = directory if directory is not None else instances_dir()
    lines: list[str] = []
    with locked(directory):
        live_tables: set[tuple[str, str]] = set()
        here = current_netns_inode()
        for path in record_paths(directory):
            try:
                record = InstanceRecord.load(path)
            except InstanceRecordError as error:
                lines.append(f"unreadable instance record left in place: {error}")
                continue
            except OSError:
                continue  # removed meanwhile
            if record.owner_alive():
                if record.netns_inode == here:
                    live_tables.update(record.tables)
                continue
            lines += sweep_record(path, record, directory, dry_run=dry_run).lines
        if nft.nft_available() is None:
            for family, name in nft.list_tables():
                parsed = nft.parse_instance_table_name(name)
                if parsed is None or (family, name) in live_tables:
                    continue
                if process_start_time(parsed[1]) is not None:
                    continue
                if dry_run:
                    lines.append(f"unrecorded nft table {family} {name}: would delete (pid dead)")
                    continue
                try:
                    nft.delete_table(family, name, missing_ok=True)
                except nft.NftError as error:
                    lines.append(f"unrecorded nft table {family} {name}: FAILED: {error}")
                    continue
                lines.append(f"unrecorded nft table {family} {name}: deleted (pid dead)")
    return lines
