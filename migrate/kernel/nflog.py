"""Read packets that nftables ``log group G`` rules copy to userspace (nfnetlink_log).

Theory of operation. This kernel has no nft ``queue`` expression (CONFIG_NFT_QUEUE is not
set), so the client shim cannot hold packets in NFQUEUE. It uses NFLOG instead: a rule such as
``tcp option @253,16,16 0x5352 log group 7 snaplen 65535 drop`` copies the packet to the
netlink socket bound to group 7 of the rule's network namespace, and the rule's verdict
(``drop`` here, or none: the packet goes on) applies at once. Nothing waits for userspace; if
the reader is slow, its socket buffer overflows and the kernel drops copies, which the reader
sees as ``ENOBUFS`` (counted in ``overflowed``) and as gaps in the per-group sequence numbers
(counted in ``missed``).

The protocol is plain netlink (``NETLINK_NETFILTER``, subsystem ``NFNL_SUBSYS_ULOG``), spoken
here with ``struct`` and no dependency:

* configuration: one ``NFULNL_MSG_CONFIG`` message per change, ``nfgenmsg.res_id`` = group
  (big-endian), attributes ``NFULA_CFG_CMD`` (bind/unbind), ``NFULA_CFG_MODE`` (copy mode and
  range), ``NFULA_CFG_QTHRESH``, ``NFULA_CFG_TIMEOUT``, ``NFULA_CFG_NLBUFSIZ`` (all be32) and
  ``NFULA_CFG_FLAGS`` (be16). The kernel applies the command first, then the rest, so binding
  and configuring is one atomic message.
* packets: ``NFULNL_MSG_PACKET`` messages, ``nfgenmsg.nfgen_family`` = the rule's family,
  attributes ``NFULA_PACKET_HDR`` (hw protocol, hook), ``NFULA_PREFIX`` (NUL-terminated),
  ``NFULA_IFINDEX_INDEV/OUTDEV``, ``NFULA_MARK``, ``NFULA_TIMESTAMP`` (prerouting, input and
  forward only), ``NFULA_UID/GID`` (local sockets), ``NFULA_SEQ`` and ``NFULA_PAYLOAD`` (the
  packet from its network header). All integers are big-endian.

Kernel facts that shape the defaults (net/netfilter/nfnetlink_log.c, verified on 6.18): a new
instance batches up to 100 packets or 1 s before sending them (``qthreshold`` 100,
``flushtimeout`` 100 cs) and an nft ``log`` rule does not lower that unless it has
``queue-threshold``; ``open`` therefore sets the threshold to 1 so every packet is sent at once.
The copy range is capped at 65531 bytes (0xFFFF minus the attribute header), so a larger
(GSO) packet arrives truncated. ``nft log group`` rules find the logger without
``NFULNL_CFG_CMD_PF_BIND``: that command only changes the namespace's default logger of a
family (used by rules that name no backend), which is why it is optional here.

The reader's socket belongs to the network namespace of the thread that opens it (use
``call_in_netns``). It is non-blocking, for ``loop.add_reader(reader.fileno(), ...)``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Final

from migrate.errors import LocalError

# --- constants (linux/netlink.h, linux/netfilter/nfnetlink.h, nfnetlink_log.h) -------------

NETLINK_NETFILTER: Final = 12
SOL_NETLINK: Final = 270
NETLINK_NO_ENOBUFS: Final = 5
SO_RCVBUFFORCE: Final = 33

NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02
NLM_F_ACK: Final = 0x04
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NLA_TYPE_MASK: Final = 0x3FFF

NFNETLINK_V0: Final = 0
NFNL_SUBSYS_ULOG: Final = 4
NFULNL_MSG_PACKET: Final = 0
NFULNL_MSG_CONFIG: Final = 1

# enum nfulnl_attr_type
NFULA_PACKET_HDR: Final = 1
NFULA_MARK: Final = 2
NFULA_TIMESTAMP: Final = 3
NFULA_IFINDEX_INDEV: Final = 4
NFULA_IFINDEX_OUTDEV: Final = 5
NFULA_IFINDEX_PHYSINDEV: Final = 6
NFULA_IFINDEX_PHYSOUTDEV: Final = 7
NFULA_HWADDR: Final = 8
NFULA_PAYLOAD: Final = 9
NFULA_PREFIX: Final = 10
NFULA_UID: Final = 11
NFULA_SEQ: Final = 12
NFULA_SEQ_GLOBAL: Final = 13
NFULA_GID: Final = 14

# enum nfulnl_msg_config_cmds
NFULNL_CFG_CMD_NONE: Final = 0
NFULNL_CFG_CMD_BIND: Final = 1
NFULNL_CFG_CMD_UNBIND: Final = 2
NFULNL_CFG_CMD_PF_BIND: Final = 3
NFULNL_CFG_CMD_PF_UNBIND: Final = 4

# enum nfulnl_attr_config
NFULA_CFG_CMD: Final = 1
NFULA_CFG_MODE: Final = 2
NFULA_CFG_NLBUFSIZ: Final = 3
NFULA_CFG_TIMEOUT: Final = 4
NFULA_CFG_QTHRESH: Final = 5
NFULA_CFG_FLAGS: Final = 6

NFULNL_COPY_NONE: Final = 0
NFULNL_COPY_META: Final = 1
NFULNL_COPY_PACKET: Final = 2
NFULNL_CFG_F_SEQ: Final = 0x0001
NFULNL_CFG_F_SEQ_GLOBAL: Final = 0x0002

COPY_RANGE_MAX: Final = 0xFFFF - 4  # NFULNL_COPY_RANGE_MAX: the payload attribute's 16-bit length
NLBUFSIZ_MAX: Final = 131072  # the kernel refuses more (ERANGE), and less than NLMSG_GOODSIZE

# Netfilter hooks (enum nf_inet_hooks).
NF_INET_PRE_ROUTING: Final = 0
NF_INET_LOCAL_IN: Final = 1
NF_INET_FORWARD: Final = 2
NF_INET_LOCAL_OUT: Final = 3
NF_INET_POST_ROUTING: Final = 4
HOOK_NAMES: Final = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}

DEFAULT_RCVBUF: Final = 4 * 1024 * 1024
# One netlink datagram holds at most one nlbufsiz batch (<= 128 KiB) or one packet message.
_RECV_BUFFER: Final = 256 * 1024
# read() returns after this many datagrams even if more are queued, so a flood cannot starve
# the event loop; the socket stays readable and the loop calls back.
_MAX_DATAGRAMS_PER_READ: Final = 1024
_ACK_TIMEOUT_S: Final = 5.0

_NLMSGHDR: Final = struct.Struct("=IHHII")
_NLATTR: Final = struct.Struct("=HH")
_NFGENMSG: Final = struct.Struct("!BBH")
_NLMSGERR: Final = struct.Struct("=i")
_BE16: Final = struct.Struct("!H")
_BE32: Final = struct.Struct("!I")
_PACKET_HDR: Final = struct.Struct("!HBB")
_TIMESTAMP: Final = struct.Struct("!QQ")
_CFG_MODE: Final = struct.Struct("!IBB")


class NflogError(LocalError, OSError):
    """An NFLOG socket could not be opened, bound or configured; ``str()`` says why."""


@dataclass(frozen=True)
class NflogPacket:
    """One packet copied by a ``log group`` rule.

    ``payload`` is the packet from its network header (an IPv4 packet in an ``ip`` table),
    truncated to the copy range or the rule's snaplen. ``timestamp`` (seconds since the epoch)
    exists for prerouting, input and forward only; ``indev``/``outdev`` are interface indexes;
    ``seq`` is the group's packet counter (the reader asks for it), ``uid``/``gid`` the owner of
    a local socket that sent the packet.
    """

    payload: bytes
    prefix: str
    hook: int
    family: int
    hw_protocol: int
    group: int
    timestamp: float | None = None
    indev: int | None = None
    outdev: int | None = None
    mark: int = 0
    seq: int | None = None
    uid: int | None = None
    gid: int | None = None

    @property
    def hook_name(self) -> str:
        return HOOK_NAMES.get(self.hook, str(self.hook))


# --- netlink encoding -----------------------------------------------------------------------


def _attr(kind: int, data: bytes) -> bytes:
    length = _NLATTR.size + len(data)
    return _NLATTR.pack(length, kind) + data + b"\x00" * (-length % 4)


def _attributes(data: memoryview) -> dict[int, memoryview]:
    """The attributes in ``data`` by type (the last of a repeated type wins)."""
    found: dict[int, memoryview] = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            break
        found[kind & NLA_TYPE_MASK] = data[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _be32(value: memoryview | None) -> int | None:
    if value is None or len(value) < 4:
        return None
    result: int = _BE32.unpack_from(value)[0]
    return result


def parse_packet_message(group: int, family: int, body: memoryview) -> NflogPacket:
    """An ``NflogPacket`` from the attributes of one ``NFULNL_MSG_PACKET`` (after nfgenmsg)."""
    attrs = _attributes(body)
    hw_protocol = hook = 0
    header = attrs.get(NFULA_PACKET_HDR)
    if header is not None and len(header) >= _PACKET_HDR.size:
        hw_protocol, hook, _pad = _PACKET_HDR.unpack_from(header)
    timestamp = None
    stamp = attrs.get(NFULA_TIMESTAMP)
    if stamp is not None and len(stamp) >= _TIMESTAMP.size:
        seconds, micros = _TIMESTAMP.unpack_from(stamp)
        timestamp = seconds + micros / 1e6
    prefix = b""
    raw_prefix = attrs.get(NFULA_PREFIX)
    if raw_prefix is not None:
        prefix = bytes(raw_prefix).split(b"\x00", 1)[0]
    payload = attrs.get(NFULA_PAYLOAD)
    return NflogPacket(
        payload=bytes(payload) if payload is not None else b"",
        prefix=prefix.decode("utf-8", "replace"),
        hook=hook,
        family=family,
        hw_protocol=hw_protocol,
        group=group,
        timestamp=timestamp,
        indev=_be32(attrs.get(NFULA_IFINDEX_INDEV)),
        outdev=_be32(attrs.get(NFULA_IFINDEX_OUTDEV)),
        mark=_be32(attrs.get(NFULA_MARK)) or 0,
        seq=_be32(attrs.get(NFULA_SEQ)),
        uid=_be32(attrs.get(NFULA_UID)),
        gid=_be32(attrs.get(NFULA_GID)),
    )


# --- the reader ---------------------------------------------------------------------------


class NflogReader:
    """A netlink socket bound to one NFLOG group of the current network namespace.

    ``NflogReader.open(group)`` binds and configures; ``read()`` returns the packets queued
    so far without blocking; ``close()`` unbinds (closing the socket alone also makes the
    kernel drop the group's instance). One group has one reader: a second bind of the same
    group in the same namespace fails with a clear ``NflogError``.
    """

    def __init__(self, sock: socket.socket, group: int) -> None:
        self._sock: socket.socket | None = sock
        self.group = group
        self.overflowed = 0
        """``ENOBUFS`` reports: the socket buffer overflowed and packets were lost."""
        self.missed = 0
        """Packets known lost from gaps in the group's sequence numbers."""
        self.received = 0
        self.backlog = False
        """The last ``read`` stopped at its datagram limit: more are queued."""
        self._seq = 0
        self._next_packet_seq: int | None = None
        self._pending: list[NflogPacket] = []
        self._buffer = bytearray(_RECV_BUFFER)

    @classmethod
    def open(
        cls,
        group: int,
        *,
        copy_range: int = 0xFFFF,
        nlbufsiz: int | None = None,
        rcvbuf: int = DEFAULT_RCVBUF,
        qthreshold: int = 1,
        flush_timeout_cs: int | None = None,
        bind_pf: bool = False,
    ) -> NflogReader:
        """Bind NFLOG ``group`` (0..65535) in the calling thread's network namespace.

        ``copy_range``: bytes of each packet to copy (capped by the kernel at 65531; 0 means
        the maximum). ``nlbufsiz``: the kernel's batch buffer (4096..131072). ``rcvbuf``: the
        socket receive buffer (forced past ``rmem_max`` when CAP_NET_ADMIN allows).
        ``qthreshold``: packets the kernel batches before sending (1: each at once);
        ``flush_timeout_cs``: the batch's time limit in 1/100 s. ``bind_pf``: also make
        nfnetlink_log the namespace's default logger for AF_INET (PF_UNBIND then PF_BIND, as
        libnetfilter_log's examples do); not needed for nft ``log group`` rules.
        """
        if not 0 <= group <= 0xFFFF:
            raise NflogError(errno.EINVAL, f"NFLOG group {group} is out of range 0..65535")
        if not 0 <= copy_range <= 0xFFFF:
            raise NflogError(errno.EINVAL, f"copy range {copy_range} is out of range 0..65535")
        if qthreshold < 1:
            raise NflogError(errno.EINVAL, f"queue threshold {qthreshold} is below 1")
        if nlbufsiz is not None and not 4096 <= nlbufsiz <= NLBUFSIZ_MAX:
            raise NflogError(errno.EINVAL, f"nlbufsiz {nlbufsiz} is out of range 4096..131072")
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as error:
            code = error.errno or errno.EIO
            raise NflogError(
                code, f"cannot open a netfilter netlink socket: {os.strerror(code)}"
            ) from error
        reader = cls(sock, group)
        try:
            reader._setup_socket(rcvbuf)
            if bind_pf:
                reader._config(
                    socket.AF_INET, 0, [_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_PF_UNBIND]))]
                )
                reader._config(
                    socket.AF_INET, 0, [_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_PF_BIND]))]
                )
            attrs = [
                _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
                _attr(NFULA_CFG_MODE, _CFG_MODE.pack(copy_range, NFULNL_COPY_PACKET, 0)),
                _attr(NFULA_CFG_QTHRESH, _BE32.pack(qthreshold)),
                _attr(NFULA_CFG_FLAGS, _BE16.pack(NFULNL_CFG_F_SEQ)),
            ]
            if nlbufsiz is not None:
                attrs.append(_attr(NFULA_CFG_NLBUFSIZ, _BE32.pack(nlbufsiz)))
            if flush_timeout_cs is not None:
                attrs.append(_attr(NFULA_CFG_TIMEOUT, _BE32.pack(flush_timeout_cs)))
            reader._config(socket.AF_UNSPEC, group, attrs, binding=True)
        except BaseException:
            sock.close()
            reader._sock = None
            raise
        return reader

    def _setup_socket(self, rcvbuf: int) -> None:
        sock = self._live()
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # ENOBUFS must be reported: it is how the caller learns that copies were lost.
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 0)
        sock.bind((0, 0))
        sock.setblocking(False)

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise NflogError(errno.EBADF, f"NFLOG reader of group {self.group} is closed")
        return self._sock

    # --- configuration ---------------------------------------------------------------------

    def _config(
        self, family: int, group: int, attrs: list[bytes], *, binding: bool = False
    ) -> None:
        """Send one NFULNL_MSG_CONFIG and wait for its acknowledgment."""
        sock = self._live()
        self._seq += 1
        body = _NFGENMSG.pack(family, NFNETLINK_V0, group) + b"".join(attrs)
        message_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), message_type, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0
        )
        try:
            sock.send(header + body)
        except OSError as error:
            code = error.errno or errno.EIO
            raise NflogError(
                code, f"NFLOG configuration of group {group} not sent: {os.strerror(code)}"
            ) from error
        code = self._wait_ack(self._seq)
        if code == 0:
            return
        if binding and code == errno.EPERM:
            reason = "it is bound by another socket in this namespace, or CAP_NET_ADMIN is missing"
        elif binding and code == errno.EBUSY:
            reason = "this socket has already bound it"
        else:
            reason = os.strerror(code)
        raise NflogError(code, f"cannot bind NFLOG group {group}: {reason}")

    def _wait_ack(self, seq: int) -> int:
        """The error code (0: success) of the acknowledgment of request ``seq``; packets
        arriving meanwhile are kept for the next ``read()``."""
        sock = self._live()
        deadline = time.monotonic() + _ACK_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NflogError(errno.ETIMEDOUT, "no acknowledgment from nfnetlink_log")
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                continue
            try:
                size = sock.recv_into(self._buffer)
            except BlockingIOError:
                continue
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    self.overflowed += 1
                    continue
                raise
            code = self._parse_datagram(memoryview(self._buffer)[:size], ack_seq=seq)
            if code is not None:
                return code

    # --- reading -------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._live().fileno()

    def read(self) -> list[NflogPacket]:
        """Every packet queued now (up to 1024 datagrams' worth), without blocking.

        An ``ENOBUFS`` from the socket (its buffer overflowed: packets were lost) increments
        ``overflowed`` and reading goes on. ``backlog`` tells whether more were left queued.
        """
        sock = self._live()
        packets, self._pending = self._pending, []
        view = memoryview(self._buffer)
        self.backlog = True
        for _ in range(_MAX_DATAGRAMS_PER_READ):
            try:
                size = sock.recv_into(self._buffer)
            except BlockingIOError:
                self.backlog = False
                break
            except InterruptedError:
                continue
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    self.overflowed += 1
                    continue
                code = error.errno or errno.EIO
                raise NflogError(
                    code, f"NFLOG group {self.group}: receive failed: {os.strerror(code)}"
                ) from error
            self._parse_datagram(view[:size], ack_seq=None, out=packets)
        return packets

    def _parse_datagram(
        self, data: memoryview, *, ack_seq: int | None, out: list[NflogPacket] | None = None
    ) -> int | None:
        """Parse one datagram: packets go to ``out`` (or the pending list); returns the error
        code of the acknowledgment of ``ack_seq`` if the datagram holds it."""
        sink = self._pending if out is None else out
        result: int | None = None
        offset = 0
        packet_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                break
            body = data[offset + _NLMSGHDR.size : offset + length]
            offset += (length + 3) & ~3
            if kind == packet_type and len(body) >= _NFGENMSG.size:
                family, _version, group = _NFGENMSG.unpack_from(body)
                packet = parse_packet_message(group, family, body[_NFGENMSG.size :])
                self._count(packet)
                sink.append(packet)
            elif (
                kind == NLMSG_ERROR
                and len(body) >= _NLMSGERR.size
                and ack_seq is not None
                and seq == ack_seq
            ):
                result = -_NLMSGERR.unpack_from(body)[0]
            # NLMSG_DONE ends a batch of several packets; NOOP and others carry nothing
        return result

    def _count(self, packet: NflogPacket) -> None:
        self.received += 1
        if packet.seq is None:
            return
        expected = self._next_packet_seq
        if expected is not None and packet.seq != expected:
            self.missed += (packet.seq - expected) % (1 << 32)
        self._next_packet_seq = (packet.seq + 1) % (1 << 32)

    # --- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Unbind the group and close the socket (idempotent)."""
        if self._sock is None:
            return
        try:
            unbind = _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND]))
            self._config(socket.AF_UNSPEC, self.group, [unbind])
        except (NflogError, OSError):
            pass  # closing the socket releases the group anyway (NETLINK_URELEASE)
        finally:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> NflogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
