"""nftables rules of the server shim's firewall gate (pure text generation).

One table per shim instance. The ``gate`` chain, at the raw priority of prerouting (before
connection tracking, so a dropped SYN costs no conntrack entry), sends every packet for the
service's address and port to the ``service`` chain, whose contents the shim replaces
atomically whenever the gate changes:

* closed: drop everything, silently (no RST, no ICMP), optionally copying it to an NFLOG group
  first so that pure attack traffic can be captured for intrusion detection (paper
  section I);
* open: drop sources blocked for exceeding their rate contract in this epoch; drop traffic of
  each contracted client beyond its rate (counted in a named counter the shim reads); accept
  the registered client addresses (or anyone with ``allow_any_source``); drop the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from migrate.endpoints import Endpoint, IPAddress


@dataclass(frozen=True, slots=True)
class Contract:
    client_id: int
    address: IPAddress
    rate_kbit: int

    @property
    def counter(self) -> str:
        return f"over_{self.client_id}"


@dataclass(frozen=True, slots=True)
class GatePlan:
    listen: Endpoint
    open: bool
    allowed: tuple[IPAddress, ...] = ()
    allow_any_source: bool = False
    blocked: tuple[IPAddress, ...] = ()
    contracts: tuple[Contract, ...] = ()
    nflog_group: int | None = None


def family_of(endpoint: Endpoint) -> str:
    return "ip" if endpoint.address.version == 4 else "ip6"


def _addr_type(endpoint: Endpoint) -> str:
    return "ipv4_addr" if endpoint.address.version == 4 else "ipv6_addr"


def _elements(addresses: tuple[IPAddress, ...]) -> str:
    if not addresses:
        return ""
    return f" elements = {{ {', '.join(str(a) for a in addresses)} }};"


def _service_rules(plan: GatePlan) -> list[str]:
    family = family_of(plan.listen)
    if not plan.open:
        log = f'log group {plan.nflog_group} prefix "roam-closed" ' if plan.nflog_group else ""
        return [f"{log}drop"]
    rules = [f"{family} saddr @blocked drop"]
    for contract in plan.contracts:
        # nft rates are in bytes; a contract is in kbit/s. The burst is one second's worth, and
        # the kernel's bucket holds rate plus burst: about two seconds' worth pass at first.
        kbytes = max(1, contract.rate_kbit // 8)
        rules.append(
            f"{family} saddr {contract.address} limit rate over {kbytes} kbytes/second "
            f"burst {kbytes} kbytes counter name {contract.counter} drop"
        )
    rules.append("accept" if plan.allow_any_source else f"{family} saddr @allowed accept")
    rules.append("drop")
    return rules


def _outbound_rules(plan: GatePlan) -> list[str]:
    """While closed, nothing of the service leaves either: a connection still here has moved
    to another server, and a RST or FIN from here (a late close, an orphan) must not reach its
    client. Ordinary data segments are let through: they only matter to the peer's kernel,
    which no longer takes them."""
    if plan.open:
        return []
    family = family_of(plan.listen)
    return [
        f"{family} saddr {plan.listen.address} tcp sport {plan.listen.port} "
        "tcp flags & (fin|rst) != 0 drop"
    ]


def gate_table_body(plan: GatePlan) -> str:
    family = family_of(plan.listen)
    addr_type = _addr_type(plan.listen)
    counters = "".join(f"  counter {c.counter} {{ }}\n" for c in plan.contracts)
    service = "\n".join(f"    {rule}" for rule in _service_rules(plan))
    quiet = "\n".join(f"    {rule}" for rule in _outbound_rules(plan))
    return f"""
  set allowed {{ type {addr_type};{_elements(plan.allowed)} }}
  set blocked {{ type {addr_type};{_elements(plan.blocked)} }}
{counters}  chain gate {{
    type filter hook prerouting priority raw; policy accept;
    {family} daddr {plan.listen.address} tcp dport {plan.listen.port} jump service
  }}
  chain service {{
{service}
  }}
  chain quiet {{
    type filter hook output priority raw; policy accept;
{quiet}
  }}
"""


def gate_update_script(table: str, plan: GatePlan) -> str:
    """One transaction that brings an existing gate table to ``plan`` (counters kept)."""
    family = family_of(plan.listen)
    lines = [
        f"flush set {family} {table} allowed",
        f"flush set {family} {table} blocked",
    ]
    if plan.allowed:
        lines.append(
            f"add element {family} {table} allowed {{ {', '.join(map(str, plan.allowed))} }}"
        )
    if plan.blocked:
        lines.append(
            f"add element {family} {table} blocked {{ {', '.join(map(str, plan.blocked))} }}"
        )
    lines.append(f"flush chain {family} {table} service")
    lines.extend(f"add rule {family} {table} service {rule}" for rule in _service_rules(plan))
    lines.append(f"flush chain {family} {table} quiet")
    lines.extend(f"add rule {family} {table} quiet {rule}" for rule in _outbound_rules(plan))
    return "\n".join(lines) + "\n"
