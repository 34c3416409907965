"""Re-create the server end of a live TCP connection with Linux TCP_REPAIR.

Theory of operation. A TCP endpoint is, for its peer, nothing more than two sequence numbers
(the next byte it sends, the next byte it expects), the options agreed in the handshake (MSS,
window scales, SACK, timestamps), the windows, and the timestamp clock it stamps segments with.
``TcpRepairState`` holds exactly that, as plain data. It can come from the kernel
(``read_repair_state`` on the old server's socket) or from what the *client* knows
(``state_from_positions``: the ISNs and options it saw in the handshake plus the byte counts it
has received and had acknowledged), which is how a roam works when the old server is never
asked (ARCHITECTURE.md, "A roam, make-before-break").

``restore_socket`` builds a new socket in repair mode, where ``bind``/``connect`` send nothing
and the kernel lets us set what a handshake would have set, then leaves repair mode and hands
back an ordinary connected socket. ``silent_close`` closes a socket in repair mode, so the old
server sends neither FIN nor RST. The order of the steps in ``restore_socket`` is dictated by
the kernel (see docs/tcp_repair.md and the comments at each step); CRIU's ``soccr`` library is
the reference implementation of the same sequence.

Everything here is Linux-only and needs CAP_NET_ADMIN in the socket's network namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass

from migrate.errors import LocalError, RemoteError
from migrate.kernel import sockopts as so

_SEQ_MOD = 1 << 32
_U32_MAX = _SEQ_MOD - 1
# Largest slice handed to one send() when refilling a queue in repair mode. The kernel builds
# the receive-queue skb from the size passed in; one huge call can fail with ENOMEM where
# smaller ones succeed (soccr halves its chunk on failure for the same reason).
_QUEUE_CHUNK = 64 * 1024
_QUEUE_CHUNK_MIN = 1024


# --- errors -------------------------------------------------------------------------------


class TcpRepairError(LocalError, OSError):
    """A TCP_REPAIR step failed; ``str()`` names the step and the kernel's reason."""


class TcpRepairUnsupportedError(TcpRepairError):
    """TCP_REPAIR cannot be used here: no CAP_NET_ADMIN, or the kernel lacks a feature."""


class InvalidRepairStateError(RemoteError, ValueError):
    """A ``TcpRepairState`` field is out of range or inconsistent with another field."""


def _fail(exc: OSError, what: str, hint: str = "") -> TcpRepairError:
    """Turn the kernel's ``OSError`` for step ``what`` into a one-line typed error."""
    code = exc.errno if exc.errno is not None else errno.EIO
    if code == errno.EPERM and what == "TCP_REPAIR":
        return TcpRepairUnsupportedError(code, "TCP_REPAIR needs CAP_NET_ADMIN")
    if code == errno.ENOPROTOOPT:
        return TcpRepairUnsupportedError(code, f"{what} is not supported by this kernel")
    suffix = f" ({hint})" if hint else ""
    return TcpRepairError(code, f"{what} rejected: {os.strerror(code)}{suffix}")


