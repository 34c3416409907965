"""Descriptors held back so that a daemon at its open-file limit can still change its rules.

A shim's connections take descriptors (two sockets each, a restored one during a hand-over),
and a client with thousands of them, or many clients, can bring the daemon to its limit
(RLIMIT_NOFILE: 20,000 on a host whose hard limit it may not raise). Accepting or preparing
one more connection then fails for that connection alone, but an nft transaction needs
descriptors of its own (libnftables: the script's memfd and the path opened on it; the
program: its pipes), and a gate or hand-over whose rules cannot change ends the daemon
(measured: "Could not open file /proc/self/fd/19999: Too many open files", the server shim
fatal in a roam of 10,000 connections). The daemon holds ``RESERVE_FDS`` descriptors (of
/dev/null) from its start and lets them go only for the length of a rule change.

The loop that accepts connections is the one that changes rules (single-threaded): nothing
can take the freed descriptors in between, except another thread of the daemon, in which
case fewer are held until the next change takes them back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

RESERVE_FDS = 16  # an nft transaction takes 3 (libnftables) to 8 (the program, its pipes)


class FdReserve:
    def __init__(self) -> None:
        self._fds: list[int] = []
        self._wanted = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return len(self._fds)

    def hold(self, count: int = RESERVE_FDS) -> None:
        """From now on, hold ``count`` descriptors back (a daemon's start)."""
        with self._lock:
            self._wanted = count
            self._take()

    def let_go(self) -> None:
        """Hold none any more (a daemon's end)."""
        with self._lock:
            self._wanted = 0
            self._close()

    @contextmanager
    def released(self) -> Iterator[None]:
        """The held descriptors free for the block (a rule change), taken back after it."""
        with self._lock:
            self._close()
            try:
                yield
            finally:
                self._take()

    def _take(self) -> None:
        while len(self._fds) < self._wanted:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # at the limit already: as many as could be had, the rest next time

    def _close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


RESERVE = FdReserve()
