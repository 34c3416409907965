"""nftables rules of the client shim (pure: the table's text, and the element changes of a
hand-over, ``*_changes``, which ``client_shim.switching`` applies over netlink).

Applications connect to ``VIP:vport``. Two maps rewrite the destination to the active server
in the output path, and the ``current`` set rewrites that server's replies back to the VIP in
prerouting. Both chains run before connection tracking with ``notrack`` (prerouting at the raw
priority, output at ``OUT_PRIORITY``, just after iptables' raw table): no connection tracking,
no Python on the packet path. The output chain is of type ``route`` so that the kernel routes the
packet again after its destination changed. A roam is one transaction that replaces the
single element of each map and of ``current``. With live migration, late packets from any
other server of the pool are dropped silently (the connection lives at the new server now; they
would otherwise meet a socket that has moved on, or none, and draw a RST from the client). In
reconnect mode (the paper's drop-and-reconnect) a connection never moves: it stays with the
server it opened to until that server drops it when its gate closes behind the service, so the
prerouting rewrite takes every pool server's answers (``pool``, not ``current``). Without that,
the answer to a request sent just before a switch, and the RST of the drop, were thrown away
and the application waited for its own timeout (curl: 2 s, 0 bytes) instead of being served
or told at once.

With live migration, two more chains run just before those (priority -310):

* ``capture_out`` copies the client's SYNs and data segments to the VIP to an NFLOG group,
  without holding them (this kernel has no nft ``queue``; ``log`` copies asynchronously), so
  the shim learns each connection's ISN and keeps the bytes a replay needs. Only those: a
  segment is copied when it has SYN, FIN or PSH (Linux sets PSH on the last segment of every
  write), or carries payload, which nft tells by its length against its header's (``tcp doff``;
  one rule per header length, as nft can neither subtract fields nor list a concatenation
  with ``doff``). Pure ACKs, the bulk of what a downloading client sends, are not copied, and
  neither is anything the servers send but carriers. (A rule "longer than any pure ACK",
  80 bytes, would miss a data segment of up to 28 bytes without PSH, which Linux sends when
  the peer's window cuts a write: a hole in the replay bytes.) Ports in the ``frozen`` set
  are held during a hand-over where the host can (``hold_mark``: marked here, copied, queued
  by an iptables rule, released after the switch to the rewrite, which then names the new
  server: ``client_shim.holding``); elsewhere dropped before they are copied, and the
  client's TCP sends them again, to the new server, at its probe timer (200 ms or more).
* Ports in ``finished`` are connections the server had closed (its FIN) when the service
  roamed, that closed during the hand-over, or that could not follow it (added in the
  switch's own transaction, before they are reset): their last segments (the client's own FIN,
  however late the application closes) are dropped rather than sent to the new server, which
  has no socket for them and would answer with a RST. A new connection's SYN on such a port
  takes the port out of the set, so the new connection's segments pass.
* The kernel batches the copies (``client_shim.capture``: up to 64 per message, at most 10 ms
  late), so that a client sending one request at a time does not wake the shim for each. A
  hand-over needs every copy made so far, at once: the shim sends a *barrier*, a UDP
  datagram to the VIP's ``BARRIER_PORT`` with ``BARRIER_MARK``, which the first rule of
  ``capture_out`` copies with ``queue-threshold 1`` (the kernel sends its whole batch with
  it, inside the shim's ``sendto``) and drops. Setting the mark needs CAP_NET_ADMIN; a
  barrier from anyone else would only flush a batch early.
* A new connection's SYN does not leave while ``syn_hold`` holds the VIP's port: for the
  moment between a hand-over reading which connections exist (its last drain before the
  freeze) and the freeze, which sends new connections to the new server. Every connection
  the drain found talks to the old server, every later one to the new; without
  the hold, one opened in that moment would be neither moved nor reset, and met a RST from
  the new server. Where frozen segments are held (``hold_mark``), such a SYN is held with
  them, copied first, and released after the switch, to the new server: its connection is
  not established when the hand-over reads its sockets after the freeze, and so is the new
  server's (``RoamRecord.answered_by_new``). Elsewhere it is dropped before it is copied and
  the client's TCP sends it again a second later, to the new server: a second's wait for a
  connection opened in that moment.
* Every SYN that passes adds its port to ``fresh``, which the hold empties, and the ``out``
  chain sends a ``fresh`` port's segments where its SYN went (the ``syn_*`` maps). Outside a
  hand-over those maps name the same server as ``addr_out``; inside the freeze they name the
  new server, and so a connection opened in the freeze completes its handshake, and sends its
  first request, to the server that answered its SYN, while the old server's connections
  (``addr_out``) still reach the old one. Without it the ACK and the first request went to
  the old server (a RST, dropped here, or silence), the new server sent its SYN-ACK again a
  second later, and the next roam found the connection without a checkpoint and reset it.
* ``capture_in`` copies checkpoint carriers (segments from a pool server with the carrier
  option, kind 253 and ExID 0x5352) to the same group and drops them: the client's TCP never
  sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

from migrate.endpoints import Endpoint, IPAddress
from migrate.kernel.nftsets import Add, Change, Element, Flush, concat, script, service

# A connection that ended at the old server (its FIN) before or as the service roamed is left
# to die quietly there: the rest of its closing handshake would meet no socket at the new
# server and draw a RST. Its port is free again for new connections (a SYN takes it out) and
# forgotten after this long.
FINISHED_TIMEOUT_S = 120
# The capture's flush barrier (see the module's docstring): a UDP datagram to the VIP on this
# port, with this mark ("SR" and 0xB1), is copied with the batch before it and dropped.
BARRIER_MARK = 0x535200B1
BARRIER_PORT = 9
# A port joins ``fresh`` with each SYN and leaves it at the next hand-over's hold; the timeout
# only bounds the set between hand-overs far apart (a freeze lasts a second at most).
FRESH_TIMEOUT_S = 120
# The rewrite runs after iptables' raw table (-300), where held segments wait (client_shim.holding),
# so that a segment released after a switch is rewritten to the new server; before conntrack
# (-200), which ``notrack`` must precede.
OUT_PRIORITY = -290


def _family(address: IPAddress) -> tuple[str, str]:
    if address.version == 4:
        return "ip", "ipv4_addr"
    return "ip6", "ipv6_addr"


def table_family(vip: IPAddress) -> str:
    return _family(vip)[0]


# TCP data offsets (header length / 4) in the order the client's segments use them: with
# timestamps, without options, then with SACK blocks; the rest for completeness.
_DATA_OFFSETS = (8, 5, 11, 13, 15, 10, 12, 14, 6, 7, 9)


def _payload_rules(to_vip: str, family: str, log: str) -> list[str]:
    """Rules that copy every segment carrying payload without FIN, SYN or PSH: longer than its
    headers. ``ip length`` counts the IPv4 header (20 bytes; IP options only make a pure ACK
    look longer, and copied, never the reverse); ``ip6 length`` is the payload length."""
    base = 20 if family == "ip" else 0
    quiet = f"{to_vip} tcp flags & (fin|syn|psh) == 0"
    return [f"{quiet} {family} length > {base + 60} {log}"] + [
        f"{quiet} tcp doff {offset} {family} length > {base + 4 * offset} {log}"
        for offset in _DATA_OFFSETS
    ]


def rewrite_table_body(
    vip: IPAddress,
    vport: int,
    servers: tuple[Endpoint, ...],
    active: Endpoint,
    nflog_group: int | None = None,
    hold_mark: int | None = None,
) -> str:
    """The client's table, pointed at ``active``: live mode with ``nflog_group`` (capture and
    freeze chains; only the current server's answers pass), reconnect mode without it (every
    pool server's answers pass)."""
    family, addr_type = _family(vip)
    pool = ", ".join(f"{s.address} . {s.port}" for s in servers)
    to_vip = f"{family} daddr {vip} tcp dport {vport}"
    opening = (
        f"{to_vip} tcp flags & (syn|ack) == syn notrack "
        f"tcp dport set tcp dport map @syn_port {family} daddr set {family} daddr map @syn_addr"
    )
    outbound = (
        f"{to_vip} notrack "
        f"tcp dport set tcp dport map @port_out {family} daddr set {family} daddr map @addr_out"
    )
    # See the module's docstring: only live mode moves connections away from their server.
    answering = "current" if nflog_group is not None else "pool"
    inbound = (
        f"{family} saddr . tcp sport @{answering} notrack "
        f"{family} saddr set {vip} tcp sport set {vport}"
    )
    active_pair = f"{active.address} . {active.port}"
    capture = fresh = ""
    if nflog_group is not None:
        # Only live mode freezes: elsewhere the ``syn_*`` maps always equal the others.
        fresh = (
            f"\n    {to_vip} tcp sport @fresh notrack "
            f"tcp dport set tcp dport map @syn_port {family} daddr set {family} daddr map @syn_addr"
        )
        log = f"log group {nflog_group} snaplen 65535"
        payload = "\n    ".join(_payload_rules(to_vip, family, log))
        opening_held = f"{to_vip} tcp flags & (syn|ack) == syn tcp dport @syn_hold"
        frozen = f"{to_vip} tcp sport @frozen drop"
        syn_held = f"{opening_held} drop"
        if hold_mark is not None:
            # Held, not dropped (client_shim.holding): marked here, copied by the rules below,
            # queued by the iptables raw rule (priority -300), released to ``out`` (-290).
            frozen = (
                f"{to_vip} tcp sport @frozen meta mark 0 meta mark set {hold_mark:#x}\n    "
                f"{to_vip} tcp sport @frozen meta mark != {hold_mark:#x} drop"
            )
            # A SYN in the hold too (copied by the rules below: the capture needs its ISN), so
            # that its connection does not wait a second for its TCP to send it again.
            syn_held = (
                f"{opening_held} meta mark 0 meta mark set {hold_mark:#x}\n    "
                f"{opening_held} meta mark != {hold_mark:#x} drop"
            )
        capture = f"""
  chain capture_out {{
    type filter hook output priority -310; policy accept;
    {family} daddr {vip} udp dport {BARRIER_PORT} meta mark {BARRIER_MARK:#x} \
      log group {nflog_group} queue-threshold 1 drop
    {syn_held}
    {to_vip} tcp flags & (syn|ack) == syn delete @finished {{ tcp sport }}
    {to_vip} tcp flags & (syn|ack) == syn add @fresh {{ tcp sport }}
    {to_vip} tcp sport @finished tcp flags & syn == 0 drop
    {frozen}
    {to_vip} tcp flags & (fin|syn|psh) != 0 {log}
    {payload}
  }}
  chain capture_in {{
    type filter hook prerouting priority -310; policy accept;
    {family} saddr . tcp sport @pool tcp option @253,16,16 0x5352 {log} drop
  }}"""
    return f"""
  map addr_out {{ type {addr_type} : {addr_type}; elements = {{ {vip} : {active.address} }} }}
  map port_out {{ type inet_service : inet_service; elements = {{ {vport} : {active.port} }} }}
  map syn_addr {{ type {addr_type} : {addr_type}; elements = {{ {vip} : {active.address} }} }}
  map syn_port {{ type inet_service : inet_service; elements = {{ {vport} : {active.port} }} }}
  set current {{ type {addr_type} . inet_service; elements = {{ {active_pair} }} }}
  set pool {{ type {addr_type} . inet_service; elements = {{ {pool} }} }}
  set frozen {{ type inet_service; }}
  set syn_hold {{ type inet_service; }}
  set finished {{
    type inet_service; flags dynamic,timeout; timeout {FINISHED_TIMEOUT_S}s;
  }}
  set fresh {{
    type inet_service; flags dynamic,timeout; timeout {FRESH_TIMEOUT_S}s;
  }}{capture}
  chain out {{
    type route hook output priority {OUT_PRIORITY}; policy accept;
    {opening}{fresh}
    {outbound}
  }}
  chain in {{
    type filter hook prerouting priority raw; policy accept;
    {inbound}
    {family} saddr . tcp sport @pool drop
  }}
"""


