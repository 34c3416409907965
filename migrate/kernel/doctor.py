"""``roam doctor``: does this host have every kernel feature the shims and labs rely on?

Each check is a small probe that leaves nothing behind: the nftables check creates and deletes a
table named like an instance table (``roam_doc_<pid>``, so ``roam cleanup`` would catch it after
a crash); the routing and netem probes run in a throw-away network namespace (``unshare --net``)
that the kernel destroys when the probe exits.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from migrate.kernel import libnft, nft, sockopts

CAP_NET_ADMIN: Final = 12
CAP_SYS_ADMIN: Final = 21
PROBE_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ok": self.ok,
            "required": self.required,
            "detail": self.detail,
            "fix": "" if self.ok else self.fix,
        }

    def line(self) -> str:
        status = "ok" if self.ok else "MISSING" if self.required else "absent"
        text = f"{status:<8} {self.name:<16} {self.detail}"
        if not self.ok and self.fix:
            text += f" -- fix: {self.fix}"
        return text


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = _capabilities()
    missing = [
        name
        for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
        if not caps >> bit & 1
    ]
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    if missing:
        return Check(
            "privileges",
            False,
            True,
            f"running as {who} without {', '.join(missing)}",
            "run as root (sudo roam ...); namespaces, nftables and TCP_REPAIR need both",
        )
    return Check("privileges", True, True, f"running as {who} with CAP_NET_ADMIN, CAP_SYS_ADMIN")


def check_nftables() -> Check:
    fix = "apt-get install nftables, and run as root"
    reason = nft.nft_available()
    if reason is not None:
        return Check("nftables", False, True, reason, fix)
    name = nft.instance_table_name("doc", os.getpid())
    body = "counter probe { }\nset probe_set { type ipv4_addr; elements = { 192.0.2.1 } }"
    try:
        nft.replace_table("inet", name, body)
        try:
            counters = nft.counters("inet", name)
            elements = nft.set_elements("inet", name, "probe_set")
        finally:
            nft.delete_table("inet", name)
    except nft.NftError as error:
        return Check("nftables", False, True, str(error), fix)
    if "probe" not in counters or elements != ["192.0.2.1"]:
        return Check("nftables", False, True, "nft -j output not understood", "report a bug")
    return Check("nftables", True, True, "scratch table created, read back (JSON) and deleted")


NFLOG_PROBE_GROUPS: Final = 8  # groups tried: another reader may hold one


def _bind_probe(open_one: Callable[[int], Any], error_type: type[Exception]) -> str:
    """Bind and release one of ``NFLOG_PROBE_GROUPS`` numbers with ``open_one`` (another
    reader may hold one): the number bound, or raises the last ``error_type``."""
    base = 40000 + os.getpid() % 20000
    error: Exception | None = None
    for number in range(base, base + NFLOG_PROBE_GROUPS):
        try:
            opened = open_one(number)
        except error_type as failed:
            error = failed
            continue
        opened.close()
        return str(number)
    assert error is not None
    raise error


def check_nflog() -> Check:
    """The client shim's live mode reads the packets it checkpoints from an NFLOG group
    (``migrate.kernel.nflog``; docs/architecture.md: this kernel has no nft ``queue``)."""
    from migrate.kernel.nflog import NflogError, NflogReader

    fix = "modprobe nfnetlink_log (CONFIG_NETFILTER_NETLINK_LOG); run as root"
    try:
        group = _bind_probe(NflogReader.open, NflogError)
    except NflogError as error:
        return Check("nflog", False, True, f"cannot bind an NFLOG group: {error}", fix)
    return Check("nflog", True, True, f"bound and released NFLOG group {group}")


def check_nfqueue() -> Check:
    """The client shim holds a frozen connection's segments in an NFQUEUE during a hand-over
    (``client_shim.holding``): it needs a queue it can bind and iptables for the rule that fills
    it. Not required: without them it drops those segments, and a request written in the
    freeze waits for the client's TCP to send it again (200 ms or more)."""
    from migrate.kernel.nfqueue import NfqueueError, PacketHolder

    if shutil.which("iptables") is None:
        reason = "iptables not found: the freeze drops segments instead of holding them"
        return Check("nfqueue", False, False, reason, "apt-get install iptables")
    fix = "modprobe nfnetlink_queue xt_NFQUEUE (CONFIG_NETFILTER_NETLINK_QUEUE); run as root"
    try:
        queue = _bind_probe(PacketHolder.open, NfqueueError)
    except NfqueueError as error:
        return Check("nfqueue", False, False, f"cannot bind an NFQUEUE: {error}", fix)
    return Check("nfqueue", True, False, f"bound and released NFQUEUE {queue}; iptables found")


def _own_tcp_repair_probe() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(socket.SOL_TCP, sockopts.TCP_REPAIR, 1)
            sock.setsockopt(socket.SOL_TCP, sockopts.TCP_REPAIR, 0)
        except OSError as error:
            return f"TCP_REPAIR: {error.strerror}"
    return None


