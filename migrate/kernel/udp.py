"""Datagram sockets for the shims' own messages (updates, control, re-incarnation).

A roam sends one message per live connection in a burst (hundreds at once). With the default
receive buffer (about 200 KiB, of which each datagram takes its full buffer size, not just its
bytes) a burst overflows and messages are silently lost, so these sockets ask for a large
buffer, past ``rmem_max`` when the process may (CAP_NET_ADMIN).

Their well-known ports are bound with ``bind_exclusive``: never shared, and checked to be ours.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys

from migrate.errors import LocalError

DEFAULT_RECEIVE_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def datagram_socket(
    family: socket.AddressFamily = socket.AF_INET, receive_buffer: int = DEFAULT_RECEIVE_BUFFER
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    return sock


class PortTakenError(LocalError):
    """A UDP port the shim must own is bound (or shared) by another socket."""


def _address(hex_text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/udp{,6} prints it: 32-bit words of network bytes in host order."""
    raw = b"".join(
        int(hex_text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_text), 8)
    )
    return ipaddress.ip_address(raw)


def _udp_sockets(port: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(local address, uid, inode) of every UDP socket on ``port`` in this network namespace."""
    found = []
    for name in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        try:
            with open(name, encoding="ascii") as table:
                next(table, None)  # header
                for line in table:
                    fields = line.split()
                    address, _, bound_port = fields[1].partition(":")
                    if int(bound_port, 16) == port:
                        found.append((_address(address), int(fields[7]), int(fields[9])))
        except FileNotFoundError:  # a kernel without IPv6
            continue
    return found


def _overlaps(
    ours: ipaddress.IPv4Address | ipaddress.IPv6Address,
    other: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    """Would a datagram for ``ours`` possibly reach a socket bound to ``other``?"""
    if other.version != ours.version:
        # A dual-stack IPv6 wildcard socket receives IPv4 too (IPV6_V6ONLY is not in /proc).
        return other.version == 6 and other.is_unspecified
    return other == ours or other.is_unspecified or ours.is_unspecified


def bind_exclusive(sock: socket.socket, address: tuple[str, int], what: str) -> None:
    """Bind ``sock`` to ``address`` as the port's only socket, or raise ``PortTakenError``.

    A local user can bind a shim's well-known port before the shim starts (and receive, or
    answer, its datagrams). Without SO_REUSEADDR / SO_REUSEPORT on our socket the kernel
    refuses to share the port with any socket that overlaps it (EADDRINUSE), whatever options
    the other one set; after the bind, the port's sockets in /proc are checked again (a
    dual-stack IPv6 wildcard beside our IPv4 socket is refused too).
    """
    port = address[1]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    try:
        sock.bind(address)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            holders = sorted({f"uid {uid}" for _, uid, _ in _udp_sockets(port)})
            raise PortTakenError(
                f"UDP port {port} ({what}) is already taken by a socket of "
                f"{', '.join(holders) or 'another process'}: stop that process or choose "
                "another port; refusing to start"
            ) from None
        raise PortTakenError(f"cannot bind UDP port {port} ({what}): {error.strerror}") from None
    ours = os.fstat(sock.fileno()).st_ino
    bound = ipaddress.ip_address(sock.getsockname()[0])
    others = sorted(
        {
            f"uid {uid} ({other})"
            for other, uid, inode in _udp_sockets(sock.getsockname()[1])
            if inode != ours and _overlaps(bound, other)
        }
    )
    if others:
        raise PortTakenError(
            f"UDP port {port} ({what}) is also bound by a socket of {', '.join(others)}: "
            "stop that process or choose another port; refusing to start"
        )
