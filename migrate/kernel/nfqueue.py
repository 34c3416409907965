"""Hold packets in an NFQUEUE and release or drop them later (nfnetlink_queue).

Theory of operation. The client shim freezes a connection's outgoing segments during a
hand-over. Dropping them with an nft rule is, to the client's TCP, a *local send failure*
(``ip_local_out`` returns an error): the segment stays unsent and TCP tries again only at its
probe timer, 200 ms or more later, which was every long pause of a flat-out download (a
request written during the freeze; docs/benchmarks.md). A segment handed to a queue is, to
TCP, sent. So the freeze marks the segments and an iptables-nft ``-j NFQUEUE`` rule (this
kernel has no nft ``queue`` expression; ``migrate.kernel.xtqueue``) queues them; after the
switch, the shim releases each one with an ``NF_ACCEPT`` verdict (it goes on through the
output hook, to the rewrite that now names the new server) or drops it (a connection that does
not follow).

Nothing here reads packets as they come: the kernel keeps them (up to ``maxlen``; past that it
drops them, which TCP sees as a loss) and their metadata waits in the socket's buffer until
``take()``. Each message carries the first ``COPY_BYTES`` of the packet, enough for its TCP
ports. The protocol (``NFNL_SUBSYS_QUEUE``, framed by ``migrate.kernel.nfnetlink``):
``NFQNL_MSG_CONFIG`` (bind, copy mode, queue length), ``NFQNL_MSG_PACKET`` (the packet id in
``NFQA_PACKET_HDR``, the bytes in ``NFQA_PAYLOAD``) and ``NFQNL_MSG_VERDICT`` (verdict and id,
and ``NFQA_MARK`` to give the packet its mark back). Closing the socket drops whatever is still
held.
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

NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2
NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_MARK: Final = 3
NFQA_PAYLOAD: Final = 10
NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQA_CFG_QUEUE_MAXLEN: Final = 3
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_PACKET: Final = 2
NF_DROP: Final = 0
NF_ACCEPT: Final = 1

COPY_BYTES: Final = 64  # an IPv4 header with options or an IPv6 header, and the TCP ports
DEFAULT_MAXLEN: Final = 8192
DEFAULT_RCVBUF: Final = 4 * 1024 * 1024
_MAX_DATAGRAMS_PER_TAKE: Final = 65536

_CFG_CMD: Final = struct.Struct("!BxH")
_CFG_PARAMS: Final = struct.Struct("!IB")
_BE32: Final = struct.Struct("!I")
_PACKET_HDR: Final = struct.Struct("!IHB")
_VERDICT: Final = struct.Struct("!II")
_PORT: Final = struct.Struct("!H")
_FIN: Final = 0x01
_SYN: Final = 0x02


class NfqueueError(LocalError, OSError):
    """The queue could not be bound or spoken to (one line naming the cause)."""


@dataclass(frozen=True)
class HeldPacket:
    id: int
    sport: int | None  # None: not a TCP segment this reader could parse
    # A pure ACK: no payload, no SYN or FIN (False when the copy does not say).
    pure_ack: bool = False


def held_packet(packet_id: int, packet: bytes | memoryview) -> HeldPacket:
    """What a held packet's first bytes say: its TCP source port, and whether it is a pure
    ACK (its IP length is its headers' length and it has neither SYN nor FIN)."""
    if len(packet) < 1:
        return HeldPacket(packet_id, None)
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        start, protocol = (packet[0] & 0x0F) * 4, packet[9]
        payload_end = _PORT.unpack_from(packet, 2)[0]  # the total length
    elif version == 6 and len(packet) >= 40:
        start, protocol = 40, packet[6]
        payload_end = 40 + _PORT.unpack_from(packet, 4)[0]  # header + payload length
    else:
        return HeldPacket(packet_id, None)
    if protocol != socket.IPPROTO_TCP or start < 20 or len(packet) < start + 2:
        return HeldPacket(packet_id, None)
    port: int = _PORT.unpack_from(packet, start)[0]
    if len(packet) < start + 14:
        return HeldPacket(packet_id, port)
    header = (packet[start + 12] >> 4) * 4
    flags = packet[start + 13]
    pure_ack = payload_end <= start + header and not flags & (_SYN | _FIN)
    return HeldPacket(packet_id, port, pure_ack)


def parse_messages(
    data: memoryview, ack_seq: int | None = None
) -> tuple[list[HeldPacket], int | None]:
    """The packets in one netlink datagram from nfnetlink_queue, and the error code of the
    acknowledgment of request ``ack_seq`` if the datagram holds it (0: success)."""
    packets: list[HeldPacket] = []
    result: int | None = None
    packet_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
    for kind, seq, body in messages(data):
        if kind == packet_type and len(body) >= NFGENMSG.size:
            attrs = attributes(body[NFGENMSG.size :])
            header = attrs.get(NFQA_PACKET_HDR)
            if header is not None and len(header) >= _PACKET_HDR.size:
                packet_id = _PACKET_HDR.unpack_from(header)[0]
                payload = attrs.get(NFQA_PAYLOAD)
                packets.append(held_packet(packet_id, payload or b""))
        else:
            code = ack_code(kind, seq, body, ack_seq)
            result = code if code is not None else result
    return packets, result


def queue_message(queue: int, message_type: int, attrs: list[bytes], flags: int, seq: int) -> bytes:
    """One nfnetlink_queue request to ``queue``."""
    return request(NFNL_SUBSYS_QUEUE, message_type, socket.AF_UNSPEC, queue, attrs, flags, seq)


def verdict_attrs(packet_id: int, accept: bool, mark: int) -> list[bytes]:
    """A verdict's attributes: NF_ACCEPT with ``mark`` as the packet's mark again, or NF_DROP."""
    attrs = [attr(NFQA_VERDICT_HDR, _VERDICT.pack(NF_ACCEPT if accept else NF_DROP, packet_id))]
    if accept:
        attrs.append(attr(NFQA_MARK, _BE32.pack(mark)))
    return attrs


class PacketHolder:
    """A netlink socket bound to one NFQUEUE of the current network namespace."""

    def __init__(self, sock: socket.socket, queue: int) -> None:
        self._sock: socket.socket | None = sock
        self.queue = queue
        self._seq = 0
        self._buffer = bytearray(256 * 1024)
        self._pending: list[HeldPacket] = []
        self.overflowed = 0  # ENOBUFS: messages lost (their packets stay held until close)

    @classmethod
    def open(
        cls, queue: int, *, maxlen: int = DEFAULT_MAXLEN, rcvbuf: int = DEFAULT_RCVBUF
    ) -> PacketHolder:
        """Bind NFQUEUE ``queue`` (0..65535) in the calling thread's network namespace."""
        if not 0 <= queue <= 0xFFFF:
            raise NfqueueError(errno.EINVAL, f"NFQUEUE number {queue} is out of range 0..65535")
        holder = cls(open_socket(rcvbuf, NfqueueError), queue)
        try:
            holder._config(
                [
                    attr(NFQA_CFG_CMD, _CFG_CMD.pack(NFQNL_CFG_CMD_BIND, 0)),
                    attr(NFQA_CFG_PARAMS, _CFG_PARAMS.pack(COPY_BYTES, NFQNL_COPY_PACKET)),
                    attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(maxlen)),
                ],
                "bind",
            )
        except BaseException:
            holder.close_socket()
            raise
        return holder

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise NfqueueError(errno.EBADF, f"NFQUEUE {self.queue} is closed")
        return self._sock

    def _config(self, attrs: list[bytes], what: str) -> None:
        seq, message = self._message(NFQNL_MSG_CONFIG, attrs, NLM_F_ACK)
        sock = self._live()
        try:
            sock.send(message)
        except OSError as error:
            code = error.errno or errno.EIO
            raise NfqueueError(code, f"NFQUEUE {self.queue}: {what} not sent") from error
        code = self._wait_ack(seq)
        if code != 0:
            reason = (
                "it is bound by another socket in this namespace, or CAP_NET_ADMIN is missing"
                if code == errno.EPERM
                else os.strerror(code)
            )
            raise NfqueueError(code, f"cannot {what} NFQUEUE {self.queue}: {reason}")

    def _message(self, message_type: int, attrs: list[bytes], flags: int) -> tuple[int, bytes]:
        self._seq += 1
        return self._seq, queue_message(self.queue, message_type, attrs, flags, self._seq)

    def _wait_ack(self, seq: int) -> int:
        def parse(data: memoryview) -> int | None:
            packets, code = parse_messages(data, seq)
            self._pending += packets
            return code

        return wait_ack(
            self._live(), self._buffer, parse, self._overflow, NfqueueError, "nfnetlink_queue"
        )

    def _overflow(self) -> None:
        self.overflowed += 1

    def take(self) -> list[HeldPacket]:
        """Every packet held now, oldest first, without blocking."""
        packets, self._pending = self._pending, []
        drain(
            self._live(),
            self._buffer,
            _MAX_DATAGRAMS_PER_TAKE,
            lambda data: packets.extend(parse_messages(data)[0]),
            self._overflow,
            NfqueueError,
            f"NFQUEUE {self.queue}",
        )
        return packets

    def verdicts(self, accept: list[int], drop: list[int], *, mark: int = 0) -> None:
        """Release the packets ``accept`` (with ``mark`` as their mark again) and drop the
        packets ``drop``: one datagram of verdicts (the kernel handles every message in it)."""
        messages = [
            self._message(NFQNL_MSG_VERDICT, verdict_attrs(packet_id, verdict, mark), 0)[1]
            for ids, verdict in ((accept, True), (drop, False))
            for packet_id in ids
        ]
        sock = self._live()
        for start in range(0, len(messages), 512):
            try:
                sock.send(b"".join(messages[start : start + 512]))
            except OSError as error:
                code = error.errno or errno.EIO
                raise NfqueueError(
                    code, f"NFQUEUE {self.queue}: verdicts not sent: {os.strerror(code)}"
                ) from error

    def fileno(self) -> int:
        return self._live().fileno()

    def close(self) -> None:
        """Unbind and close (idempotent): the kernel drops whatever is still held."""
        if self._sock is None:
            return
        try:
            self._config([attr(NFQA_CFG_CMD, _CFG_CMD.pack(NFQNL_CFG_CMD_UNBIND, 0))], "unbind")
        except (NfqueueError, OSError):
            pass  # closing the socket releases the queue anyway
        finally:
            self.close_socket()

    def close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