def _pair(endpoint: Endpoint) -> Element:
    address, port = endpoint.address, endpoint.port
    return Element(f"{address} . {port}", concat(address.packed, service(port)))


def _ports(ports: Sequence[int]) -> tuple[Element, ...]:
    return tuple(Element(str(port), service(port)) for port in ports)


def _point(vip: IPAddress, vport: int, active: Endpoint, maps: tuple[str, str]) -> list[Change]:
    address_map, port_map = maps
    address, port = active.address, active.port
    return [
        Flush("map", address_map),
        Flush("map", port_map),
        Add(address_map, (Element(f"{vip} : {address}", vip.packed, address.packed),)),
        Add(port_map, (Element(f"{vport} : {port}", service(vport), service(port)),)),
    ]


def switch_changes(
    vip: IPAddress,
    vport: int,
    active: Endpoint,
    finished: Sequence[int] = (),
    held: Sequence[int] = (),
) -> list[Change]:
    """One transaction that points the VIP at ``active``, thaws every frozen port but
    ``held`` (connections deferred to the next roam: still the old server's, which is gone)
    and adds ``finished`` (the connections that do not follow: not one of their segments may
    reach the new server, which has no socket for them and would answer with a RST)."""
    changes = [
        *_point(vip, vport, active, ("addr_out", "port_out")),
        *_point(vip, vport, active, ("syn_addr", "syn_port")),
        Flush("set", "current"),
        Flush("set", "frozen"),
        Flush("set", "syn_hold"),
        Add("current", (_pair(active),)),
    ]
    if finished:
        changes.append(Add("finished", _ports(finished)))
    if held:
        changes.append(Add("frozen", _ports(held)))
    return changes