# --- the state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpRepairState:
    """Everything needed to re-create the server end of one TCP connection.

    Sequence numbers are the server's, modulo 2**32. ``send_seq`` is the sequence number that
    follows the last byte the server has queued for sending (the kernel's ``write_seq``; with
    an empty send queue it is ``snd_una == snd_nxt``, i.e. the client's ``rcv_nxt``).
    ``recv_seq`` is the next byte the server expects (``rcv_nxt``). Queue bytes passed to
    ``restore_socket`` are the tails that *end* at these numbers.

    ``snd_wscale`` is the shift the server applies to windows the client advertises (the
    client's SYN option); ``rcv_wscale`` the shift the server applies to its own (its SYN-ACK
    option); both 0 when window scaling was not agreed. ``mss`` is the MSS the client announced
    (the kernel's ``mss_clamp``), not the smaller per-segment payload ``tcpi_snd_mss``.
    ``tsval`` is the server's timestamp clock (RFC 7323 TSval) at the time of the snapshot; it
    is set iff ``timestamps``. The window fields are those of ``struct tcp_repair_window``, in
    bytes (already scaled).
    """

    local: tuple[str, int]
    remote: tuple[str, int]
    send_seq: int
    recv_seq: int
    mss: int
    snd_wscale: int
    rcv_wscale: int
    sack: bool
    timestamps: bool
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    tsval: int | None = None

    def __post_init__(self) -> None:
        for name, (host, port) in (("local", self.local), ("remote", self.remote)):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise InvalidRepairStateError(f"{name} address {host!r} is not an IP") from None
            if not 0 < port < 65536:
                raise InvalidRepairStateError(f"{name} port {port} is out of range")
        if _family(self.local[0]) != _family(self.remote[0]):
            raise InvalidRepairStateError("local and remote addresses are of different families")
        for name in (
            "send_seq",
            "recv_seq",
            "snd_wl1",
            "snd_wnd",
            "max_window",
            "rcv_wnd",
            "rcv_wup",
        ):
            value = getattr(self, name)
            if not 0 <= value <= _U32_MAX:
                raise InvalidRepairStateError(f"{name} {value} is not a 32-bit unsigned value")
        # 88 is the kernel's TCP_MIN_MSS: TCP_MAXSEG refuses less.
        if not 88 <= self.mss <= 65535:
            raise InvalidRepairStateError(f"mss {self.mss} is out of range 88..65535")
        for name in ("snd_wscale", "rcv_wscale"):
            value = getattr(self, name)
            if not 0 <= value <= so.TCP_MAX_WSCALE:
                raise InvalidRepairStateError(f"{name} {value} is out of range 0..14")
        if self.max_window < self.snd_wnd:
            raise InvalidRepairStateError("max_window is smaller than snd_wnd")
        if self.timestamps != (self.tsval is not None):
            raise InvalidRepairStateError("tsval must be set exactly when timestamps are on")
        if self.tsval is not None and not 0 <= self.tsval <= _U32_MAX:
            raise InvalidRepairStateError(f"tsval {self.tsval} is not a 32-bit value")


def seq_add(seq: int, count: int) -> int:
    """``seq + count`` in 32-bit sequence space (RFC 9293 section 3.4)."""
    return (seq + count) % _SEQ_MOD


# A restored socket that does not know the client's receive window assumes two segments: the
# client ACKs two full segments at once (no delayed ACK), and that ACK brings its real window
# one round trip after the first send. A larger guess (65535 bytes before) sent past a client
# whose buffer was nearly full (its application reading slower than the network): those
# segments were dropped and came again only by retransmission, 200 ms to 1 s of pause after a
# roam (docs/benchmarks.md, "The restored socket's window").
RESTORED_WINDOW_SEGMENTS = 2


