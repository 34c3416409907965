"""Orphaned sockets of a dead predecessor on the service address, and their removal."""

from __future__ import annotations

import os

from migrate.kernel import nft, sockdiag


def destroy_orphans(listen: tuple[str, int]) -> int:
    """Abort connections on ``listen`` left by a predecessor that died (a crash, a SIGKILL):
    the kernel keeps such orphans (no process owns them) retransmitting their FIN, and one
    would keep its client's connection from being re-created here (the same 4-tuple) or send
    that client a FIN. Their RSTs are held back meanwhile: the client's connection lives on,
    elsewhere or soon here."""
    orphans = [
        info
        for info in sockdiag.tcp_sockets()
        if info.src == listen and info.inode == 0 and info.state != "LISTEN"
    ]
    if not orphans:
        return 0
    table = f"roam_hush_{os.getpid()}"
    family = "ip"
    nft.replace_table(
        family,
        table,
        f"""
  chain out {{
    type filter hook output priority -300; policy accept;
    ip saddr {listen[0]} tcp sport {listen[1]} tcp flags & rst == rst drop
  }}
""",
    )
    try:
        return sum(1 for info in orphans if sockdiag.destroy(info.src, info.dst))
    finally:
        nft.delete_table(family, table)
