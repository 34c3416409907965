"""Names of everything a lab creates, and where its record lives.

Every object carries the prefix ``roam``, the owner's pid and a random per-lab token, so two
labs never collide and ``roam lab cleanup`` can tell ours (and whose) from anything else:

* lab id: ``<pid>-<token>``, e.g. ``4711-3f9a``;
* namespace of node ``r1``: ``roam-4711-3f9a-r1`` (names of network namespaces are file names,
  so they may be long);
* nftables table inside a namespace: ``roam_4711_3f9a``;
* interfaces live only inside the lab's namespaces, where short local names are enough:
  ``eth0``, ``eth1``, ... and the bridge ``br0``. None is ever created in the root namespace.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from migrate.errors import ConfigError

PREFIX = "roam"
RECORD_DIR = Path("/run/server-roaming/labs")
NETNS_DIR = Path("/run/netns")
BRIDGE_IFNAME = "br0"
_NEW_ID_ATTEMPTS = 20

# A node name becomes the tail of a namespace name; keep it short, readable and shell-safe.
_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,23}$")
_LAB_ID = re.compile(r"^(?P<pid>[1-9][0-9]{0,9})-(?P<token>[0-9a-f]{4})$")
_NAMESPACE = re.compile(r"^roam-(?P<pid>[1-9][0-9]{0,9})-(?P<token>[0-9a-f]{4})-(?P<node>.+)$")


@dataclass(frozen=True)
class LabId:
    """The identity of one lab: its owner's pid and a random token."""

    owner_pid: int
    token: str

    @classmethod
    def new(cls, owner_pid: int | None = None) -> LabId:
        """A fresh id for a lab of ``owner_pid`` (default: this process), unused by any
        namespace or record on this machine."""
        pid = owner_pid if owner_pid is not None else os.getpid()
        for _ in range(_NEW_ID_ATTEMPTS):
            candidate = cls(pid, secrets.token_hex(2))
            taken = candidate.record_path.exists() or any(
                NETNS_DIR.glob(f"{candidate.namespace_prefix}*")
            )
            if not taken:
                return candidate
        raise ConfigError(f"no free lab id for pid {pid} after {_NEW_ID_ATTEMPTS} attempts")

    @classmethod
    def parse(cls, text: str) -> LabId:
        match = _LAB_ID.match(text)
        if match is None:
            raise ConfigError(f"not a lab id: {text!r} (expected <pid>-<4 hex digits>)")
        return cls(int(match["pid"]), match["token"])

    def __str__(self) -> str:
        return f"{self.owner_pid}-{self.token}"

    def namespace(self, node: str) -> str:
        return f"{PREFIX}-{self}-{node}"

    @property
    def namespace_prefix(self) -> str:
        return f"{PREFIX}-{self}-"

    @property
    def nft_table(self) -> str:
        return f"{PREFIX}_{self.owner_pid}_{self.token}"

    @property
    def record_path(self) -> Path:
        return RECORD_DIR / f"lab-{self}.json"  # an instance record of kind "lab"


def check_node_name(name: object) -> str:
    """Return ``name`` if it can name a node, else raise a ``ConfigError``."""
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise ConfigError(
            f"invalid node name {name!r}: use a letter, then up to 23 letters, digits, - or _"
        )
    return name


def parse_namespace(name: str) -> tuple[LabId, str] | None:
    """The lab id and node of a namespace the kit named, or ``None`` for any other name."""
    match = _NAMESPACE.match(name)
    if match is None:
        return None
    return LabId(int(match["pid"]), match["token"]), match["node"]


def interface_name(index: int) -> str:
    """The namespace-local name of a node's ``index``-th link interface."""
    return f"eth{index}"