def state_from_positions(
    *,
    local: tuple[str, int],
    remote: tuple[str, int],
    server_isn: int,
    client_isn: int,
    bytes_to_client: int,
    bytes_from_client: int,
    mss: int,
    snd_wscale: int = 0,
    rcv_wscale: int = 0,
    sack: bool = False,
    tsval: int | None = None,
    snd_wnd: int | None = None,
    rcv_wnd: int = 65535,
) -> TcpRepairState:
    """Build the server's state from what the client knows, not from the kernel.

    ``local`` is the server's address, ``remote`` the client's. The ISNs are those of the
    handshake (the server's from its SYN-ACK, the client's from its SYN). ``bytes_to_client``
    counts the server's bytes the client has received in order (so the server's next send is
    the client's ``rcv_nxt``); ``bytes_from_client`` the client's bytes the server has
    acknowledged (the server's ``rcv_nxt`` is the client's ``snd_una``; whatever the client
    sent after that it retransmits by itself). On Linux the client reads both counts from
    ``tcpi_bytes_received`` and ``tcpi_bytes_acked``.

    ``mss`` is the MSS the client announced in its SYN; ``snd_wscale`` the client's window
    scale option, ``rcv_wscale`` the server's; ``sack`` whether both sent SACK-permitted;
    ``tsval`` the timestamp clock the new server should continue from (a value at or above the
    last TSval the client received, or the client drops the segments under PAWS, RFC 7323
    section 5), ``None`` if timestamps were not agreed. ``snd_wnd`` is the client's receive
    window in bytes (the most the server may send unacknowledged; unknown, ``None``:
    ``RESTORED_WINDOW_SEGMENTS`` segments) and ``rcv_wnd`` the window the server last
    advertised, in bytes; both are corrected by the first segment the client sends after the
    roam.
    """
    if snd_wnd is None:
        snd_wnd = RESTORED_WINDOW_SEGMENTS * mss
    for name, value in (("server_isn", server_isn), ("client_isn", client_isn)):
        if not 0 <= value <= _U32_MAX:
            raise InvalidRepairStateError(f"{name} {value} is not a 32-bit unsigned value")
    for name, value in (
        ("bytes_to_client", bytes_to_client),
        ("bytes_from_client", bytes_from_client),
    ):
        if value < 0:
            raise InvalidRepairStateError(f"{name} {value} is negative")
    send_seq = seq_add(server_isn, 1 + bytes_to_client)  # the SYN takes one sequence number
    recv_seq = seq_add(client_isn, 1 + bytes_from_client)
    return TcpRepairState(
        local=local,
        remote=remote,
        send_seq=send_seq,
        recv_seq=recv_seq,
        mss=mss,
        snd_wscale=snd_wscale,
        rcv_wscale=rcv_wscale,
        sack=sack,
        timestamps=tsval is not None,
        tsval=tsval,
        # snd_wl1 one before the client's next sequence number: any segment the client sends
        # then counts as newer (RFC 9293 3.10.7.4 SND.WL1 test) and replaces our guessed window.
        snd_wl1=seq_add(recv_seq, -1),
        snd_wnd=snd_wnd,
        max_window=snd_wnd,
        rcv_wnd=rcv_wnd,
        rcv_wup=recv_seq,
    )


@dataclass(frozen=True)
class RepairQueues:
    """Bytes in a socket's queues: ``send`` not yet acknowledged by the peer (sent or not),
    ``recv`` received and acknowledged but not yet read by the application."""

    send: bytes
    recv: bytes


@dataclass(frozen=True)
class TcpInfo:
    """The ``struct tcp_info`` fields the roaming code reads (names without ``tcpi_``).

    ``advmss`` is the MSS this end announced minus the timestamp option (12 bytes) when
    timestamps are on. ``snd_wnd`` (the peer's window) and ``rcv_wnd`` (our advertised
    window), in bytes, exist since Linux 6.2 and 6.12 (before: ``None``).
    """

    state: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    snd_mss: int
    rcv_mss: int
    advmss: int
    bytes_acked: int
    bytes_received: int
    snd_wnd: int | None
    rcv_wnd: int | None


# --- small socket helpers -------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _set(sock: socket.socket, level: int, option: int, value: bytes, what: str) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        raise _fail(exc, what) from exc


def _set_u32(sock: socket.socket, option: int, value: int, what: str) -> None:
    _set(sock, socket.SOL_TCP, option, so.U32.pack(value % _SEQ_MOD), what)


def _set_repair(sock: socket.socket, value: int) -> None:
    _set(sock, socket.SOL_TCP, so.TCP_REPAIR, so.S32.pack(value), "TCP_REPAIR")


def _get_u32(sock: socket.socket, option: int, what: str) -> int:
    try:
        raw = sock.getsockopt(socket.SOL_TCP, option, so.U32.size)
    except OSError as exc:
        raise _fail(exc, what) from exc
    value: int = so.U32.unpack(raw)[0]
    return value


def _select_queue(sock: socket.socket, queue: int) -> None:
    _set(sock, socket.SOL_TCP, so.TCP_REPAIR_QUEUE, so.S32.pack(queue), "TCP_REPAIR_QUEUE")


def _ioctl_int(sock: socket.socket, request: int, what: str) -> int:
    try:
        raw = fcntl.ioctl(sock.fileno(), request, so.S32.pack(0))
    except OSError as exc:
        raise _fail(exc, what) from exc
    value: int = so.S32.unpack(raw)[0]
    return value


