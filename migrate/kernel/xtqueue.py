"""The iptables rule that hands the client's frozen segments to its NFQUEUE.

This kernel has no nft ``queue`` expression (CONFIG_NFT_QUEUE is off) but has iptables-nft's
``-j NFQUEUE`` (the xt target, CONFIG_NETFILTER_XT_TARGET_NFQUEUE). The client shim's own
nft rules mark a frozen connection's segments with ``hold_mark(queue)`` (only those without a
mark of their own); one rule in iptables' ``raw`` table, ``OUTPUT`` chain (hook output,
priority -300: after the shim's ``capture_out`` at -310, which copies them, and before its
rewrite at -290) queues exactly those, to the shim's queue (``migrate.kernel.nfqueue``). With
``--queue-bypass`` a shim that died (nothing bound) lets them pass instead of dropping them.

The rule carries a comment naming it; ``delete`` removes exactly it, then the ``raw`` table if
that holds no rule at all (iptables-nft created it for us: an empty table with an accepting
chain, inert, but state we left). Instance records (``migrate.kernel.instances``) make sure a
dead shim's rule is removed by the next sweep.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Final

from migrate.errors import LocalError
from migrate.kernel import nft

HOLD_MARK_BASE: Final = 0x53510000  # "SQ" and the queue number in the low 16 bits
TIMEOUT_S: Final = 10.0


class XtQueueError(LocalError):
    """The rule could not be added (one line naming the cause)."""


def hold_mark(queue: int) -> int:
    return HOLD_MARK_BASE | (queue & 0xFFFF)


def _binary(family: str) -> str:
    return "iptables" if family == "ip" else "ip6tables"


def rule_args(queue: int) -> list[str]:
    """The rule after ``-t raw -A`` / ``-D``."""
    return [
        "OUTPUT",
        "-m",
        "mark",
        "--mark",
        f"{hold_mark(queue):#x}",
        "-m",
        "comment",
        "--comment",
        f"server-roaming hold {queue}",
        "-j",
        "NFQUEUE",
        "--queue-num",
        str(queue),
        "--queue-bypass",
    ]


def _run(family: str, args: list[str], netns: str | None) -> subprocess.CompletedProcess[str]:
    binary = _binary(family)
    if shutil.which(binary) is None:
        raise XtQueueError(f"{binary} not found (install the iptables package)")
    argv = [*nft._netns_argv(netns), binary, "-w", "5", "-t", "raw", *args]
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise XtQueueError(f"{binary} did not finish within {TIMEOUT_S:g} s") from None
    except OSError as error:
        raise XtQueueError(f"cannot run {binary}: {error.strerror or error}") from None


def add(family: str, queue: int, *, netns: str | None = None) -> None:
    """Append the rule (``family`` "ip" or "ip6")."""
    done = _run(family, ["-A", *rule_args(queue)], netns)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no error message"])[-1]
        raise XtQueueError(f"{_binary(family)} -j NFQUEUE for queue {queue}: {reason}")


def delete(family: str, queue: int, *, netns: str | None = None) -> bool:
    """Remove the rule if present (True if it was), then the ``raw`` table if it is empty."""
    removed = False
    while _run(family, ["-D", *rule_args(queue)], netns).returncode == 0:
        removed = True  # added twice by a crash between add and record: remove every copy
    _delete_raw_if_empty(family, netns)
    return removed


def _delete_raw_if_empty(family: str, netns: str | None) -> None:
    if shutil.which("nft") is None:
        return
    listed = nft._run(["-j", "list", "table", family, "raw"], what="listing", netns=netns)
    if listed.returncode != 0:
        return  # no such table (or iptables-legacy): nothing of ours to remove
    try:
        items = json.loads(listed.stdout).get("nftables", [])
    except (json.JSONDecodeError, AttributeError):
        return
    chains = [i["chain"] for i in items if "chain" in i]
    refusing = any(c.get("policy", "accept") != "accept" for c in chains)
    if refusing or any("rule" in i for i in items):
        return
    nft.delete_table(family, "raw", missing_ok=True, netns=netns)
