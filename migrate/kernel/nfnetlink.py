"""The netlink plumbing shared by the NFLOG reader and the NFQUEUE holder (nfnetlink).

Both speak ``NETLINK_NETFILTER`` with ``struct``: a message is an ``nlmsghdr``, an ``nfgenmsg``
(family, version 0, a big-endian resource id: the group or the queue) and attributes. This
module has the framing, a non-blocking socket with a large receive buffer that reports overflows
(``ENOBUFS``), reading every datagram queued, and waiting for the acknowledgment of a request.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

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
ACK_TIMEOUT_S: Final = 5.0

NLMSGHDR: Final = struct.Struct("=IHHII")
NLATTR: Final = struct.Struct("=HH")
NFGENMSG: Final = struct.Struct("!BBH")
NLMSGERR: Final = struct.Struct("=i")

Fail = Callable[[int, str], Exception]  # the caller's error type: (errno, one line)


def attr(kind: int, data: bytes) -> bytes:
    length = NLATTR.size + len(data)
    return NLATTR.pack(length, kind) + data + b"\x00" * (-length % 4)


def attributes(data: memoryview) -> dict[int, memoryview]:
    """The attributes in ``data`` by type (the last of a repeated type wins)."""
    found: dict[int, memoryview] = {}
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            break
        found[kind & NLA_TYPE_MASK] = data[offset + NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def messages(data: memoryview) -> list[tuple[int, int, memoryview]]:
    """The (type, sequence number, body) of each message in one datagram."""
    found = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        found.append((kind, seq, data[offset + NLMSGHDR.size : offset + length]))
        offset += (length + 3) & ~3
    return found


def ack_code(kind: int, seq: int, body: memoryview, ack_seq: int | None) -> int | None:
    """The error code (0: success) if this message acknowledges request ``ack_seq``."""
    acknowledges = kind == NLMSG_ERROR and ack_seq is not None and seq == ack_seq
    if acknowledges and len(body) >= NLMSGERR.size:
        return int(-NLMSGERR.unpack_from(body)[0])
    return None


def request(
    subsystem: int,
    message_type: int,
    family: int,
    res_id: int,
    attrs: list[bytes],
    flags: int,
    seq: int,
) -> bytes:
    body = NFGENMSG.pack(family, NFNETLINK_V0, res_id) + b"".join(attrs)
    header = NLMSGHDR.pack(
        NLMSGHDR.size + len(body), (subsystem << 8) | message_type, NLM_F_REQUEST | flags, seq, 0
    )
    return header + body


def open_socket(rcvbuf: int, fail: Fail) -> socket.socket:
    """A non-blocking netfilter netlink socket of the calling thread's network namespace, with
    a receive buffer of ``rcvbuf`` (forced past ``rmem_max`` where CAP_NET_ADMIN allows) that
    reports its overflows."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as error:
        code = error.errno or errno.EIO
        raise fail(code, f"cannot open a netfilter netlink socket: {os.strerror(code)}") from error
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # ENOBUFS must be reported: it is how the caller learns that messages were lost.
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 0)
        sock.bind((0, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def drain(
    sock: socket.socket,
    buffer: bytearray,
    limit: int,
    on_datagram: Callable[[memoryview], object],
    on_overflow: Callable[[], None],
    fail: Fail,
    what: str,
) -> bool:
    """Hand every datagram queued now (at most ``limit``) to ``on_datagram`` without
    blocking; an ``ENOBUFS`` calls ``on_overflow`` and reading goes on. True if it stopped at
    the limit (more are queued)."""
    view = memoryview(buffer)
    for _ in range(limit):
        try:
            size = sock.recv_into(buffer)
        except BlockingIOError:
            return False
        except InterruptedError:
            continue
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                on_overflow()
                continue
            code = error.errno or errno.EIO
            raise fail(code, f"{what}: receive failed: {os.strerror(code)}") from error
        on_datagram(view[:size])
    return True


def wait_ack(
    sock: socket.socket,
    buffer: bytearray,
    on_datagram: Callable[[memoryview], int | None],
    on_overflow: Callable[[], None],
    fail: Fail,
    what: str,
) -> int:
    """Read datagrams (each to ``on_datagram``, which keeps what else they hold) until one
    holds the awaited acknowledgment; its error code (0: success)."""
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            continue
        try:
            size = sock.recv_into(buffer)
        except BlockingIOError:
            continue
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                on_overflow()
                continue
            raise
        code = on_datagram(memoryview(buffer)[:size])
        if code is not None:
            return code
    raise fail(errno.ETIMEDOUT, f"no acknowledgment from {what}")
