"""Connections from the shim to the legacy service: plain, or from the client's own address.

With ``connect_transparent`` the service sees the real client address, as HAProxy's
``source 0.0.0.0 usesrc clientip`` does: the inner socket gets ``IP_TRANSPARENT``, which lets it
bind to an address this host does not own, and is bound to ``(client_addr, 0)``.

The kernel only delivers the service's replies to that socket if they are routed locally:
without it a reply to the client's address leaves by the default route and the connect times
out. For a service on loopback that means (``T`` a spare routing table)::

    ip rule add from <service_ip> ipproto tcp sport <service_port> lookup T
    ip route add local 0.0.0.0/0 dev lo table T
    sysctl net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.lo.route_localnet=1

``migrate.kernel.routing.TransparentReturnPath`` sets this up in production; this module only
opens sockets. ``IP_TRANSPARENT`` needs CAP_NET_ADMIN (or CAP_NET_RAW).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final

IP_TRANSPARENT: Final = 19  # SOL_IP, linux/in.h; not exported by Python's socket module
# Pick the source port at connect() time, by the full 4-tuple, rather than at bind() time by
# (address, port) alone: many relays bound to one client address would otherwise exhaust ports.
IP_BIND_ADDRESS_NO_PORT: Final = 24

DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0

Address = tuple[str, int]


async def _connect(
    sock: socket.socket, service: Address, loop: asyncio.AbstractEventLoop, timeout_s: float
) -> socket.socket:
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, service)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_plain(
    service: Address,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> socket.socket:
    """A non-blocking TCP socket connected to ``service`` from one of this host's addresses."""
    loop = loop or asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return await _connect(sock, service, loop, timeout_s)


async def connect_transparent(
    service: Address,
    client_addr: str,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> socket.socket:
    """A non-blocking TCP socket connected to ``service`` from ``client_addr`` (a foreign
    address, normally the client's). Raises ``PermissionError`` without CAP_NET_ADMIN and
    ``TimeoutError`` when replies are not routed back locally (see the module docstring)."""
    loop = loop or asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        sock.bind((client_addr, 0))
    except BaseException:
        sock.close()
        raise
    return await _connect(sock, service, loop, timeout_s)