@contextlib.contextmanager
def _nonblocking(sock: socket.socket) -> Iterator[None]:
    """Make calls go straight to the kernel. With a timeout set, Python polls for readiness
    before each call, and a repair-mode peek at the send queue is never "readable"."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        yield
    finally:
        sock.settimeout(timeout)


def _check_tcp(sock: socket.socket) -> None:
    if sock.fileno() < 0:
        raise TcpRepairError(errno.EBADF, "socket is closed")
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise TcpRepairError(errno.EPROTOTYPE, "TCP_REPAIR works only on TCP/IP sockets")


def read_tcp_info(sock: socket.socket) -> TcpInfo:
    """Read ``TCP_INFO`` (no privilege needed)."""
    _check_tcp(sock)
    try:
        raw = sock.getsockopt(socket.SOL_TCP, so.TCP_INFO, 512)
    except OSError as exc:
        raise _fail(exc, "TCP_INFO") from exc
    if len(raw) < so.TCPI_BYTES_RECEIVED_END:
        raise TcpRepairUnsupportedError(errno.ENOPROTOOPT, "TCP_INFO is too short (Linux < 4.2)")
    head = so.TCP_INFO_HEAD.unpack_from(raw)
    wscales = head[6]
    # snd_wscale:4 then rcv_wscale:4; GCC allocates bit-fields from the low bits on
    # little-endian targets and from the high bits on big-endian ones.
    if sys.byteorder == "little":
        snd_wscale, rcv_wscale = wscales & 0x0F, wscales >> 4
    else:
        snd_wscale, rcv_wscale = wscales >> 4, wscales & 0x0F

    def field(fmt: struct.Struct, offset: int) -> int | None:
        if len(raw) < offset + fmt.size:
            return None
        value: int = fmt.unpack_from(raw, offset)[0]
        return value

    return TcpInfo(
        state=head[0],
        options=head[5],
        snd_wscale=snd_wscale,
        rcv_wscale=rcv_wscale,
        snd_mss=head[10],
        rcv_mss=head[11],
        advmss=so.U32.unpack_from(raw, so.TCPI_ADVMSS)[0],
        bytes_acked=so.U64.unpack_from(raw, so.TCPI_BYTES_ACKED)[0],
        bytes_received=so.U64.unpack_from(raw, so.TCPI_BYTES_RECEIVED)[0],
        snd_wnd=field(so.U32, so.TCPI_SND_WND),
        rcv_wnd=field(so.U32, so.TCPI_RCV_WND),
    )


def _in_repair(sock: socket.socket) -> bool:
    try:
        return bool(so.S32.unpack(sock.getsockopt(socket.SOL_TCP, so.TCP_REPAIR, 4))[0])
    except OSError as exc:
        raise _fail(exc, "TCP_REPAIR") from exc


def _leave_repair_quietly(sock: socket.socket) -> None:
    """Leave repair mode without the window probe; kernels before 4.14 only know plain OFF."""
    try:
        sock.setsockopt(socket.SOL_TCP, so.TCP_REPAIR, so.S32.pack(so.TCP_REPAIR_OFF_NO_WP))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise _fail(exc, "TCP_REPAIR off") from exc
        _set_repair(sock, so.TCP_REPAIR_OFF)
    _allow_reuse(sock)


def _allow_reuse(sock: socket.socket) -> None:
    """Leaving repair mode clears the socket's address reuse (``sk_reuse = SK_NO_REUSE``).
    Without it, this connection lingering in FIN_WAIT after its process died (its peer
    unreachable) keeps a restarted server from binding its listening port: EADDRINUSE."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


# --- reading ------------------------------------------------------------------------------


