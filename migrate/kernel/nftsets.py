"""Set and map element changes to one nft table, straight over netlink: one batch, one
transaction (all of it takes effect, or none), nothing parsed.

A hand-over's freeze and switch change only elements of the client's own table, and both sit
inside the pause the application sees. ``nft -f`` through libnftables parses the script and
reads the table's sets back into its cache first: 0.25 ms unloaded here, 0.5-0.75 ms with a
download on the host (docs/benchmarks.md). The same changes sent as one netlink batch are one
``sendmsg`` and the kernel's acknowledgments.

``script`` writes the same changes as nft text, for the program where netlink cannot be used
(another network namespace) and for people to read; the system test
``tests/system/test_kernel_nftsets.py`` checks that both leave a table alike.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from migrate.kernel import nfnetlink
from migrate.kernel.nfnetlink import NLM_F_ACK, NLMSGHDR, attr

NFNL_SUBSYS_NFTABLES: Final = 10
NFNL_MSG_BATCH_BEGIN: Final = 0x10
NFNL_MSG_BATCH_END: Final = 0x11
NFT_MSG_NEWSETELEM: Final = 12
NFT_MSG_DELSETELEM: Final = 14
NLM_F_CREATE: Final = 0x400
NLA_F_NESTED: Final = 0x8000
NFTA_SET_ELEM_LIST_TABLE: Final = 1
NFTA_SET_ELEM_LIST_SET: Final = 2
NFTA_SET_ELEM_LIST_ELEMENTS: Final = 3
NFTA_LIST_ELEM: Final = 1
NFTA_SET_ELEM_KEY: Final = 1
NFTA_SET_ELEM_DATA: Final = 2
NFTA_DATA_VALUE: Final = 1
NETLINK_CAP_ACK: Final = 10
NETLINK_EXT_ACK: Final = 11
NLM_F_ACK_TLVS: Final = 0x200
NLMSGERR_ATTR_MSG: Final = 1
FAMILIES: Final = {"ip": socket.AF_INET, "ip6": socket.AF_INET6, "inet": 1}
# Elements per message: a thousand frozen ports are four messages of one batch.
ELEMENTS_PER_MESSAGE: Final = 256
ACK_TIMEOUT_S: Final = 2.0
_ERROR: Final = struct.Struct("=i")


class NftSetError(Exception):
    """A batch the kernel refused (nothing of it applied), or netlink itself failing."""


@dataclass(frozen=True)
class Element:
    """One element as nft writes it (``text``) and as the kernel stores it: its key, and for
    a map its data, each a concatenation of 32-bit-aligned fields (``concat``)."""

    text: str
    key: bytes
    data: bytes | None = None


@dataclass(frozen=True)
class Flush:
    """Empty the set (``kind`` "set") or map ("map") ``name``."""

    kind: str
    name: str


@dataclass(frozen=True)
class Add:
    """Add ``elements`` to set or map ``name`` (those already in it stay, as with nft add)."""

    name: str
    elements: tuple[Element, ...]


Change = Flush | Add


def concat(*fields: bytes) -> bytes:
    """A key of several fields (nft's ``a . b``): each padded to 32 bits, as nft registers
    hold them (an ``ipv4_addr . inet_service`` key is 8 bytes)."""
    return b"".join(field + b"\x00" * (-len(field) % 4) for field in fields)


def service(port: int) -> bytes:
    """An ``inet_service`` as the kernel stores it: 16 bits, network order."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return port.to_bytes(2, "big")


def script(family: str, table: str, changes: Sequence[Change]) -> str:
    """The same changes as an nft script (one transaction under ``nft -f``)."""
    lines = []
    for change in changes:
        if isinstance(change, Flush):
            lines.append(f"flush {change.kind} {family} {table} {change.name}")
        elif change.elements:
            shown = ", ".join(element.text for element in change.elements)
            lines.append(f"add element {family} {table} {change.name} {{ {shown} }}")
    return "\n".join(lines) + "\n"


def _element(element: Element) -> bytes:
    parts = [attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(NFTA_DATA_VALUE, element.key))]
    if element.data is not None:
        parts.append(attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED, attr(NFTA_DATA_VALUE, element.data)))
    return attr(NFTA_LIST_ELEM | NLA_F_NESTED, b"".join(parts))


