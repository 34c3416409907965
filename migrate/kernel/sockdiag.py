"""TCP sockets of the current network namespace through NETLINK_SOCK_DIAG: list them with
their ``tcp_info`` counters, and destroy one (SOCK_DESTROY).

Theory of operation. The client shim does not own the application's sockets, yet it must know
each connection's positions (bytes the server acknowledged, bytes received from it) to ask
for a re-incarnation, and it must be able to reset a connection that cannot be migrated. Both
are what ``ss -ti`` and ``ss -K`` do: an ``inet_diag_req_v2`` dump of a family and protocol,
filtered in the kernel by a state mask (and, for one destination, by the bytecode program
``ss dst A:P`` sends), with ``INET_DIAG_INFO`` (``struct tcp_info``) attached to each
``inet_diag_msg``; and the same request with exact addresses as ``SOCK_DESTROY``, after
which the kernel aborts the socket: the owning application's next call fails with
``ECONNABORTED``. The protocol is spoken with ``struct`` (no pyroute2: its synchronous API must
not run inside an asyncio loop, and these calls are short).

``struct tcp_info`` only ever grows, so fields are read at their fixed offsets when the kernel's
payload is long enough, and are 0 otherwise. Time-wait and SYN-RECV entries carry no
``tcp_info`` (``has_info`` is False).

IPv4-mapped IPv6 sockets (an ``AF_INET6`` socket talking to an IPv4 address) are IPv4
connections on the wire: ``tcp_sockets`` reports them too, with IPv4 addresses and
``family == AF_INET6``, and ``destroy`` finds them.

Sockets are those of the calling thread's network namespace (``call_in_netns``).
``destroy`` needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

from migrate.errors import LocalError

# --- constants (linux/netlink.h, sock_diag.h, inet_diag.h, net/tcp_states.h) ----------------

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
SOCK_DESTROY: Final = 21
NLM_F_REQUEST: Final = 0x01
NLM_F_ACK: Final = 0x04
NLM_F_DUMP: Final = 0x300
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
INET_DIAG_INFO: Final = 2
INET_DIAG_REQ_BYTECODE: Final = 1  # a request attribute: a filter the kernel runs per socket
INET_DIAG_BC_D_COND: Final = 8  # the remote address (a prefix) and port match
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF

TCP_STATES: Final = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}
TCPF_ALL: Final = 0xFFFFFFFF
TCPF_ESTABLISHED: Final = 1 << 1
TCPF_TIME_WAIT: Final = 1 << 6
TCPF_LISTEN: Final = 1 << 10

# tcp_info.tcpi_options bits.
TCPI_OPT_TIMESTAMPS: Final = 1
TCPI_OPT_SACK: Final = 2
TCPI_OPT_WSCALE: Final = 4

_NLMSGHDR: Final = struct.Struct("=IHHII")
_NLATTR: Final = struct.Struct("=HH")
_NLMSGERR: Final = struct.Struct("=i")
# struct inet_diag_sockid: be16 sport, be16 dport, be32 src[4], be32 dst[4], u32 if, u32 cookie[2]
_SOCKID: Final = struct.Struct("!HH16s16s")
_SOCKID_TAIL: Final = struct.Struct("=III")
_SOCKID_SIZE: Final = _SOCKID.size + _SOCKID_TAIL.size  # 48
# struct inet_diag_req_v2: u8 family, protocol, ext, pad; u32 states; sockid
_REQ_HEAD: Final = struct.Struct("=BBBxI")
# struct inet_diag_msg: u8 family, state, timer, retrans; sockid; u32 expires, rqueue, wqueue,
# uid, inode
_MSG_HEAD: Final = struct.Struct("=BBBB")
_MSG_TAIL: Final = struct.Struct("=IIIII")
_MSG_SIZE: Final = _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size  # 72
# struct inet_diag_bc_op: u8 code, yes; u16 no (offsets to jump by: past the end accepts,
# beyond it by 4 rejects). struct inet_diag_hostcond: u8 family, prefix_len; int port; addr.
_BC_OP: Final = struct.Struct("=BBH")
_BC_HOSTCOND: Final = struct.Struct("=BBxxi")

# Offsets in struct tcp_info (include/uapi/linux/tcp.h); the struct only grows.
_U8: Final = struct.Struct("=B")
_U32: Final = struct.Struct("=I")
_U64: Final = struct.Struct("=Q")
_TCPI_FIELDS: Final = (
    # name, offset, format
    ("ca_state", 1, _U8),
    ("retransmits", 2, _U8),
    ("options", 5, _U8),
    ("rto_us", 8, _U32),
    ("snd_mss", 16, _U32),
    ("rcv_mss", 20, _U32),
    ("unacked", 24, _U32),
    ("sacked", 28, _U32),
    ("lost", 32, _U32),
    ("retrans", 36, _U32),
    ("pmtu", 60, _U32),
    ("rtt_us", 68, _U32),
    ("rttvar_us", 72, _U32),
    ("snd_ssthresh", 76, _U32),
    ("snd_cwnd", 80, _U32),
    ("advmss", 84, _U32),
    ("total_retrans", 100, _U32),
    ("bytes_acked", 120, _U64),  # Linux 4.1
    ("bytes_received", 128, _U64),  # Linux 4.1
    ("segs_out", 136, _U32),  # Linux 4.2
    ("segs_in", 140, _U32),
    ("notsent_bytes", 144, _U32),  # Linux 4.6
    ("data_segs_in", 152, _U32),  # Linux 4.6
    ("data_segs_out", 156, _U32),
    ("bytes_sent", 200, _U64),  # Linux 4.19
    ("bytes_retrans", 208, _U64),
    ("snd_wnd", 228, _U32),  # Linux 6.2
    ("rcv_wnd", 232, _U32),  # Linux 6.12
)
_TCPI_WSCALE_OFFSET: Final = 6  # tcpi_snd_wscale:4 (low nibble), tcpi_rcv_wscale:4


def _layout(fields: tuple[tuple[str, int, struct.Struct], ...]) -> tuple[struct.Struct, list[str]]:
    """One ``struct`` for all of ``fields`` (sorted by offset, the gaps skipped) and their
    names in its order: one unpack per socket instead of one per field (a dump of 1000
    sockets parsed in a quarter of the time)."""
    layout, names, position = "=", [], 0
    for name, offset, fmt in sorted(fields, key=lambda field: field[1]):
        layout += "x" * (offset - position) + fmt.format[-1]
        names.append(name)
        position = offset + fmt.size
    return struct.Struct(layout), names


_TCPI_WHOLE, _TCPI_NAMES = _layout((*_TCPI_FIELDS, ("wscales", _TCPI_WSCALE_OFFSET, _U8)))
_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d
_RECV_BUFFER: Final = 64 * 1024
_TIMEOUT_S: Final = 5.0


class SockDiagError(LocalError, OSError):
    """A sock_diag request failed; ``str()`` names the request and the kernel's reason."""


