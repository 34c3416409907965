"""nftables rules of the client shim (pure text generation).

Applications connect to ``VIP:vport``. Two maps rewrite the destination to the active server
in the output path, and a set of every server of the pool rewrites replies back to the VIP in
prerouting. Both chains sit at the raw priority with ``notrack``: no connection tracking, no
Python on the packet path. The output chain is of type ``route`` so that the kernel routes the
packet again after its destination changed. A roam is one transaction that replaces the
single element of each map.
"""

from __future__ import annotations

from migrate.endpoints import Endpoint, IPAddress

FAMILY = "ip"


def _family(address: IPAddress) -> tuple[str, str]:
    if address.version == 4:
        return "ip", "ipv4_addr"
    return "ip6", "ipv6_addr"


def rewrite_table_body(
    vip: IPAddress, vport: int, servers: tuple[Endpoint, ...], active: Endpoint
) -> str:
    family, addr_type = _family(vip)
    pool = ", ".join(f"{s.address} . {s.port}" for s in servers)
    outbound = (
        f"{family} daddr {vip} tcp dport {vport} notrack "
        f"tcp dport set tcp dport map @port_out {family} daddr set {family} daddr map @addr_out"
    )
    inbound = (
        f"{family} saddr . tcp sport @pool notrack {family} saddr set {vip} tcp sport set {vport}"
    )
    return f"""
  map addr_out {{ type {addr_type} : {addr_type}; elements = {{ {vip} : {active.address} }} }}
  map port_out {{ type inet_service : inet_service; elements = {{ {vport} : {active.port} }} }}
  set pool {{ type {addr_type} . inet_service; elements = {{ {pool} }} }}
  chain out {{
    type route hook output priority raw; policy accept;
    {outbound}
  }}
  chain in {{
    type filter hook prerouting priority raw; policy accept;
    {inbound}
  }}
"""


def table_family(vip: IPAddress) -> str:
    return _family(vip)[0]


def switch_script(table: str, vip: IPAddress, vport: int, active: Endpoint) -> str:
    """One transaction that points the VIP at ``active``."""
    family = _family(vip)[0]
    return (
        f"flush map {family} {table} addr_out\n"
        f"flush map {family} {table} port_out\n"
        f"add element {family} {table} addr_out {{ {vip} : {active.address} }}\n"
        f"add element {family} {table} port_out {{ {vport} : {active.port} }}\n"
    )