def batch(
    family: str, table: str, changes: Sequence[Change], first_seq: int
) -> tuple[bytes, list[str]]:
    """One netlink batch (begin, a message per change or per ``ELEMENTS_PER_MESSAGE``
    elements, end), every message but begin and end asking for an acknowledgment; and what
    each of those messages does (for errors), numbered from ``first_seq + 1``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown nft family {family!r}")
    protocol = FAMILIES[family]
    messages = []
    doing: list[str] = []
    seq = first_seq

    def message(kind: int, name: str, elements: Sequence[Element], flags: int) -> None:
        nonlocal seq
        seq += 1
        doing.append(f"adding to {name}" if elements else f"flushing {name}")
        attrs = [
            attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\x00"),
            attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\x00"),
        ]
        if elements:
            listed = b"".join(_element(element) for element in elements)
            attrs.append(attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, listed))
        messages.append(
            nfnetlink.request(
                NFNL_SUBSYS_NFTABLES, kind, protocol, 0, attrs, NLM_F_ACK | flags, seq
            )
        )

    for change in changes:
        if isinstance(change, Flush):
            # A deletion without elements empties the set: nft's own "flush set".
            message(NFT_MSG_DELSETELEM, change.name, (), 0)
            continue
        for start in range(0, len(change.elements), ELEMENTS_PER_MESSAGE):
            chunk = change.elements[start : start + ELEMENTS_PER_MESSAGE]
            message(NFT_MSG_NEWSETELEM, change.name, chunk, NLM_F_CREATE)
    # The batch's ends are nfnetlink's own messages; their resource id names nf_tables.
    begin = nfnetlink.request(0, NFNL_MSG_BATCH_BEGIN, 0, NFNL_SUBSYS_NFTABLES, [], 0, first_seq)
    end = nfnetlink.request(0, NFNL_MSG_BATCH_END, 0, NFNL_SUBSYS_NFTABLES, [], 0, seq + 1)
    return begin + b"".join(messages) + end, doing


def _error_text(code: int, body: memoryview) -> str:
    """The kernel's reason: its extended message when it gave one, else the errno's."""
    reason = os.strerror(code)
    offset = _ERROR.size + NLMSGHDR.size  # the error, then the request's header (capped)
    if len(body) > offset:
        message = nfnetlink.attributes(body[offset:]).get(NLMSGERR_ATTR_MSG)
        if message is not None:
            text = bytes(message).rstrip(b"\x00").decode(errors="replace")
            if text:
                reason += f" ({text})"
    return reason


def _netns() -> int:
    """The calling thread's network namespace (its inode)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


class ElementWriter:
    """One netfilter netlink socket of the caller's network namespace, kept open (a
    descriptor less to find inside a pause) and used under a lock. Opened again when the
    caller is in another namespace (a thread moved by ``call_in_netns``) or process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = -1
        self._ns = -1
        self._seq = int(time.monotonic_ns() % 2**30)
        self._buffer = bytearray(64 * 1024)

    def _socket(self) -> socket.socket:
        here = _netns()
        if self._sock is None or self._pid != os.getpid() or self._ns != here:
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close()
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nfnetlink.NETLINK_NETFILTER)
            try:
                # Acknowledgments without a copy of each request; the kernel's reasons with them.
                sock.setsockopt(nfnetlink.SOL_NETLINK, NETLINK_CAP_ACK, 1)
                sock.setsockopt(nfnetlink.SOL_NETLINK, NETLINK_EXT_ACK, 1)
                sock.bind((0, 0))
            except BaseException:
                sock.close()
                raise
            self._sock, self._pid, self._ns = sock, os.getpid(), here
        return self._sock

    @property
    def is_open(self) -> bool:
        return self._sock is not None and self._pid == os.getpid() and self._ns == _netns()

    def open(self) -> None:
        """Open the socket now (where descriptors are free: ``fdreserve``)."""
        with self._lock:
            try:
                self._socket()
            except OSError as error:
                code = error.errno or errno.EIO
                raise NftSetError(f"netlink: {os.strerror(code)}") from None

    def apply(self, family: str, table: str, changes: Sequence[Change]) -> None:
        with self._lock:
            data, doing = batch(family, table, changes, self._seq)
            first, self._seq = self._seq + 1, (self._seq + len(doing) + 2) % 2**31
            if not doing:
                return
            try:
                sock = self._socket()
                if len(data) > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * len(data))
                sock.send(data)
                self._await_acks(sock, first, doing)
            except OSError as error:
                self.close_locked()
                code = error.errno or errno.EIO
                raise NftSetError(f"netlink: {os.strerror(code)}") from None

    def _await_acks(self, sock: socket.socket, first: int, doing: list[str]) -> None:
        """Every message's acknowledgment, or the first refusal raised (the kernel then
        applied none of the batch; later answers to it are skipped by their numbers). The
        batch's own ends (numbered ``first - 1`` and ``first + count``) answer only to refuse."""
        count = len(doing)
        waiting = set(range(first, first + count))
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                raise OSError(errno.ETIMEDOUT, "no acknowledgment from nf_tables")
            size = sock.recv_into(self._buffer)
            for kind, seq, body in nfnetlink.messages(memoryview(self._buffer)[:size]):
                if kind != nfnetlink.NLMSG_ERROR or not first - 1 <= seq <= first + count:
                    continue
                waiting.discard(seq)
                code = -_ERROR.unpack_from(body)[0] if len(body) >= _ERROR.size else errno.EIO
                if code:
                    step = doing[seq - first] if first <= seq < first + count else "the batch"
                    raise NftSetError(f"{step}: {_error_text(code, body)}")

    def close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


WRITER: Final = ElementWriter()
