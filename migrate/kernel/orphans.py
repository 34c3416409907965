"""Aborting the TCP connections a dead predecessor left on our listening address.

A server shim that died (a crash, a SIGKILL) leaves its accepted connections to the kernel as
orphans: no process owns them, and the kernel keeps retransmitting their FIN. One would keep
its client's connection from being re-created here (the same 4-tuple) or send that client a
FIN. ``destroy_orphans`` aborts them with sock_diag. Their RSTs are held back meanwhile by a
temporary table ``roam_hush_<pid>``: the client's connection lives on, elsewhere or soon here.

The table is recorded in the shim's instance record before it is created and forgotten once
deleted, so a shim killed between the two leaves a record that ``roam cleanup`` (or the next
shim's start-up sweep) acts on, in whatever namespace the shim ran.
"""

from __future__ import annotations

from migrate.kernel import sockdiag
from migrate.kernel.instances import Instance

HUSH_FAMILY = "ip"


def hush_table_body(listen: tuple[str, int]) -> str:
    """Drop the RSTs that aborting orphans on ``listen`` sends, and nothing else."""
    address, port = listen
    return f"""
  chain out {{
    type filter hook output priority -300; policy accept;
    ip saddr {address} tcp sport {port} tcp flags & rst == rst drop
  }}
"""


def destroy_orphans(listen: tuple[str, int], instance: Instance) -> int:
    """Abort the ownerless connections on ``listen``; how many were destroyed."""
    orphans = [
        info
        for info in sockdiag.tcp_sockets()
        if info.src == listen and info.inode == 0 and info.state != "LISTEN"
    ]
    if not orphans:
        return 0
    table = instance.add_table(HUSH_FAMILY, instance.table_name("hush"), hush_table_body(listen))
    try:
        return sum(1 for info in orphans if sockdiag.destroy(info.src, info.dst))
    finally:
        instance.undo(table)
