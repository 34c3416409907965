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
import errno
import os
import socket
from typing import Final

IP_TRANSPARENT: Final = 19  # SOL_IP, linux/in.h; not exported by Python's socket module
# Pick the source port at connect() time, by the full 4-tuple, rather than at bind() time by
# (address, port) alone: many relays bound to one client address would otherwise exhaust ports.
IP_BIND_ADDRESS_NO_PORT: Final = 24

DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0

Address = tuple[str, int]


async def _connect(
    sock: socket.socket,
    service: Address,
    loop: asyncio.AbstractEventLoop,
    timeout_s: float | None,
) -> socket.socket:
    """Connect the non-blocking ``sock`` to the numeric address ``service``, or close it.

    Not ``loop.sock_connect``: uvloop's resolves the address through getaddrinfo first, even a
    numeric one, which cost ~95 µs per connection here (docs/benchmarks.md)."""
    try:
        status = sock.connect_ex(service)
        if status == errno.EINPROGRESS:
            status = 0 if _established(sock) else await _wait_connected(sock, loop, timeout_s)
        if status != 0:
            raise OSError(status, f"connect to {service[0]}:{service[1]}: {os.strerror(status)}")
    except BaseException:
        sock.close()
        raise
    return sock


def _established(sock: socket.socket) -> bool:
    """Whether the handshake is already over. To a loopback service it is, when connect()
    returns: the SYN, SYN-ACK and ACK were all processed within the call. One getpeername
    (ENOTCONN while in SYN_SENT) then saves an add_writer/remove_writer round and a loop
    iteration on the way to every legacy-service connection."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def _wait_connected(
    sock: socket.socket, loop: asyncio.AbstractEventLoop, timeout_s: float | None
) -> int:
    # A timer rather than asyncio.timeout(): this may run outside any task, up to its await
    # (proxy.relay.RelayServer steps a connect by hand, and starts a task only if it waits).
    writable: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _set_once, writable)
    timer = None if timeout_s is None else loop.call_later(timeout_s, _time_out, writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("connect timed out"))


async def connect_plain(
    service: Address,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    timeout_s: float | None = DEFAULT_CONNECT_TIMEOUT_S,
) -> socket.socket:
    """A non-blocking TCP socket connected to ``service`` (numeric address) from one of this
    host's addresses; ``timeout_s`` None: no limit of its own (the caller bounds it)."""
    loop = loop or asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    return await _connect(sock, service, loop, timeout_s)


async def connect_transparent(
    service: Address,
    client_addr: str,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    timeout_s: float | None = DEFAULT_CONNECT_TIMEOUT_S,
) -> socket.socket:
    """A non-blocking TCP socket connected to ``service`` from ``client_addr`` (a foreign
    address, normally the client's). Raises ``PermissionError`` without CAP_NET_ADMIN and
    ``TimeoutError`` when replies are not routed back locally (see the module docstring)."""
    loop = loop or asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((client_addr, 0))
    except BaseException:
        sock.close()
        raise
    return await _connect(sock, service, loop, timeout_s)