@dataclass(frozen=True)
class TcpSocketInfo:
    """One TCP socket as sock_diag reports it. The ``tcp_info`` fields (from ``ca_state``
    on) are 0 when ``has_info`` is False (time-wait, request sockets) or the kernel is older
    than the field. ``bytes_acked`` of a connecting socket counts its SYN (see
    docs/tcp_repair.md); ``rtt_us`` is the smoothed RTT in microseconds."""

    src: tuple[str, int]
    dst: tuple[str, int]
    state: str
    inode: int
    uid: int
    cookie: int
    family: int
    rqueue: int
    wqueue: int
    has_info: bool = False
    ca_state: int = 0
    retransmits: int = 0
    options: int = 0
    snd_wscale: int = 0
    rcv_wscale: int = 0
    rto_us: int = 0
    snd_mss: int = 0
    rcv_mss: int = 0
    unacked: int = 0
    sacked: int = 0
    lost: int = 0
    retrans: int = 0
    pmtu: int = 0
    rtt_us: int = 0
    rttvar_us: int = 0
    snd_ssthresh: int = 0
    snd_cwnd: int = 0
    advmss: int = 0
    total_retrans: int = 0
    bytes_acked: int = 0
    bytes_received: int = 0
    segs_out: int = 0
    segs_in: int = 0
    notsent_bytes: int = 0
    data_segs_in: int = 0
    data_segs_out: int = 0
    bytes_sent: int = 0
    bytes_retrans: int = 0
    snd_wnd: int = 0
    rcv_wnd: int | None = None  # None: a kernel before 6.12 does not say

    @property
    def timestamps(self) -> bool:
        return bool(self.options & TCPI_OPT_TIMESTAMPS)

    @property
    def sack(self) -> bool:
        return bool(self.options & TCPI_OPT_SACK)

    @property
    def wscale(self) -> bool:
        return bool(self.options & TCPI_OPT_WSCALE)


