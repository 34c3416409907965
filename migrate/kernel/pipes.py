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

import array
import contextlib
import ctypes
import errno
import fcntl
import os
import termios
import threading
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


_null_fd = -1


def _null() -> int:
    """/dev/null, opened once per process for writing (kept: every discard shares it)."""
    global _null_fd
    if _null_fd < 0:
        _null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _null_fd


def discard(fd: int, count: int) -> None:
    """Drop the first ``count`` bytes of pipe ``fd``, which holds at least that many, inside
    the kernel (spliced to /dev/null: the pages are released, never copied)."""
    null = _null()
    while count > 0:
        moved = os.splice(fd, null, count)
        if moved <= 0:
            raise OSError(errno.EIO, f"discarding a pipe's bytes: splice returned {moved}")
        count -= moved


_sink: tuple[int, int] | None = None
_sink_lock = threading.Lock()
SINK_BYTES: Final = 1 << 20  # what one drop_from moves at most (the sink pipe's size, if granted)


def drop_from(fd: int, count: int) -> int:
    """Drop up to ``count`` of the next bytes of socket ``fd`` inside the kernel, through a
    pipe of this process to /dev/null (never copied to user space); how many were dropped, 0 if
    the peer closed. ``BlockingIOError`` when none are there yet (a non-blocking socket)."""
    global _sink
    with _sink_lock:
        if _sink is None:
            _sink = make_pipe()
            with contextlib.suppress(OSError):  # beyond pipe-max-size: the default size
                set_pipe_size(_sink[1], SINK_BYTES)
        read_end, write_end = _sink
        moved = os.splice(fd, write_end, min(count, SINK_BYTES), flags=SPLICE_F_NONBLOCK)
        if moved > 0:
            discard(read_end, moved)
        return moved


def pending(fd: int) -> int:
    """Bytes waiting in pipe ``fd`` (FIONREAD)."""
    buffer = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buffer, True)
    return buffer[0]
