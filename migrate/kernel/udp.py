"""Datagram sockets for the shims' own messages (updates, control, re-incarnation).

A roam sends one message per live connection in a burst (hundreds at once). With the default
receive buffer (about 200 KiB, of which each datagram takes its full buffer size, not just its
bytes) a burst overflows and messages are silently lost, so these sockets ask for a large
buffer, past ``rmem_max`` when the process may (CAP_NET_ADMIN).
"""

from __future__ import annotations

import socket

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