# --- encoding -----------------------------------------------------------------------------------


def _address_bytes(family: int, address: str) -> bytes:
    """The 16-byte ``idiag_src``/``idiag_dst`` of an IPv4 address for ``family``."""
    try:
        packed = ipaddress.IPv4Address(address).packed
    except ValueError as error:
        raise SockDiagError(errno.EINVAL, f"{address!r} is not an IPv4 address") from error
    if family == socket.AF_INET:
        return packed + bytes(12)
    return bytes(10) + b"\xff\xff" + packed  # ::ffff:a.b.c.d


def _request(
    family: int,
    states: int,
    *,
    src: tuple[str, int] | None = None,
    dst: tuple[str, int] | None = None,
    cookie: int | None = None,
) -> bytes:
    ext = 1 << (INET_DIAG_INFO - 1)
    head = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, ext, states)
    src_bytes = _address_bytes(family, src[0]) if src else bytes(16)
    dst_bytes = _address_bytes(family, dst[0]) if dst else bytes(16)
    sockid = _SOCKID.pack(src[1] if src else 0, dst[1] if dst else 0, src_bytes, dst_bytes)
    if cookie is None:
        low = high = INET_DIAG_NOCOOKIE
    else:
        low, high = cookie & 0xFFFFFFFF, cookie >> 32
    return head + sockid + _SOCKID_TAIL.pack(0, low, high)


def _ipv4_of(family: int, raw: bytes) -> str | None:
    """The IPv4 address in a 16-byte ``idiag_src``/``idiag_dst``, or ``None`` (real IPv6)."""
    if family == socket.AF_INET:
        return socket.inet_ntoa(raw[:4])
    if raw[:12] == _MAPPED_PREFIX:
        return socket.inet_ntoa(raw[12:16])
    if raw == bytes(16):
        return "0.0.0.0"  # an unconnected dual-stack socket
    return None


def _parse_tcp_info(data: bytes) -> dict[str, int]:
    if len(data) >= _TCPI_WHOLE.size:  # any kernel since 6.12: every field at once
        values = dict(zip(_TCPI_NAMES, _TCPI_WHOLE.unpack_from(data), strict=True))
        scales = values.pop("wscales")
    else:
        values = {
            name: fmt.unpack_from(data, offset)[0]
            for name, offset, fmt in _TCPI_FIELDS
            if offset + fmt.size <= len(data)
        }
        scales = data[_TCPI_WSCALE_OFFSET] if len(data) > _TCPI_WSCALE_OFFSET else None
    if scales is not None:
        values["snd_wscale"] = scales & 0x0F
        values["rcv_wscale"] = scales >> 4
    return values