def freeze_changes(vip: IPAddress, vport: int, ports: list[int], target: Endpoint) -> list[Change]:
    """One transaction at the start of a hand-over: hold the given connections' outgoing data,
    take nothing more from the old server (so the positions read next are final), and send
    new connections, and accept their answers, to the new server already (the SYNs held
    since ``hold_changes`` pass again)."""
    changes = [
        *_point(vip, vport, target, ("syn_addr", "syn_port")),
        Flush("set", "syn_hold"),
        Flush("set", "current"),
        Add("current", (_pair(target),)),
    ]
    if ports:
        changes.append(Add("frozen", _ports(ports)))
    return changes


def hold_changes(vport: int) -> list[Change]:
    """Hold new connections' SYNs (queued with the frozen segments where the table has a hold
    mark, else dropped uncopied) until the next freeze or switch, which both end
    the hold: the moment in which a hand-over reads which connections the old server has.
    Empties ``fresh``: every connection opened so far talks to the old server, and those the
    freeze sends to the new one join it with their SYN."""
    return [Add("syn_hold", _ports([vport])), Flush("set", "fresh")]


def switch_script(
    table: str,
    vip: IPAddress,
    vport: int,
    active: Endpoint,
    finished: Sequence[int] = (),
    held: Sequence[int] = (),
) -> str:
    """``switch_changes`` as an nft script."""
    return script(table_family(vip), table, switch_changes(vip, vport, active, finished, held))


def freeze_script(
    table: str, vip: IPAddress, vport: int, ports: list[int], target: Endpoint
) -> str:
    """``freeze_changes`` as an nft script."""
    return script(table_family(vip), table, freeze_changes(vip, vport, ports, target))


def hold_script(table: str, vip: IPAddress, vport: int) -> str:
    """``hold_changes`` as an nft script."""
    return script(table_family(vip), table, hold_changes(vport))
