"""``tee(2)`` for Python: duplicate bytes from one pipe into another without consuming them.

Python's ``os`` module has ``splice`` (3.10+) but not ``tee``; this is a thin typed adapter
over libc's ``tee`` through ctypes. ``tee(fd_in, fd_out, length, flags)`` copies *references*
to up to ``length`` bytes at the head of pipe ``fd_in`` into pipe ``fd_out``; ``fd_in`` keeps
them, so a relay can tee what it read into a side pipe for an observer and still splice the
same bytes on to their destination, with no byte reaching user space on the forwarding path.

Errors come back as ``OSError`` with the errno (``BlockingIOError`` for EAGAIN: with
``SPLICE_F_NONBLOCK`` or non-blocking pipes, ``fd_in`` is empty or ``fd_out`` is full); EINTR
is retried here, as Python's own system call wrappers do (PEP 475).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Final

SPLICE_F_MOVE: Final = os.SPLICE_F_MOVE
SPLICE_F_NONBLOCK: Final = os.SPLICE_F_NONBLOCK
# What a pipe holds when F_SETPIPE_SZ is never called or refused (16 pages).
DEFAULT_PIPE_CAPACITY: Final = 1 << 16


def _load() -> ctypes._NamedFuncPointer:
    libc = ctypes.CDLL(None, use_errno=True)
    function = libc.tee
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    function.restype = ctypes.c_ssize_t
    return function


_tee: Final = _load()


def tee(fd_in: int, fd_out: int, length: int, flags: int = SPLICE_F_NONBLOCK) -> int:
    """Duplicate up to ``length`` bytes from the head of pipe ``fd_in`` into pipe ``fd_out``;
    return how many (0: ``fd_in`` has no writer left and is empty)."""
    if length <= 0:
        raise ValueError(f"tee length must be positive, got {length}")
    while True:
        result: int = _tee(fd_in, fd_out, length, flags)
        if result >= 0:
            return result
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, f"tee: {os.strerror(code)}")


def set_pipe_size(fd: int, size: int) -> int:
    """Ask for a ``size``-byte pipe; return the capacity actually in force (the kernel rounds
    up to a power of two pages; EPERM above /proc/sys/fs/pipe-max-size without privilege, or
    past the user's pipe-user-pages limit, leaves the pipe as it was)."""
    if size <= DEFAULT_PIPE_CAPACITY:
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    try:
        return int(fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size))
    except OSError:
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))


def make_pipe(*, nonblocking: bool = True) -> tuple[int, int]:
    """A close-on-exec pipe (read end, write end), non-blocking on both ends if asked."""
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    return os.pipe2(flags)
