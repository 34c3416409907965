"""nftables rules of the server shim's firewall gate (pure text generation).

One table per shim instance. The ``gate`` chain, at the raw priority of prerouting (before
connection tracking, so a dropped SYN costs no conntrack entry), sends every packet for the
service's address and port to the ``service`` chain, whose contents the shim replaces
atomically whenever the gate changes:

* closed: drop everything, silently (no RST, no ICMP), optionally copying it to an NFLOG group
  first so that pure attack traffic can be captured for intrusion detection (paper
  section I);
* open: drop sources blocked for exceeding their rate contract in this epoch; accept the
  addresses of the clients admissible in the running epoch (neither revoked nor past their
  subscription; or anyone with ``allow_any_source``); drop the rest.

Rate contracts are enforced in a second chain, ``contract``, hooked after connection tracking
(prerouting, priority mangle): it counts and limits only packets of connections the client
really holds, i.e. conntrack state ``established`` with status ``assured`` (the three-way
handshake completed with an in-window ACK of the server's SYN-ACK, or a picked-up connection
the server answered and the client acknowledged), and conntrack's TCP window tracking marks an
out-of-window packet ``invalid``. A spoofed SYN, a spoofed ACK or data segment on a guessed
tuple, or a spoofed packet on a half-open (SYN_RECV) entry is therefore never counted: an
outsider who spoofs a client's address cannot make it look over its contract (issue 12,
finding 4). Traffic over the rate is dropped and counted in a named counter the shim reads.
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
    # k of N: count the SYNs for the service (open or closed) for the attack reports.
    count_syns: bool = False


# Named counter of every packet the gate drops (closed, blocked, or from an address that holds
# no subscription): ``roam_gate_dropped_packets_total``. Contract counters are ``over_N``.
GATE_DROPPED_COUNTER = "gate_dropped"
# SYNs for the service's address and port (``count_syns``): the attack reports' ``syn``.
SYN_COUNTER = "syn_seen"


def family_of(endpoint: Endpoint) -> str:
    return "ip" if endpoint.address.version == 4 else "ip6"


def _addr_type(endpoint: Endpoint) -> str:
    return "ipv4_addr" if endpoint.address.version == 4 else "ipv6_addr"


def _elements(addresses: tuple[IPAddress, ...]) -> str:
    if not addresses:
        return ""
    return f" elements = {{ {', '.join(str(a) for a in addresses)} }};"


_DROP = f"counter name {GATE_DROPPED_COUNTER} drop"


def _service_rules(plan: GatePlan) -> list[str]:
    family = family_of(plan.listen)
    if not plan.open:
        log = f'log group {plan.nflog_group} prefix "roam-closed" ' if plan.nflog_group else ""
        return [f"{log}{_DROP}"]
    rules = [f"{family} saddr @blocked {_DROP}"]
    rules.append("accept" if plan.allow_any_source else f"{family} saddr @allowed accept")
    rules.append(_DROP)
    return rules


def _contract_rules(plan: GatePlan) -> list[str]:
    """Per contracted client, after conntrack: packets of its real connections beyond its rate
    are dropped and counted. Only ``established`` + ``assured`` packets are looked at, so
    nothing an outsider can send with the client's address alone is ever counted."""
    family = family_of(plan.listen)
    rules = []
    for contract in plan.contracts:
        # nft rates are in bytes; a contract is in kbit/s. The burst is one second's worth, and
        # the kernel's bucket holds rate plus burst: about two seconds' worth pass at first.
        kbytes = max(1, contract.rate_kbit // 8)
        rules.append(
            f"{family} daddr {plan.listen.address} tcp dport {plan.listen.port} "
            f"ct state established ct status assured {family} saddr {contract.address} "
            f"limit rate over {kbytes} kbytes/second burst {kbytes} kbytes "
            f"counter name {contract.counter} drop"
        )
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
    counters = f"  counter {GATE_DROPPED_COUNTER} {{ }}\n" + "".join(
        f"  counter {c.counter} {{ }}\n" for c in plan.contracts
    )
    syns = ""
    if plan.count_syns:
        counters += f"  counter {SYN_COUNTER} {{ }}\n"
        syns = (
            f"    {family} daddr {plan.listen.address} tcp dport {plan.listen.port} "
            f"tcp flags & (syn|ack) == syn counter name {SYN_COUNTER}\n"
        )
    service = "\n".join(f"    {rule}" for rule in _service_rules(plan))
    quiet = "\n".join(f"    {rule}" for rule in _outbound_rules(plan))
    # The contract chain exists only with contracts: a ``ct`` expression turns connection
    # tracking on in the namespace, which a deployment without contracts does not need.
    contract = ""
    if plan.contracts:
        rules = "\n".join(f"    {rule}" for rule in _contract_rules(plan))
        contract = (
            "  chain contract {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f"{rules}\n"
            "  }\n"
        )
    return f"""
  set allowed {{ type {addr_type};{_elements(plan.allowed)} }}
  set blocked {{ type {addr_type};{_elements(plan.blocked)} }}
{counters}  chain gate {{
    type filter hook prerouting priority raw; policy accept;
{syns}    {family} daddr {plan.listen.address} tcp dport {plan.listen.port} jump service
  }}
  chain service {{
{service}
  }}
  chain quiet {{
    type filter hook output priority raw; policy accept;
{quiet}
  }}
{contract}"""


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


def contract_update_script(table: str, plan: GatePlan) -> str:
    """One transaction that brings an existing gate table's contracts to ``plan``'s (after a
    reload of the client list): counters and the chain are added if missing (``add`` keeps
    existing ones and their counts), the rules rewritten. Not run at epoch boundaries: it
    refills every client's rate bucket."""
    family = family_of(plan.listen)
    lines = [f"add counter {family} {table} {c.counter}" for c in plan.contracts]
    lines.append(
        f"add chain {family} {table} contract "
        "{ type filter hook prerouting priority mangle; policy accept; }"
    )
    lines.append(f"flush chain {family} {table} contract")
    lines.extend(f"add rule {family} {table} contract {rule}" for rule in _contract_rules(plan))
    return "\n".join(lines) + "\n"