def _get_repair_window(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """``TCP_REPAIR_WINDOW`` of a socket in repair mode: snd_wl1, snd_wnd, max_window,
    rcv_wnd, rcv_wup."""
    try:
        raw = sock.getsockopt(
            socket.SOL_TCP, so.TCP_REPAIR_WINDOW, so.TCP_REPAIR_WINDOW_STRUCT.size
        )
    except OSError as exc:
        raise _fail(exc, "TCP_REPAIR_WINDOW") from exc
    snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = so.TCP_REPAIR_WINDOW_STRUCT.unpack(raw)
    return snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup


def read_repair_state(sock: socket.socket, *, keep_repair: bool = False) -> TcpRepairState:
    """Read the state of an established TCP socket (the server end) through TCP_REPAIR.

    The socket is put in repair mode for the reads. With ``keep_repair`` it stays there, so
    nothing more is sent and ``read_queues``/``silent_close`` see the same state; otherwise it
    leaves repair mode without sending anything and carries on as before. Segments that
    arrive during the reads still change the state: block the connection's traffic first if
    the snapshot must be exact (CRIU does the same with its network lock).
    """
    _check_tcp(sock)
    info = read_tcp_info(sock)
    if info.state != so.TCP_ESTABLISHED:
        raise TcpRepairError(
            errno.ENOTCONN, f"only established sockets can be read (tcpi_state {info.state})"
        )
    local = sock.getsockname()
    remote = sock.getpeername()
    _set_repair(sock, so.TCP_REPAIR_ON)
    try:
        # In repair mode TCP_MAXSEG returns mss_clamp (the peer's announced MSS); outside it
        # returns mss_cache, which already has the timestamp option's 12 bytes taken off.
        mss = _get_u32(sock, so.TCP_MAXSEG, "TCP_MAXSEG")
        tsval = None
        if info.options & so.TCPI_OPT_TIMESTAMPS:
            tsval = _get_u32(sock, so.TCP_TIMESTAMP, "TCP_TIMESTAMP")
        snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = _get_repair_window(sock)
        _select_queue(sock, so.TCP_RECV_QUEUE)
        recv_seq = _get_u32(sock, so.TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (receive queue)")
        _select_queue(sock, so.TCP_SEND_QUEUE)
        send_seq = _get_u32(sock, so.TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (send queue)")
        _select_queue(sock, so.TCP_NO_QUEUE)
    except BaseException:
        if not keep_repair:
            with contextlib.suppress(OSError):
                _leave_repair_quietly(sock)
        raise
    if not keep_repair:
        _leave_repair_quietly(sock)
    wscale = bool(info.options & so.TCPI_OPT_WSCALE)
    return TcpRepairState(
        local=(local[0], local[1]),
        remote=(remote[0], remote[1]),
        send_seq=send_seq,
        recv_seq=recv_seq,
        mss=mss,
        snd_wscale=info.snd_wscale if wscale else 0,
        rcv_wscale=info.rcv_wscale if wscale else 0,
        sack=bool(info.options & so.TCPI_OPT_SACK),
        timestamps=tsval is not None,
        tsval=tsval,
        snd_wl1=snd_wl1,
        snd_wnd=snd_wnd,
        max_window=max_window,
        rcv_wnd=rcv_wnd,
        rcv_wup=rcv_wup,
    )


def _peek_queue(sock: socket.socket, queue: int, length: int, what: str) -> bytes:
    if length == 0:
        return b""
    _select_queue(sock, queue)
    try:
        # Ask for one byte more than the ioctl said, to notice a queue that grew meanwhile.
        with _nonblocking(sock):
            data = sock.recv(length + 1, socket.MSG_PEEK)
    except OSError as exc:
        raise _fail(exc, f"peeking the {what} queue") from exc
    finally:
        _select_queue(sock, so.TCP_NO_QUEUE)
    if len(data) != length:
        raise TcpRepairError(
            errno.EAGAIN, f"{what} queue holds {len(data)} bytes, expected {length}"
        )
    return data


def read_queues(sock: socket.socket) -> RepairQueues:
    """Copy a socket's queues; the socket must be in repair mode (``keep_repair=True``).

    ``send`` ends at ``TcpRepairState.send_seq`` and ``recv`` at ``recv_seq``; pass them to
    ``restore_socket`` to carry data in flight across the move.
    """
    _check_tcp(sock)
    if not _in_repair(sock):
        raise TcpRepairError(errno.EINVAL, "read_queues needs a socket in repair mode")
    send_len = _ioctl_int(sock, termios.TIOCOUTQ, "SIOCOUTQ")
    recv_len = _ioctl_int(sock, termios.FIONREAD, "SIOCINQ")
    return RepairQueues(
        send=_peek_queue(sock, so.TCP_SEND_QUEUE, send_len, "send"),
        recv=_peek_queue(sock, so.TCP_RECV_QUEUE, recv_len, "receive"),
    )


SNAPSHOT_ATTEMPTS = 8


def read_snapshot(
    sock: socket.socket, attempts: int = SNAPSHOT_ATTEMPTS
) -> tuple[TcpRepairState, RepairQueues]:
    """The state and the queues of a socket, consistent with each other; the socket is left
    in repair mode (``leave_repair`` after).

    Segments keep arriving in repair mode: one that lands between the read of the receive
    sequence and the read of the receive queue would make the queue look longer than the
    sequence says (and a sequence number derived from both, such as the peer's ISN, wrong by
    that segment). So the receive sequence is read again after the queues, and everything is
    read again until it stood still."""
    for _ in range(attempts):
        state = read_repair_state(sock, keep_repair=True)
        try:
            queues = read_queues(sock)
        except TcpRepairError as error:
            if error.errno != errno.EAGAIN:
                raise
            continue  # the queue grew while it was copied
        _select_queue(sock, so.TCP_RECV_QUEUE)
        try:
            recv_seq = _get_u32(sock, so.TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (receive queue)")
        finally:
            _select_queue(sock, so.TCP_NO_QUEUE)
        if recv_seq == state.recv_seq:
            return state, queues
    raise TcpRepairError(
        errno.EAGAIN, f"the receive queue kept changing over {attempts} consistent-read attempts"
    )


# --- closing ------------------------------------------------------------------------------


def silent_close(sock: socket.socket) -> None:
    """Close ``sock`` without telling the peer: in repair mode the kernel sends no FIN and no
    RST and drops the queues. The peer's next segment to this host meets no socket and is
    answered with a RST unless something (the firewall, a link down) drops it first. Raises
    ``TcpRepairError`` and leaves the socket open if repair mode is refused."""
    _check_tcp(sock)
    # If repair mode is refused the socket stays open: a plain close() would send a FIN and
    # end the connection the caller is trying to move.
    _set_repair(sock, so.TCP_REPAIR_ON)
    sock.close()


# --- restoring ----------------------------------------------------------------------------


def _refill_queue(sock: socket.socket, queue: int, data: bytes, what: str) -> None:
    """Put ``data`` into a queue in repair mode: the receive queue as if it had arrived from
    the peer, the send queue as if it had been sent (it is retransmitted on timeout)."""
    if not data:
        return
    _select_queue(sock, queue)
    view = memoryview(data)
    chunk = _QUEUE_CHUNK
    while view:
        try:
            sent = sock.send(view[:chunk], socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN) and chunk > _QUEUE_CHUNK_MIN:
                chunk //= 2
                continue
            raise _fail(exc, f"restoring {len(view)} bytes of the {what} queue") from exc
        view = view[sent:]
    _select_queue(sock, so.TCP_NO_QUEUE)


def _repair_options(state: TcpRepairState) -> bytes:
    options = [(so.TCPOPT_MSS, state.mss)]
    if state.snd_wscale or state.rcv_wscale:
        options.append((so.TCPOPT_WINDOW, state.snd_wscale | (state.rcv_wscale << 16)))
    if state.sack:
        options.append((so.TCPOPT_SACK_PERM, 0))
    if state.timestamps:
        options.append((so.TCPOPT_TIMESTAMP, 0))
    return b"".join(so.TCP_REPAIR_OPT.pack(code, value) for code, value in options)


def restore_socket(
    state: TcpRepairState,
    *,
    send_queue: bytes = b"",
    recv_queue: bytes = b"",
    transparent: bool = False,
    window_probe: bool = False,
) -> socket.socket:
    """Create a connected socket that continues the connection described by ``state``.

    Nothing is sent on the wire unless ``window_probe``: the kernel's probe on leaving repair
    mode makes the client answer at once, but if it reaches the client before the client
    routes this connection to us, the client answers with a RST (ARCHITECTURE.md, step 3).
    ``transparent`` sets IP_TRANSPARENT so ``state.local`` need not be an address of this
    host. ``send_queue``/``recv_queue`` are the queue tails ending at ``send_seq``/``recv_seq``
    (see ``read_queues``); the send queue goes back as sent-but-unacknowledged data and reaches
    the client by retransmission. The 4-tuple must be free in this network namespace.
    """
    family = _family(state.local[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR first: TCP_REPAIR on sets sk_reuse to SK_FORCE_REUSE (bind ignores
        # listeners and other users of the port), and a later SO_REUSEADDR would overwrite it.
        _set(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR, so.S32.pack(1), "SO_REUSEADDR")
        if transparent:
            if family == socket.AF_INET6:
                level, option, name = socket.IPPROTO_IPV6, so.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"
            else:
                level, option, name = socket.IPPROTO_IP, so.IP_TRANSPARENT, "IP_TRANSPARENT"
            _set(sock, level, option, so.S32.pack(1), name)
        _set_repair(sock, so.TCP_REPAIR_ON)
        try:
            sock.bind(state.local)
        except OSError as exc:
            hint = (
                "not an address of this host; pass transparent=True"
                if (exc.errno == errno.EADDRNOTAVAIL and not transparent)
                else ""
            )
            raise _fail(exc, f"bind to {state.local[0]}:{state.local[1]}", hint) from exc
        # Queue sequence numbers can only be set while the socket is closed (EPERM after
        # connect). The queues are refilled after connect and move the numbers forward by their
        # length, so start each one at the beginning of its tail.
        _select_queue(sock, so.TCP_RECV_QUEUE)
        _set_u32(
            sock,
            so.TCP_QUEUE_SEQ,
            seq_add(state.recv_seq, -len(recv_queue)),
            "TCP_QUEUE_SEQ (receive queue)",
        )
        _select_queue(sock, so.TCP_SEND_QUEUE)
        _set_u32(
            sock,
            so.TCP_QUEUE_SEQ,
            seq_add(state.send_seq, -len(send_queue)),
            "TCP_QUEUE_SEQ (send queue)",
        )
        _select_queue(sock, so.TCP_NO_QUEUE)
        # connect() derives the segment size (mss_cache) from the path MTU and mss_clamp, and
        # TCP_REPAIR_OPTIONS later changes mss_clamp without recomputing it: the socket then
        # sends 524-byte segments (the 536 default less timestamps), seen with ss -i. Setting
        # TCP_MAXSEG (user_mss) first makes connect() use the restored MSS.
        _set_u32(sock, so.TCP_MAXSEG, state.mss, "TCP_MAXSEG")
        # In repair mode connect() sends no SYN: the socket goes straight to ESTABLISHED with
        # snd_una = snd_nxt = the send sequence and rcv_nxt = the receive sequence.
        try:
            sock.connect(state.remote)
        except OSError as exc:
            hint = (
                "a socket with this 4-tuple still exists here"
                if (exc.errno == errno.EADDRNOTAVAIL)
                else ""
            )
            raise _fail(exc, f"connect to {state.remote[0]}:{state.remote[1]}", hint) from exc
        # Options are accepted only once connected (EPERM before) and while the socket has
        # never transmitted (tp->bytes_sent == 0, EPERM after); soccr sets them before the
        # queues and so do we. A window set before connect would be wiped by connect.
        _set(
            sock,
            socket.SOL_TCP,
            so.TCP_REPAIR_OPTIONS,
            _repair_options(state),
            "TCP_REPAIR_OPTIONS",
        )
        if state.tsval is not None:
            # The kernel stores tsoffset = tsval - its own clock, so TSval continues from here.
            # Since Linux 6.7 the value's low bit switches the socket to microsecond
            # timestamps: an odd value would make TSval run 1000 times too fast (and the next
            # incarnation, in milliseconds again, fall behind the client's TS.Recent, which
            # PAWS punishes by dropping every segment). Round up to an even value.
            _set_u32(sock, so.TCP_TIMESTAMP, ms_timestamp(state.tsval), "TCP_TIMESTAMP")
        _refill_queue(sock, so.TCP_RECV_QUEUE, recv_queue, "receive")
        _refill_queue(sock, so.TCP_SEND_QUEUE, send_queue, "send")
        # The window last: the kernel checks rcv_wup and snd_wl1 against the final rcv_nxt.
        _set(
            sock,
            socket.SOL_TCP,
            so.TCP_REPAIR_WINDOW,
            so.TCP_REPAIR_WINDOW_STRUCT.pack(
                state.snd_wl1, state.snd_wnd, state.max_window, state.rcv_wnd, state.rcv_wup
            ),
            "TCP_REPAIR_WINDOW",
        )
        if window_probe:
            _set_repair(sock, so.TCP_REPAIR_OFF)
            _allow_reuse(sock)
        else:
            _leave_repair_quietly(sock)
    except BaseException:
        # Still in repair mode if anything failed: close() then sends nothing either.
        sock.close()
        raise
    return sock


# --- probe ----------------------------------------------------------------------------------


def supported() -> str | None:
    """``None`` if TCP_REPAIR (with the window and queue options) works here, else why not."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot create a TCP socket: {os.strerror(exc.errno or errno.EIO)}"
    with sock:
        try:
            _set_repair(sock, so.TCP_REPAIR_ON)
            _select_queue(sock, so.TCP_SEND_QUEUE)
            _set_u32(sock, so.TCP_QUEUE_SEQ, 1, "TCP_QUEUE_SEQ")
            try:
                sock.getsockopt(
                    socket.SOL_TCP, so.TCP_REPAIR_WINDOW, so.TCP_REPAIR_WINDOW_STRUCT.size
                )
            except OSError as exc:
                raise _fail(exc, "TCP_REPAIR_WINDOW") from exc
            _leave_repair_quietly(sock)
        except TcpRepairError as exc:
            return exc.strerror
    return None


def take_peer_window(sock: socket.socket, window: int, *, assumed: int) -> int:
    """Tell a restored socket, before it sends, that the peer's receive window is smaller than
    the ``assumed`` one it was restored with: ``window`` bytes, as the peer's kernel reported
    it after its switch. Returns the socket's window after it.

    Only ever lowered, never raised: the peer's report is its last advertised window, which
    overstates the room left when data came after its last ACK (a delayed ACK), and segments
    sent past the real window are dropped and sent again only by a loss probe, whose answers
    the peer rate-limits (500 ms). A window of 0 sends nothing until the peer's own window
    update, which, sent after the switch, reaches this socket. If the socket's window is no
    longer ``assumed``, an ACK of the peer's came since the switch, as fresh, and nothing
    changes."""
    if window >= assumed:
        return assumed  # the restored guess is no more than the peer said
    _set_repair(sock, so.TCP_REPAIR_ON)
    try:
        snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = _get_repair_window(sock)
        if snd_wnd != assumed:
            return int(snd_wnd)
        _set(
            sock,
            socket.SOL_TCP,
            so.TCP_REPAIR_WINDOW,
            so.TCP_REPAIR_WINDOW_STRUCT.pack(snd_wl1, window, max_window, rcv_wnd, rcv_wup),
            "TCP_REPAIR_WINDOW",
        )
    finally:
        _leave_repair_quietly(sock)
    return window


def leave_repair(sock: socket.socket) -> None:
    """Take ``sock`` out of repair mode without sending anything (no window probe)."""
    _leave_repair_quietly(sock)


def enter_repair(sock: socket.socket) -> None:
    """Put ``sock`` in repair mode: from now on closing it sends neither FIN nor RST."""
    _set_repair(sock, so.TCP_REPAIR_ON)


def ms_timestamp(tsval: int) -> int:
    """``tsval`` rounded up to an even value (mod 2^32): a millisecond TCP_TIMESTAMP setting,
    whose low bit the kernel does not take as the microsecond-timestamps switch."""
    return (tsval + (tsval & 1)) % 2**32


def read_timestamp(sock: socket.socket) -> int:
    """The socket's current TCP timestamp clock (``TCP_TIMESTAMP``; no repair mode needed)."""
    return _get_u32(sock, so.TCP_TIMESTAMP, "TCP_TIMESTAMP")
