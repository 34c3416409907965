"""Turning ``LinkParams`` into kernel state: tc qdiscs, nftables loss, offloads, netem probe.

* Rate: an htb class on the interface's root qdisc (pyroute2 netlink), with a pfifo of
  ``queue_packets`` behind it when asked, or netem when a delay is asked and exists.
* Loss: one nftables table per namespace (family ``netdev``), one ``ingress`` chain per
  interface whose peer sends lossy traffic, with ``numgen random mod 10000 < N drop``. The
  drop happens where the packet arrives, as on a wire: the sender's stack never learns of it.
  (Dropping at the sender's egress hook would not do: the kernel reports such a drop to the
  sending socket as local congestion, so ping retries, TCP does not back off, and the loss
  stays invisible.) A capture on the receiving interface still shows the packets the rule
  then drops, since packet taps run before the ingress hook; capture on the sending side to
  see what was "on the wire". pyroute2's nftables support cannot express ``numgen``, so the
  ruleset goes to ``nft -f -``.
* Delay: this kernel has no netem. ``netem_available()`` asks the kernel once, inside a
  throw-away anonymous namespace, so the probe leaves nothing behind.
* Offloads: ``ethtool -K`` (the ethtool netlink API of pyroute2 does not set features).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Mapping

from pyroute2 import IPRoute

from labs.errors import LabError
from labs.nsexec import run_in_netns
from labs.params import LinkParams

HTB_ROOT = 0x10000  # handle 1:
HTB_CLASS = 0x10001  # class 1:1, the default class
LEAF = 0x100000  # handle 10:, below class 1:1
NETEM_PROBE_TIMEOUT_S = 5.0


@functools.cache
def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (probed once per process, in a scratch netns)."""
    if shutil.which("unshare") is None or shutil.which("tc") is None:
        return False
    try:
        probe = subprocess.run(
            [
                "unshare",
                "--net",
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "1ms",
            ],
            capture_output=True,
            timeout=NETEM_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _rate_bits(rate_mbit: float) -> str:
    # pyroute2 parses "<integer>bit"; 1 bit/s resolution is more than enough
    return f"{round(rate_mbit * 1_000_000)}bit"


def apply_qdiscs(ipr: IPRoute, index: int, params: LinkParams) -> None:
    """Install the rate limit and/or delay of ``params`` on interface ``index``."""
    if params.rate_mbit is not None:
        burst = params.burst_bytes
        ipr.tc("add", "htb", index=index, handle=HTB_ROOT, default=HTB_CLASS & 0xFFFF)
        ipr.tc(
            "add-class",
            "htb",
            index=index,
            handle=HTB_CLASS,
            parent=HTB_ROOT,
            rate=_rate_bits(params.rate_mbit),
            ceil=_rate_bits(params.rate_mbit),
            burst=burst,
            cburst=burst,
        )
        leaf_parent: int | None = HTB_CLASS
    else:
        leaf_parent = None
    if params.delay_ms > 0:
        netem: dict[str, object] = {"delay": round(params.delay_ms * 1000)}
        if params.queue_packets is not None:
            netem["limit"] = params.queue_packets
        if leaf_parent is None:
            ipr.tc("add", "netem", index=index, handle=LEAF, **netem)
        else:
            ipr.tc("add", "netem", index=index, handle=LEAF, parent=leaf_parent, **netem)
    elif params.queue_packets is not None and leaf_parent is not None:
        ipr.tc(
            "add", "pfifo", index=index, handle=LEAF, parent=leaf_parent, limit=params.queue_packets
        )


def loss_ruleset(table: str, loss_per_10000: Mapping[str, int]) -> str:
    """The nftables ruleset that drops the given share of the packets arriving on each
    interface (``{ifname: bound}``, the loss in units of 0.01 %)."""
    lines = [f"table netdev {table} {{"]
    for ifname, bound in sorted(loss_per_10000.items()):
        lines += [
            f"  chain loss_{ifname} {{",
            f'    type filter hook ingress device "{ifname}" priority 0; policy accept;',
            # IPv4 only: losing ARP too would add 1 s resolution stalls that no wire loss
            # of the modelled kind explains
            f"    meta protocol ip numgen random mod 10000 < {bound} counter drop",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply_loss(netns: str, where: str, table: str, loss_per_10000: Mapping[str, int]) -> None:
    """Install the loss rules of one namespace in one table (one ``delete table`` undoes it)."""
    if not loss_per_10000:
        return
    run_in_netns(
        netns,
        ["nft", "-f", "-"],
        where=where,
        check=True,
        timeout_s=10,
        input_text=loss_ruleset(table, loss_per_10000),
    )


def set_offloads(netns: str, where: str, ifname: str, *, enabled: bool) -> None:
    """Turn TSO, GSO and GRO on or off on one interface."""
    state = "on" if enabled else "off"
    completed = run_in_netns(
        netns,
        ["ethtool", "-K", ifname, "tso", state, "gso", state, "gro", state],
        where=where,
        timeout_s=10,
    )
    # ethtool exits non-zero when a feature is fixed; that is fine as long as it did not fail
    # to find the device at all.
    if completed.returncode != 0 and "Cannot get" in completed.stderr:
        raise LabError(f"ethtool on {where}:{ifname} failed: {completed.stderr.strip()}")