def parse_diag_message(body: bytes) -> TcpSocketInfo | None:
    """A ``TcpSocketInfo`` from one ``inet_diag_msg`` with its attributes, or ``None`` for an
    IPv6 socket that is not IPv4-mapped."""
    if len(body) < _MSG_SIZE:
        raise SockDiagError(errno.EPROTO, f"inet_diag_msg of {len(body)} bytes is truncated")
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body)
    sport, dport, src_raw, dst_raw = _SOCKID.unpack_from(body, _MSG_HEAD.size)
    _if, cookie_low, cookie_high = _SOCKID_TAIL.unpack_from(body, _MSG_HEAD.size + _SOCKID.size)
    _expires, rqueue, wqueue, uid, inode = _MSG_TAIL.unpack_from(
        body, _MSG_HEAD.size + _SOCKID_SIZE
    )
    src = _ipv4_of(family, src_raw)
    dst = _ipv4_of(family, dst_raw)
    if src is None or dst is None:
        return None
    info: dict[str, int] = {}
    offset = _MSG_SIZE
    while offset + _NLATTR.size <= len(body):
        length, kind = _NLATTR.unpack_from(body, offset)
        if length < _NLATTR.size or offset + length > len(body):
            break
        if kind & 0x3FFF == INET_DIAG_INFO:
            info = _parse_tcp_info(body[offset + _NLATTR.size : offset + length])
        offset += (length + 3) & ~3
    fields: dict[str, object] = dict(
        info,
        src=(src, sport),
        dst=(dst, dport),
        state=TCP_STATES.get(state, str(state)),
        inode=inode,
        uid=uid,
        cookie=cookie_low | (cookie_high << 32),
        family=family,
        rqueue=rqueue,
        wqueue=wqueue,
        has_info=bool(info),
    )
    # Not through __init__: a frozen dataclass sets its 40 fields one object.__setattr__ at a
    # time, 18 us a socket, most of a 1000-socket dump's parse (on the client, inside the
    # freeze). Fields the kernel did not send keep their class defaults (0).
    parsed = object.__new__(TcpSocketInfo)
    parsed.__dict__.update(fields)
    return parsed


# --- netlink exchange -----------------------------------------------------------------------


def _exchange(message_type: int, flags: int, payload: bytes, what: str) -> list[bytes]:
    """Send one request; the bodies of the replies (a dump's messages, or one reply), up to
    NLMSG_DONE or the acknowledgment. ``SockDiagError`` on a netlink error."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(_TIMEOUT_S)
        sock.bind((0, 0))
        seq = 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), message_type, flags, seq, 0)
        sock.send(header + payload)
        bodies: list[bytes] = []
        multi = bool(flags & NLM_F_DUMP)
        while True:
            try:
                data = sock.recv(_RECV_BUFFER)
            except TimeoutError as error:
                raise SockDiagError(errno.ETIMEDOUT, f"{what}: no answer from sock_diag") from error
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, reply_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    break
                body = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if reply_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return bodies
                if kind == NLMSG_ERROR:
                    code = -_NLMSGERR.unpack_from(body)[0]
                    if code == 0:
                        return bodies
                    raise SockDiagError(code, f"{what}: {os.strerror(code)}")
                bodies.append(body)
                if not multi and not flags & NLM_F_ACK:
                    return bodies


def destination_filter(dst: tuple[str, int]) -> bytes:
    """An ``INET_DIAG_REQ_BYTECODE`` attribute keeping only sockets whose remote end is
    ``dst`` (IPv4; the kernel matches IPv4-mapped ``AF_INET6`` sockets to it too), as ``ss dst
    A:P`` sends: one ``D_COND`` whose "yes" ends the program (accept) and whose "no" jumps 4
    bytes beyond it (reject)."""
    condition = (
        _BC_HOSTCOND.pack(socket.AF_INET, 32, dst[1]) + _address_bytes(socket.AF_INET, dst[0])[:4]
    )
    length = _BC_OP.size + len(condition)
    program = _BC_OP.pack(INET_DIAG_BC_D_COND, length, length + 4) + condition
    return _NLATTR.pack(_NLATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program


def _dump(family: int, states: int, dst: tuple[str, int] | None = None) -> list[TcpSocketInfo]:
    request = _request(family, states)
    if dst is not None:
        # The kernel skips the sockets to other destinations before copying them: on a busy
        # host (the client shim dumps its VIP's sockets inside the freeze) most of the dump.
        request += destination_filter(dst)
    bodies = _exchange(
        SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, request, "sock_diag TCP dump"
    )
    return [info for body in bodies if (info := parse_diag_message(body)) is not None]


def tcp_sockets(
    *,
    dst: tuple[str, int] | None = None,
    src_port: int | None = None,
    states: int = TCPF_ALL,
    include_mapped: bool = True,
) -> list[TcpSocketInfo]:
    """IPv4 TCP sockets of the calling thread's namespace, with ``tcp_info``.

    ``states`` is a kernel-side mask of ``1 << state`` bits (``TCPF_ALL``; e.g.
    ``TCPF_ALL & ~TCPF_LISTEN``). ``dst`` (remote address and port) and ``src_port`` filter
    the result. ``include_mapped`` adds IPv4-mapped ``AF_INET6`` sockets.
    """
    found = _dump(socket.AF_INET, states, dst)
    if include_mapped and socket.has_ipv6:
        found += _dump(socket.AF_INET6, states, dst)
    if src_port is None:
        return found
    return [info for info in found if info.src[1] == src_port]


def lookup(src: tuple[str, int], dst: tuple[str, int]) -> TcpSocketInfo | None:
    """The socket whose local address is ``src`` and remote address ``dst``, or ``None``.

    The kernel's exact lookup (no dump). Its lookup is the one a packet from ``dst`` to
    ``src`` would get, so it may return a listener on ``src``: that is not the connection
    asked for, and ``None`` is returned.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        request = _request(family, TCPF_ALL, src=src, dst=dst)
        try:
            bodies = _exchange(
                SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, request, f"sock_diag lookup {src}->{dst}"
            )
        except SockDiagError as error:
            if error.errno in (errno.ENOENT, errno.EAFNOSUPPORT):
                continue
            raise
        for body in bodies:
            info = parse_diag_message(body)
            if info is not None and info.src == (src[0], src[1]) and info.dst == (dst[0], dst[1]):
                return info
    return None