def _tcp_repair_probe() -> str | None:
    """The TCP_REPAIR adapter's own probe when it exists, else a minimal one."""
    probe: Callable[[], str | None]
    try:
        from migrate.kernel.tcp_repair import supported as probe
    except ImportError:
        probe = _own_tcp_repair_probe
    return probe()


def check_tcp_repair() -> Check:
    reason = _tcp_repair_probe()
    if reason is not None:
        return Check(
            "tcp_repair",
            False,
            True,
            reason,
            "needs CAP_NET_ADMIN and a kernel with TCP_REPAIR (CONFIG_CHECKPOINT_RESTORE)",
        )
    return Check("tcp_repair", True, True, "repair mode, queue sequence numbers and window work")


def check_ip_transparent() -> Check:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(socket.SOL_IP, sockopts.IP_TRANSPARENT, 1)
        except OSError as error:
            return Check(
                "ip_transparent",
                False,
                True,
                f"IP_TRANSPARENT: {error.strerror}",
                "needs CAP_NET_ADMIN (run as root)",
            )
    return Check("ip_transparent", True, True, "IP_TRANSPARENT can be set on a TCP socket")


def check_splice() -> Check:
    fix = "use CPython 3.10+ on Linux"
    splice = getattr(os, "splice", None)
    if splice is None:
        return Check("splice", False, True, "os.splice is not available", fix)
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    try:
        os.write(source_w, b"probe")
        moved = splice(source_r, sink_w, 5)
        data = os.read(sink_r, 5)
    except OSError as error:
        return Check("splice", False, True, f"splice(2) failed: {error.strerror}", fix)
    finally:
        for fd in (source_r, source_w, sink_r, sink_w):
            os.close(fd)
    if moved != 5 or data != b"probe":
        return Check("splice", False, True, "splice(2) moved the wrong bytes", fix)
    return Check("splice", True, True, "os.splice moves bytes between pipes")


def _scratch(commands: Sequence[Sequence[str]]) -> str | None:
    """Run ``commands`` in one throw-away network namespace; ``None`` or the first failure."""
    if shutil.which("unshare") is None:
        return "unshare not found (install util-linux)"
    script = " && ".join(" ".join(command) for command in commands)
    try:
        completed = subprocess.run(
            ["unshare", "--net", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"probe failed: {error}"
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        return lines[0] if lines else f"exit status {completed.returncode}"
    return None


def check_policy_routing() -> Check:
    fix = "needs iproute2 and Linux 4.17+ (ip rule ipproto/sport selectors)"
    if shutil.which("ip") is None:
        return Check("policy_routing", False, True, "ip not found", "apt-get install iproute2")
    reason = _scratch(
        [
            ["ip", "rule", "add", "pref", "4700", "from", "127.0.0.1", "ipproto", "tcp",
             "sport", "8080", "lookup", "4700"],
            ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "4700"],
            ["ip", "rule", "show", "pref", "4700", "|", "grep", "-q", "sport"],
        ]
    )  # fmt: skip
    if reason is not None:
        return Check("policy_routing", False, True, reason, fix)
    return Check(
        "policy_routing", True, True, "ip rule with ipproto/sport selector and a local route"
    )


def check_netem() -> Check:
    if shutil.which("tc") is None:
        return Check("netem", False, False, "tc not found", "apt-get install iproute2")
    reason = _scratch([["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]])
    if reason is not None:
        return Check(
            "netem",
            False,
            False,
            f"no netem qdisc ({reason}): labs cannot emulate delay; loss uses nftables numgen",
            "use a kernel with sch_netem (e.g. install linux-modules-extra) to emulate delay",
        )
    return Check("netem", True, False, "netem qdisc available: labs can emulate delay")


def check_libnftables() -> Check:
    if not libnft.available():
        return Check(
            "libnftables",
            False,
            False,
            "libnftables not loadable (or ROAM_NFT_PROGRAM=1): rule changes start nft, "
            "8-17 ms each, inside every hand-over's pause",
            "apt-get install libnftables1",
        )
    status, errors = libnft.run("list tables\n")
    if status != 0:
        return Check("libnftables", False, False, f"libnftables refused a listing: {errors}")
    return Check("libnftables", True, False, "rule changes run in-process (no nft started)")


CHECKS: Final[tuple[Callable[[], Check], ...]] = (
    check_privileges,
    check_nftables,
    check_libnftables,
    check_nflog,
    check_nfqueue,
    check_tcp_repair,
    check_ip_transparent,
    check_splice,
    check_policy_routing,
    check_netem,
)


def run_checks() -> list[Check]:
    """Every check, in a fixed order; a probe that crashes is reported as a failed check."""
    results = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            results.append(check())
        except Exception as error:
            results.append(Check(name, False, True, f"probe crashed: {error!r}", "report a bug"))
    return results


def all_required_ok(checks: Sequence[Check]) -> bool:
    return all(check.ok for check in checks if check.required)
