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
import socket
import struct
from dataclasses import dataclass
from typing import Final

from migrate.errors import LocalError
from migrate.kernel.nfnetlink import (
    NFGENMSG,
    NLM_F_ACK,
    ack_code,
    attr,
    attributes,
    drain,
    messages,
    open_socket,
    request,
    wait_ack,
)

# --- constants (linux/netlink.h, linux/netfilter/nfnetlink.h, nfnetlink_log.h) -------------

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


def _be32(value: memoryview | None) -> int | None:
    if value is None or len(value) < 4:
        return None
    result: int = _BE32.unpack_from(value)[0]
    return result


def parse_packet_message(group: int, family: int, body: memoryview) -> NflogPacket:
    """An ``NflogPacket`` from the attributes of one ``NFULNL_MSG_PACKET`` (after nfgenmsg)."""
    attrs = attributes(body)
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


def packet_payload(body: memoryview) -> tuple[int | None, bytes]:
    """``parse_packet_message``'s ``seq`` and ``payload`` alone, for a reader that needs only
    the packets' bytes (the client's capture, a copy of every segment the client sends):
    nothing else is built."""
    attrs = attributes(body)
    payload = attrs.get(NFULA_PAYLOAD)
    return _be32(attrs.get(NFULA_SEQ)), bytes(payload) if payload is not None else b""


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
        sock = open_socket(rcvbuf, NflogError)
        reader = cls(sock, group)
        try:
            if bind_pf:
                reader._config(
                    socket.AF_INET, 0, [attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_PF_UNBIND]))]
                )
                reader._config(
                    socket.AF_INET, 0, [attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_PF_BIND]))]
                )
            attrs = [
                attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
                attr(NFULA_CFG_MODE, _CFG_MODE.pack(copy_range, NFULNL_COPY_PACKET, 0)),
                attr(NFULA_CFG_QTHRESH, _BE32.pack(qthreshold)),
                attr(NFULA_CFG_FLAGS, _BE16.pack(NFULNL_CFG_F_SEQ)),
            ]
            if nlbufsiz is not None:
                attrs.append(attr(NFULA_CFG_NLBUFSIZ, _BE32.pack(nlbufsiz)))
            if flush_timeout_cs is not None:
                attrs.append(attr(NFULA_CFG_TIMEOUT, _BE32.pack(flush_timeout_cs)))
            reader._config(socket.AF_UNSPEC, group, attrs, binding=True)
        except BaseException:
            sock.close()
            reader._sock = None
            raise
        return reader

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
        message = request(
            NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, family, group, attrs, NLM_F_ACK, self._seq
        )
        try:
            sock.send(message)
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
        return wait_ack(
            self._live(),
            self._buffer,
            lambda data: self._parse_datagram(data, ack_seq=seq),
            self._overflow,
            NflogError,
            "nfnetlink_log",
        )

    def _overflow(self) -> None:
        self.overflowed += 1

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
        self.backlog = drain(
            sock,
            self._buffer,
            _MAX_DATAGRAMS_PER_READ,
            lambda data: self._parse_datagram(data, ack_seq=None, out=packets),
            self._overflow,
            NflogError,
            f"NFLOG group {self.group}",
        )
        return packets

    def read_payloads(self) -> list[bytes]:
        """``read``, each packet's bytes only (``packet_payload``): counted as ``read`` counts
        them (``received``, ``missed``, ``overflowed``, ``backlog``)."""
        sock = self._live()
        pending, self._pending = self._pending, []
        payloads = [packet.payload for packet in pending]  # counted when parsed
        self.backlog = drain(
            sock,
            self._buffer,
            _MAX_DATAGRAMS_PER_READ,
            lambda data: self._payloads_of(data, payloads),
            self._overflow,
            NflogError,
            f"NFLOG group {self.group}",
        )
        return payloads

    def _payloads_of(self, data: memoryview, out: list[bytes]) -> None:
        packet_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
        for kind, _seq, body in messages(data):
            if kind == packet_type and len(body) >= NFGENMSG.size:
                seq, payload = packet_payload(body[NFGENMSG.size :])
                self._count_seq(seq)
                out.append(payload)

    def _parse_datagram(
        self, data: memoryview, *, ack_seq: int | None, out: list[NflogPacket] | None = None
    ) -> int | None:
        """Parse one datagram: packets go to ``out`` (or the pending list); returns the error
        code of the acknowledgment of ``ack_seq`` if the datagram holds it."""
        sink = self._pending if out is None else out
        result: int | None = None
        packet_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
        for kind, seq, body in messages(data):
            if kind == packet_type and len(body) >= NFGENMSG.size:
                family, _version, group = NFGENMSG.unpack_from(body)
                packet = parse_packet_message(group, family, body[NFGENMSG.size :])
                self._count(packet)
                sink.append(packet)
            else:
                # NLMSG_DONE ends a batch of several packets; NOOP and others carry nothing
                code = ack_code(kind, seq, body, ack_seq)
                result = code if code is not None else result
        return result

    def _count(self, packet: NflogPacket) -> None:
        self._count_seq(packet.seq)

    def _count_seq(self, seq: int | None) -> None:
        self.received += 1
        if seq is None:
            return
        expected = self._next_packet_seq
        if expected is not None and seq != expected:
            self.missed += (seq - expected) % (1 << 32)
        self._next_packet_seq = (seq + 1) % (1 << 32)

    # --- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Unbind the group and close the socket (idempotent)."""
        if self._sock is None:
            return
        try:
            unbind = attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND]))
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