def destroy(src: tuple[str, int], dst: tuple[str, int]) -> bool:
    """Abort the TCP socket with local address ``src`` and remote address ``dst``.

    The kernel closes it at once (``tcp_abort``): the owning application's pending and next
    calls fail with ``ECONNABORTED``, and the kernel sends a RST to the peer if the state
    needs one (established, close-wait, ...). ``False`` if no such socket exists. The socket
    is first looked up and then destroyed by its cookie, so a listener on ``src`` is never hit.
    ``SockDiagError`` (EPERM without CAP_NET_ADMIN, EOPNOTSUPP without
    CONFIG_INET_DIAG_DESTROY) otherwise.
    """
    info = lookup(src, dst)
    return info is not None and _destroy_found(info)


HALF_OPEN_STATES: Final = frozenset({"SYN_RECV", "NEW_SYN_RECV"})


def clear_half_open(src: tuple[str, int], dst: tuple[str, int]) -> bool:
    """Drop the half-open request socket (a SYN answered, no ACK yet) that holds the 4-tuple
    ``src``/``dst``, and nothing else: ``True`` if one was dropped.

    A SYN spoofed with a migrating connection's 4-tuple leaves such an entry on the new server
    for the SYN-ACK retries (about a minute); it holds no byte of any application, yet the
    re-incarnation's ``connect`` cannot take the 4-tuple while it exists (EADDRNOTAVAIL).
    Sockets that hold a connection (an inode, or ``tcp_info``) are never touched.
    """
    info = lookup(src, dst)
    if info is None or info.state not in HALF_OPEN_STATES or info.inode or info.has_info:
        return False
    return _destroy_found(info)


def _destroy_found(info: TcpSocketInfo) -> bool:
    """SOCK_DESTROY the socket ``lookup`` found, by its cookie; ``False`` if it is gone."""
    src, dst = info.src, info.dst
    request = _request(info.family, TCPF_ALL, src=src, dst=dst, cookie=info.cookie)
    try:
        _exchange(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, request, f"SOCK_DESTROY {src}->{dst}")
    except SockDiagError as error:
        if error.errno == errno.ENOENT:
            return False  # gone in between
        raise
    return True
