"""The relay engine: one client socket <-> one service socket, both directions.

Theory of operation
-------------------
A ``Relay`` owns two connected stream sockets and runs two independent one-way *pumps* over
them: client -> service and service -> client. Pumps are driven by the event loop's readiness
callbacks (``add_reader`` on the source, ``add_writer`` on the destination, on non-blocking
sockets), so a relay costs no thread, and no asyncio transport or stream either: those allocate
a ``bytes`` object per chunk and buffer without bound, which is what made a stream relay slow
(the measured facts of the architecture notes). Works with the default loop and with uvloop.
Figures against direct and HAProxy: docs/benchmarks.md.

Each direction is either

* ``Splice()``: zero-copy, ``splice(2)`` from the source socket into a private pipe, then from
  the pipe into the destination socket; payload pages move by reference and never reach Python.
  ``Splice(observer=...)`` keeps bulk forwarding zero-copy and shows the observer every byte
  all the same: each read is duplicated with ``tee(2)`` (page references, no copy) into a side
  pipe, which is read in large chunks (``read_size_bytes``) into the observer *before* the
  bytes are spliced on to the destination. The observer therefore covers at least what was
  forwarded at every moment the loop can see (what a checkpoint commits to), and a slow
  observer slows the pump rather than losing bytes: the side pipe holds at most one read.
  ``Splice(skip=Skip(...))`` lets the observer go without bytes it says it does not need
  (the body of a Range-capable response under ``--range-bodies window``): those are dropped
  from the side pipe in the kernel (spliced to /dev/null), all but the last ``keep`` bytes of
  each tee, which it reads as before.
  A splice pump copies (as below) until its first read of 64 KiB or more: short messages cost
  two system calls either way (four with a tee), and a connection that never carried bulk
  makes no pipe.
* ``Copy(observer)``: ``recv_into`` a reused buffer, ``send`` the chunk, then hand it to
  ``observer`` in the same callback (every byte once, in order): the observer's work runs
  while the peer handles the bytes, not on their way, and nothing the loop runs between two
  callbacks (a checkpoint) finds the observer behind what was forwarded.

Backpressure: a pump reads only when it holds nothing (empty pipe, or no unsent tail). When the
destination cannot take everything, the pump stops reading the source and waits for
writability; the source's TCP window then closes and a stalled receiver stalls the sender. A
relay holds at most one pipe or buffer per direction.

End of stream (half-close): when a source reads EOF, its pump (which holds nothing by then)
shuts the destination down for writing, passing the FIN on; the other direction carries on.
When both pumps have finished, both sockets are closed normally. Any socket error (reset,
broken pipe, ...), an observer exception or ``abort()`` ends the relay at once: both sockets get
``SO_LINGER`` 0 before they are closed, so a reset on one side reaches the other side as a
reset, and nothing lingers in FIN_WAIT or TIME_WAIT.

``serve()`` is the accept loop around it; ``python -m proxy.relay`` runs one (see ``main``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from migrate.kernel import pipes
from migrate.kernel.files import write_private
from migrate.kernel.processes import raise_open_file_limit
from proxy.transparent import DEFAULT_CONNECT_TIMEOUT_S, connect_plain, connect_transparent

_log = logging.getLogger(__name__)

Address = tuple[str, int]
Observer = Callable[[memoryview], None]
ConnectService = Callable[[socket.socket, Address], Awaitable[socket.socket]]

# A 1 MiB pipe lets one splice move a whole socket receive burst (the default 64 KiB pipe has
# only 16 slots, one per skb fragment, so it often holds much less than 64 KiB).
DEFAULT_PIPE_SIZE: Final = 1 << 20
DEFAULT_PIPE_CAPACITY: Final = 1 << 16  # what a pipe has when F_SETPIPE_SZ is refused
# Copy buffers: large enough to amortise the Python cost per chunk, small enough for L2.
DEFAULT_BUFFER_SIZE: Final = 256 << 10
DEFAULT_BACKLOG: Final = 4096
# Work done per readiness callback before yielding to the loop (fairness between relays).
_ROUNDS_PER_WAKEUP: Final = 16
# An observed splice pump starts copying, and splices (with a tee) from its first read this
# large (or filling its buffer): a sign of bulk, where splicing pays for its extra calls.
_BULK_READ_BYTES: Final = 64 << 10
_ACCEPTS_PER_WAKEUP: Final = 64
_ACCEPT_RETRY_S: Final = 0.5  # pause after EMFILE & co., as asyncio's own accept loop does
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # on, 0 s: close() sends RST
_ACCEPT_RESOURCE_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)

_splice = os.splice


# --- configuration of one direction -------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    """What an observer may go without (``Splice(skip=...)``): before the side pipe's bytes
    are read, ``skippable()`` says how many of the next ones it need not see; those are
    dropped in the kernel (spliced to /dev/null) and ``skipped(count)`` is told, except the
    last ``keep`` bytes of what the pipe holds, which are always read (a checkpoint between
    two reads needs the bytes just before its position: ``migrate.streamstate``'s window).
    Called under ``Relay.observer_lock`` when the observer has a thread."""

    skippable: Callable[[], int]
    skipped: Callable[[int], None]
    keep: int


@dataclass(frozen=True)
class Splice:
    """Zero-copy: socket -> pipe -> socket, from the first read of 64 KiB or more (before it,
    through the shared buffer). The pipe starts at the default 64 KiB and is grown
    to ``pipe_size_bytes`` (F_SETPIPE_SZ) by the first read that fills half of it; if that is
    refused (beyond /proc/sys/fs/pipe-max-size without privilege) it keeps 64 KiB.

    With an ``observer``, every chunk read is also teed into a side pipe of the same size and
    shown to ``observer`` (in order, each byte once, in chunks of up to ``read_size_bytes``)
    before it is spliced on (a read through the buffer: as with ``Copy``); the chunk is only
    valid during the call, and an exception from the observer ends the relay with
    ``EndReason.OBSERVER_FAILED``."""

    pipe_size_bytes: int = DEFAULT_PIPE_SIZE
    observer: Observer | None = None
    read_size_bytes: int = DEFAULT_BUFFER_SIZE
    # Off by default (roam server --live-relay splice-thread; docs/benchmarks.md): once a
    # pump splices, a thread of its own reads the side pipe into the observer, which then lags
    # the forwarded bytes by at most the side pipe (the pump waits for room in it:
    # backpressure). Observers of such a relay run under ``Relay.observer_lock``; whoever
    # reads their state takes it too.
    observer_thread: bool = False
    # The observer's bytes it may go without, dropped in the kernel (``Skip``; with an
    # observer only).
    skip: Skip | None = None


@dataclass(frozen=True)
class Copy:
    """Through a reused buffer. ``observer(chunk)`` is called for every chunk, in order, right
    after its send, in the same callback: whoever reads the observer's state from the loop
    never finds it behind what was forwarded, and the observer's work is off the round trip.
    ``chunk`` is only valid during the call (copy it to keep it). An exception from the
    observer ends the relay with ``EndReason.OBSERVER_FAILED`` (the chunk it refused may have
    gone out: observers record, they do not filter)."""

    observer: Observer | None = None
    buffer_size_bytes: int = DEFAULT_BUFFER_SIZE


Mode = Splice | Copy


class EndReason(enum.Enum):
    COMPLETED = "completed"  # both directions reached EOF and everything was delivered
    RESET = "reset"  # a socket error on one side (reset, broken pipe, timeout, ...)
    OBSERVER_FAILED = "observer-failed"
    ABORTED = "aborted"  # Relay.abort()


@dataclass(frozen=True)
class RelayOutcome:
    reason: EndReason
    bytes_client_to_service: int
    bytes_service_to_client: int
    failed_side: str | None = None  # "client" or "service" for RESET
    error: BaseException | None = None


# --- pumps: one direction each ------------------------------------------------------------


class _Pump:
    """Bytes from ``src`` to ``dst`` until EOF on ``src`` (then FIN to ``dst``) or an error."""

    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        src_side: str,
        dst_side: str,
    ) -> None:
        # Cleared when the relay ends, so that relay and pumps form no reference cycle and are
        # freed (with their buffers) by reference counting rather than by the cyclic GC.
        self._relay: Relay | None = relay
        self._loop = relay.loop
        self._src = src
        self._dst = dst
        self._src_fd = src.fileno()
        self._dst_fd = dst.fileno()
        self.src_side = src_side
        self.dst_side = dst_side
        self.bytes_forwarded = 0  # accepted by the destination socket
        self.finished = False
        self._stopped = False
        self._reading = False
        self._writing = False
        # Bytes to send before anything more is read: a chunk the destination did not take
        # at once (copied out of the shared scratch buffer, which the next read reuses).
        self._unsent: memoryview | None = None

    def start(self) -> None:
        self._resume_reading()

    def stop(self) -> None:
        """Unregister from the loop and free the pump's own resources (not the sockets)."""
        self._stopped = True
        self._pause_reading()
        self._stop_writing()
        self._release()

    def _release(self) -> None:
        """Free the pipe or buffer; idempotent."""

    def _resume_reading(self) -> None:
        if not self._reading:
            self._loop.add_reader(self._src_fd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._src_fd)
            self._reading = False

    def _start_writing(self) -> None:
        if not self._writing:
            self._loop.add_writer(self._dst_fd, self._on_writable)
            self._writing = True

    def _stop_writing(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._dst_fd)
            self._writing = False

    def _blocked(self) -> None:
        """The destination is full: stop reading until it drains (backpressure)."""
        self._pause_reading()
        self._start_writing()

    def _unblocked(self) -> None:
        self._stop_writing()
        self._resume_reading()

    def _on_readable(self) -> None:
        raise NotImplementedError

    def _on_writable(self) -> None:
        raise NotImplementedError

    def _copy_through(self, size: int) -> None:
        """Reads of up to ``size`` bytes through the scratch buffer every pump shares: recv,
        send, show the observer (``_see``). An idle connection holds no buffer of its own; a
        chunk the destination does not take at once is copied out and sent first."""
        recv_into, send = self._src.recv_into, self._dst.send
        view = _scratch(size)
        for _ in range(_ROUNDS_PER_WAKEUP):
            try:
                received = recv_into(view)
            except BlockingIOError:
                return
            except OSError as error:
                self._failed(self.src_side, error)
                return
            if received == 0:
                self._source_ended()
                return
            chunk = view[:received]
            try:
                sent = send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self._failed(self.dst_side, error)
                return
            self.bytes_forwarded += sent
            # Shown after the send: the observer's work (a live relay's codec and stream
            # state, 50-70 µs a message) then runs while the peer handles the bytes, not before.
            # No checkpoint runs in between (one callback), so none sees them unobserved.
            if not self._see(chunk):
                return
            more = self._copied(received)
            if sent < received:
                self._unsent = memoryview(bytes(chunk[sent:]))
                self._blocked()
                return
            if not more or received < size:
                return  # most likely drained: see _SplicePump._splice_reads

    def _see(self, chunk: memoryview) -> bool:
        """Show a copied chunk to the observer, if any; False if the relay ended."""
        return True

    def _copied(self, received: int) -> bool:
        """After a copied chunk: whether to go on reading through the buffer."""
        return True

    def _send_unsent(self) -> bool:
        """Send what must go first; True once all of it is out."""
        unsent = self._unsent
        assert unsent is not None
        try:
            sent = self._dst.send(unsent)
        except BlockingIOError:
            return False
        except OSError as error:
            self._failed(self.dst_side, error)
            return False
        self.bytes_forwarded += sent
        if sent < len(unsent):
            self._unsent = unsent[sent:]
            return False
        self._unsent = None
        return True

    def _source_ended(self) -> None:
        """EOF on the source, nothing held: pass the FIN on, keep the other direction going."""
        self._pause_reading()
        self._stopped = True  # a callback already queued must not touch released resources
        try:
            self._dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            self._failed(self.dst_side, error)
            return
        self.finished = True
        self._release()
        if self._relay is not None:
            self._relay._pump_finished()

    def _failed(self, side: str, error: BaseException) -> None:
        if self._relay is not None:
            self._relay._pump_failed(self, side, error)


class _SplicePump(_Pump):
    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        src_side: str,
        dst_side: str,
        mode: Splice,
    ) -> None:
        super().__init__(relay, src, dst, src_side, dst_side)
        # The pipe grows to the asked size on the first large read: short exchanges never pay
        # for the F_SETPIPE_SZ call.
        self._capacity = DEFAULT_PIPE_CAPACITY
        self._wanted_capacity = mode.pipe_size_bytes
        self._in_pipe = 0
        self._cleared = 0  # bytes at the head of the pipe the observer has seen, not forwarded
        self._observer = mode.observer
        self._observed = mode.observer is not None
        self._side: _SidePipe | _ThreadedSidePipe | None = None
        self._read_size = mode.read_size_bytes
        self._skip = mode.skip
        self.bytes_observed = 0
        self.spliced = False  # from the first read that shows bulk
        self._threaded = mode.observer_thread and self._observed
        self._lock = relay.observer_lock
        self._waiting_side = False
        self._pipe_r = self._pipe_w = -1
        # Until then, a read goes through a buffer (recv, [observer,] send: two system calls,
        # as splice in and out, and no pipe; an observed pump would take four and two pipes):
        # an exchange of short messages, most keep-alive traffic, costs what copy mode costs,
        # a connection that never carries bulk never makes a pipe (a pipe2 and two closes per
        # direction), and an idle one holds none (6 or 10 descriptors in all otherwise).
        self._bulk_read = min(_BULK_READ_BYTES, mode.read_size_bytes)

    def _take_pipes(self) -> None:
        """Bulk: splice from now on (an observer fed by a tee)."""
        pipe_r, pipe_w = pipes.make_pipe()
        try:
            if self._observer is None:
                pass
            elif self._threaded:
                self._side = _ThreadedSidePipe(
                    self._observer,
                    self._skip,
                    self._read_size,
                    self._wanted_capacity,
                    self._lock,
                    self._loop,
                    (self._on_side_room, self._observer_done),
                )
            else:
                self._side = _SidePipe(self._read_size, self._skip)
        except BaseException:
            os.close(pipe_r)
            os.close(pipe_w)
            raise
        self._pipe_r, self._pipe_w = pipe_r, pipe_w
        self.spliced = True

    def _release(self) -> None:
        self._waiting_side = False
        if self._pipe_r >= 0:
            os.close(self._pipe_r)
            os.close(self._pipe_w)
            self._pipe_r = self._pipe_w = -1
        if self._side is not None:
            self._side.release()
            self._side = None
        self._unsent = None

    def _on_readable(self) -> None:
        if self._stopped:
            return  # a callback queued before the relay ended
        if not self.spliced:
            self._copy_through(self._read_size)
            return
        self._splice_reads()

    def _see(self, chunk: memoryview) -> bool:
        observer = self._observer
        if observer is None:
            return True
        try:
            if self._threaded:
                with self._lock:
                    observer(chunk)
            else:
                observer(chunk)
        except Exception as error:
            if self._relay is not None:
                self._relay._observer_failed(error)
            return False
        self.bytes_observed += len(chunk)
        return True

    def _copied(self, received: int) -> bool:
        """Through the buffer until a read shows bulk; from then on, splice."""
        if received >= self._bulk_read:
            try:
                self._take_pipes()
            except OSError as error:
                # Out of descriptors: this connection goes on through the buffer.
                _log.info("relay %r: no pipes for splicing (%s); copying", self._relay, error)
                self._bulk_read = self._read_size + 1
        # Spliced: the (level-triggered) loop calls again at once if the source has more.
        return not self.spliced

    def _splice_reads(self) -> None:
        src, pipe_w, capacity = self._src_fd, self._pipe_w, self._capacity
        # Reading happens only with an empty pipe, so EAGAIN here means "source empty".
        for _ in range(_ROUNDS_PER_WAKEUP):
            try:
                moved = _splice(src, pipe_w, capacity, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as error:
                self._failed(self.src_side, error)
                return
            if moved == 0:
                self._source_ended()
                return
            self._in_pipe = moved
            if moved >= capacity // 2 and capacity < self._wanted_capacity:
                capacity = self._capacity = _enlarge_pipe(pipe_w, self._wanted_capacity)
                self._wanted_capacity = capacity  # asked once, granted or not
                if self._side is not None:
                    self._side.grow(capacity)
            if not self._advance() or moved < capacity:
                # A short read most likely emptied the socket: let the (level-triggered) loop
                # say whether more came, rather than pay a BlockingIOError to find out.
                return

    def _advance(self) -> bool:
        """Observe (if observed) and forward what the pipe holds; True once it is empty."""
        # Bounded: every round observes or forwards at least one byte, or leaves.
        while self._in_pipe:
            if self._observed and self._cleared == 0 and not self._observe():
                return False
            if not self._flush():
                return False
        return True

    def _observe(self) -> bool:
        """Show the observer the bytes at the head of the pipe, without taking them out of
        it; they may then be forwarded. False if the relay ended."""
        side, observer = self._side, self._observer
        assert side is not None
        assert observer is not None
        # The side pipe is empty here (read out after every tee) and as large as the main
        # one, so one tee normally takes the whole pipe; less only if the side pipe could not
        # be grown as far, and then the rest goes round again once this part is forwarded
        # (tee(2) always starts at the head of its source).
        try:
            teed = side.duplicate(self._pipe_r, self._in_pipe)
            if isinstance(side, _SidePipe):
                side.feed(teed, observer)
            else:
                side.check()
        except BlockingIOError:
            # Threaded: the observer is as far behind as allowed. Its thread calls
            # _on_side_room once it has caught up by some (backpressure).
            self._pause_reading()
            self._stop_writing()
            self._waiting_side = True
            return False
        except Exception as error:
            if self._relay is not None:
                self._relay._observer_failed(error)
            return False
        self._cleared = teed
        self.bytes_observed += teed
        return True

    def _on_side_room(self) -> None:
        if self._stopped or not self._waiting_side:
            return
        self._waiting_side = False
        if self._advance():
            self._resume_reading()

    def _source_ended(self) -> None:
        side = self._side
        if not isinstance(side, _ThreadedSidePipe):
            super()._source_ended()
            return
        # Forwarding is done (the pipe is empty): pass the FIN on now, but the pump is
        # finished only once its thread has shown the observer everything.
        self._pause_reading()
        self._stopped = True
        try:
            self._dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            self._failed(self.dst_side, error)
            return
        side.close_writer()

    def _observer_done(self, error: BaseException | None) -> None:
        """From the thread, through the loop: the observer has seen all, or failed."""
        relay = self._relay
        if relay is None or self.finished:
            return
        if error is not None:
            relay._observer_failed(error)
            return
        if self._stopped:  # the source ended: everything was observed
            self.finished = True
            self._release()
            relay._pump_finished()

    def _flush(self) -> bool:
        """Move the pipe (or, when observed, its observed head) to the destination; False if
        that is not all out (or failed)."""
        pipe_r, dst = self._pipe_r, self._dst_fd
        observed = self._observed
        pending = self._cleared if observed else self._in_pipe
        moved_all = 0
        # Bounded: every round moves at least one byte, or leaves.
        while pending:
            try:
                moved = _splice(pipe_r, dst, pending, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as error:
                self._failed(self.dst_side, error)
                return False
            if moved == 0:  # impossible with bytes in our own pipe; never spin on it
                self._failed(self.dst_side, OSError(errno.EIO, "splice from pipe returned 0"))
                return False
            pending -= moved
            moved_all += moved
        self.bytes_forwarded += moved_all
        self._in_pipe -= moved_all
        if observed:
            self._cleared = pending
        if pending:
            self._blocked()
            return False
        return True

    def _on_writable(self) -> None:
        if self._stopped:
            return
        if self._unsent is not None:
            if not self._send_unsent():
                return
            if self._in_pipe == 0:
                self._unblocked()
                return
        if self._advance():
            self._unblocked()


class _SidePipe:
    """The observer's copy of one direction: a pipe filled by ``tee(2)`` from the main pipe
    and read out, in large chunks through one reused buffer, into the observer."""

    def __init__(self, read_size: int, skip: Skip | None = None) -> None:
        self._r, self._w = pipes.make_pipe()
        self._read_size = read_size
        self._skip = skip

    def grow(self, capacity: int) -> None:
        # A side pipe at least as large as the main one takes a whole read in one tee.
        pipes.set_pipe_size(self._w, capacity)

    def duplicate(self, pipe_r: int, count: int) -> int:
        """Tee up to ``count`` bytes from the head of ``pipe_r`` into the (empty) side pipe;
        return how many were duplicated."""
        teed = pipes.tee(pipe_r, self._w, count)
        if teed <= 0:
            raise OSError(errno.EIO, f"tee returned {teed} with {count} bytes in the pipe")
        return teed

    def feed(self, count: int, observer: Observer) -> None:
        """Read ``count`` bytes out of the side pipe into ``observer`` (through the shared
        scratch buffer: this runs on the loop's thread, like every pump)."""
        size = self._read_size
        view = _scratch(size)
        readv, fd = os.readv, self._r
        skip = self._skip
        if skip is not None and count > skip.keep:
            dropped = min(skip.skippable(), count - skip.keep)
            if dropped > 0:
                pipes.discard(fd, dropped)
                skip.skipped(dropped)
                count -= dropped
        while count:
            got = readv(fd, [view[: min(size, count)]])
            if got <= 0:  # the bytes were teed: they are there, or the kernel lost them
                raise OSError(errno.EIO, f"side pipe read returned {got}, {count} bytes due")
            observer(view[:got])
            count -= got

    def release(self) -> None:
        if self._r >= 0:
            os.close(self._r)
            os.close(self._w)
            self._r = self._w = -1


class _ThreadedSidePipe:
    """A side pipe read by a thread of its own (``Splice(observer_thread=True)``): blocking
    reads of up to ``read_size`` bytes, each shown to the observer under ``lock``. The thread
    owns the read end; the pump closes the write end when its source ended (the thread then
    drains the pipe, reports, and exits) or when the relay ends (the thread stops at once).

    The lag is counted in bytes (a pipe's capacity counts buffers, and one spliced buffer may
    hold a whole socket buffer fragment): the pump tees nothing more while ``bound`` bytes or
    more wait for the observer, so it is never more than ``bound`` plus one read ahead."""

    def __init__(
        self,
        observer: Observer,
        skip: Skip | None,
        read_size: int,
        bound: int,
        lock: threading.Lock,
        loop: asyncio.AbstractEventLoop,
        callbacks: tuple[Callable[[], None], Callable[[BaseException | None], None]],
    ) -> None:
        self._r, self._w = pipes.make_pipe(nonblocking=False)
        os.set_blocking(self._w, False)  # the pump's end
        self._bound = bound
        self._teed = 0  # written by the pump only
        self._observed = 0  # by the thread only, under _counts
        self._waiting = False
        self._counts = threading.Lock()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(observer, skip, read_size, lock, loop, callbacks),
            name="relay-observer",
            daemon=True,
        )
        self._thread.start()

    def grow(self, capacity: int) -> None:
        pipes.set_pipe_size(self._w, capacity)

    def duplicate(self, pipe_r: int, count: int) -> int:
        """Tee up to ``count`` bytes; BlockingIOError if the observer is too far behind (the
        thread will call back once it caught up)."""
        with self._counts:
            if self._teed - self._observed >= self._bound:
                self._waiting = True
                raise BlockingIOError(errno.EAGAIN, "the observer is behind")
        try:
            teed = pipes.tee(pipe_r, self._w, count)
        except BlockingIOError:
            with self._counts:
                if self._teed == self._observed:
                    teed = 0  # the thread has read all: the pipe has room now, try again
                else:
                    self._waiting = True
                    raise
        if teed == 0:
            teed = pipes.tee(pipe_r, self._w, count)
        if teed <= 0:
            raise OSError(errno.EIO, f"tee returned {teed} with {count} bytes in the pipe")
        self._teed += teed
        return teed

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(
        self,
        observer: Observer,
        skip: Skip | None,
        read_size: int,
        lock: threading.Lock,
        loop: asyncio.AbstractEventLoop,
        callbacks: tuple[Callable[[], None], Callable[[BaseException | None], None]],
    ) -> None:
        room, done = callbacks
        view = memoryview(bytearray(read_size))
        readv, fd, counts = os.readv, self._r, self._counts
        waiting = select.poll()
        waiting.register(fd, select.POLLIN)
        error: BaseException | None = None
        try:
            while not self._stop:
                got = 0
                if skip is not None:
                    # Wait for a tee, then drop what the observer may go without before
                    # reading: a blocking read would take the head of the chunk first.
                    waiting.poll()
                    held = pipes.pending(fd)
                    if held > skip.keep:
                        with lock:  # no checkpoint between the drop and the kept bytes
                            dropped = min(skip.skippable(), held - skip.keep)
                            if dropped > 0:
                                pipes.discard(fd, dropped)
                                skip.skipped(dropped)
                                got = readv(fd, [view])  # the kept bytes: there, no wait
                                observer(view[:got])
                                got += dropped
                if got <= 0:
                    got = readv(fd, [view])  # releases the GIL; so do hashlib's large updates
                    if got == 0:
                        break  # the write end is closed and all was read
                    with lock:
                        observer(view[:got])
                with counts:
                    self._observed += got
                    wake = self._waiting and self._teed - self._observed < self._bound
                    if wake:
                        self._waiting = False
                if wake:
                    loop.call_soon_threadsafe(room)
        except Exception as failure:
            error = self._error = failure
        finally:
            os.close(fd)
        if not self._stop:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(done, error)

    def close_writer(self) -> None:
        if self._w >= 0:
            os.close(self._w)
            self._w = -1

    def release(self) -> None:
        self._stop = True
        self.close_writer()  # a blocked read returns 0 once the pipe is empty


class _CopyPump(_Pump):
    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        src_side: str,
        dst_side: str,
        mode: Copy,
    ) -> None:
        super().__init__(relay, src, dst, src_side, dst_side)
        self._observer = mode.observer
        self._size = mode.buffer_size_bytes

    def _release(self) -> None:
        self._unsent = None

    def _on_readable(self) -> None:
        if self._stopped:
            return
        self._copy_through(self._size)

    def _see(self, chunk: memoryview) -> bool:
        observer = self._observer
        if observer is None:
            return True
        try:
            observer(chunk)
        except Exception as error:
            if self._relay is not None:
                self._relay._observer_failed(error)
            return False
        return True

    def _on_writable(self) -> None:
        if self._stopped or self._unsent is None:
            return
        if self._send_unsent():
            self._unblocked()


_scratch_buffers: dict[int, memoryview] = {}


def _scratch(size: int) -> memoryview:
    """The read buffer of ``size`` bytes that every pump shares. They all run on the loop's
    thread and no chunk outlives its read (an observer copies what it keeps; an unsent rest
    is copied out), so one buffer serves a thousand connections: before, each direction of
    each connection held its own, 512 KiB per idle connection and a fresh allocation (page
    faults included) per re-incarnated one."""
    view = _scratch_buffers.get(size)
    if view is None:
        view = _scratch_buffers[size] = memoryview(bytearray(size))
    return view


def _enlarge_pipe(fd: int, size: int) -> int:
    """Ask for a ``size``-byte pipe (a default one holds 64 KiB); return the capacity actually
    in force."""
    if size <= DEFAULT_PIPE_CAPACITY:
        return DEFAULT_PIPE_CAPACITY
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        # EPERM: above pipe-max-size, or the user's pipe-user-pages limit, without privilege.
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def _make_pump(
    relay: Relay,
    mode: Mode,
    src: socket.socket,
    dst: socket.socket,
    src_side: str,
    dst_side: str,
) -> _Pump:
    if isinstance(mode, Splice):
        return _SplicePump(relay, src, dst, src_side, dst_side, mode)
    if isinstance(mode, Copy):
        return _CopyPump(relay, src, dst, src_side, dst_side, mode)
    raise TypeError(f"a direction's mode is Splice() or Copy(...), got {mode!r}")


def close_abortively(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, and nothing stays in TIME_WAIT."""
    # Already reset or never connected: then a plain close is all there is to do.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


# --- the relay ----------------------------------------------------------------------------


class Relay:
    """Relays ``client`` <-> ``service`` (two connected stream sockets, which the relay now
    owns and closes) until both directions are done or one side fails. ``client_to_service``
    and ``service_to_client`` choose each direction's mode (default: ``Splice()``).

    Call ``start()`` from the loop's thread; ``await wait()`` (or the ``closed`` future) gives
    the ``RelayOutcome``. Construction raises ``OSError`` (e.g. EMFILE creating a pipe), in
    which case the sockets are left to the caller.
    """

    def __init__(
        self,
        client: socket.socket,
        service: socket.socket,
        *,
        client_to_service: Mode | None = None,
        service_to_client: Mode | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.client = client
        self.service = service
        for sock in (client, service):
            if sock.getblocking():  # Python's own flag: no system call when already set
                sock.setblocking(False)
        self.closed: asyncio.Future[RelayOutcome] = self.loop.create_future()
        # Held by observer threads while they run an observer (Splice(observer_thread=True)):
        # take it to read a consistent observer state. Uncontended otherwise.
        self.observer_lock = threading.Lock()
        self._upstream = _make_pump(
            self, client_to_service or Splice(), client, service, "client", "service"
        )
        try:
            self._downstream = _make_pump(
                self, service_to_client or Splice(), service, client, "service", "client"
            )
        except BaseException:
            self._upstream.stop()
            raise
        self._started = False
        self._ended = False

    def __repr__(self) -> str:
        state = "ended" if self._ended else "running" if self._started else "new"
        return (
            f"<Relay {state} c2s={self.bytes_client_to_service} s2c={self.bytes_service_to_client}>"
        )

    @property
    def bytes_client_to_service(self) -> int:
        """Bytes delivered to the service socket so far."""
        return self._upstream.bytes_forwarded

    @property
    def bytes_service_to_client(self) -> int:
        """Bytes delivered to the client socket so far."""
        return self._downstream.bytes_forwarded

    @property
    def bytes_read_from_client(self) -> int | None:
        """Bytes read from the client socket so far (delivered, or waiting to be), when the
        client's bytes are copied; None when they are spliced (a pipe may hold some)."""
        upstream = self._upstream
        if not isinstance(upstream, _CopyPump):
            return None
        unsent = upstream._unsent
        return upstream.bytes_forwarded + (len(unsent) if unsent is not None else 0)

    @property
    def ended(self) -> bool:
        return self._ended

    def start(self, *, to_client_first: bytes = b"") -> None:
        """Start both pumps. ``to_client_first`` is sent to the client before
        anything read from the service: a re-created connection owes the client the bytes the
        new server regenerated beyond the client's position."""
        if self._started:
            raise RuntimeError("a relay is started once")
        self._started = True
        if self._ended:
            return
        self._upstream.start()
        downstream = self._downstream
        if to_client_first:
            if isinstance(downstream, _CopyPump | _SplicePump):
                downstream._unsent = memoryview(to_client_first)
            else:
                raise TypeError(f"to_client_first cannot go through {downstream!r}")
            downstream._blocked()  # write those first; reading resumes once they are out
        else:
            downstream.start()
        # What the client sent while the service connection was being made (most often its
        # first request) goes on at once, not after a turn of the loop (an epoll_wait that
        # would only say so). Nothing there costs one recv that says EAGAIN.
        upstream = self._upstream
        if not self._ended and isinstance(upstream, _CopyPump | _SplicePump):
            upstream._on_readable()

    def abort(self) -> None:
        """End now: both peers get a reset. Safe to call at any time, and twice."""
        self._end(EndReason.ABORTED, abortive=True)

    async def wait(self) -> RelayOutcome:
        """Wait for the end; cancelling the wait does not end the relay."""
        return await asyncio.shield(self.closed)

    # --- called by the pumps ---------------------------------------------------------------

    def _pump_finished(self) -> None:
        if self._upstream.finished and self._downstream.finished:
            self._end(EndReason.COMPLETED, abortive=False)

    def _pump_failed(self, pump: _Pump, side: str, error: BaseException) -> None:
        _log.debug("relay %r: %s side failed: %s", self, side, error)
        self._end(EndReason.RESET, abortive=True, side=side, error=error)

    def _observer_failed(self, error: BaseException) -> None:
        _log.debug("relay %r: observer failed: %r", self, error)
        self._end(EndReason.OBSERVER_FAILED, abortive=True, error=error)

    def _end(
        self,
        reason: EndReason,
        *,
        abortive: bool,
        side: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        if self._ended:
            return
        self._ended = True
        for pump in (self._upstream, self._downstream):
            pump.stop()
            pump._relay = None
        for sock in (self.client, self.service):
            if abortive:
                close_abortively(sock)
            else:
                sock.close()
        outcome = RelayOutcome(
            reason, self.bytes_client_to_service, self.bytes_service_to_client, side, error
        )
        if not self.closed.done():
            self.closed.set_result(outcome)


# --- the accept loop ----------------------------------------------------------------------

RelayFactory = Callable[[socket.socket, socket.socket, Address], Relay]


def splice_both_ways(client: socket.socket, service: socket.socket, client_addr: Address) -> Relay:
    """The default relay factory: zero-copy in both directions."""
    return Relay(client, service)


class _Resumed:
    """Awaits a coroutine that was already run up to its first suspension (``waiting``, what it
    yielded) outside any task: a task awaiting this goes on with it as if it had started it."""

    __slots__ = ("_coroutine", "_waiting")

    def __init__(
        self, coroutine: Coroutine[object, object, socket.socket], waiting: object
    ) -> None:
        self._coroutine = coroutine
        self._waiting = waiting

    def __await__(self) -> Generator[object, object, socket.socket]:
        coroutine, value = self._coroutine, self._waiting
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:  # thrown in by the task: cancellation
                try:
                    value = coroutine.throw(error)
                except StopIteration as done:
                    result: socket.socket = done.value
                    return result
            else:
                try:
                    value = coroutine.send(sent)
                except StopIteration as done:
                    result = done.value
                    return result


@dataclass
class ServerStats:
    accepted: int = 0
    connect_failures: int = 0  # the service connection could not be made: client reset
    live: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    bytes_client_to_service: int = 0  # of ended relays
    bytes_service_to_client: int = 0


class RelayServer:
    """Accepts clients and relays each to its own service connection. Made by ``serve()``."""

    def __init__(
        self,
        sock: socket.socket,
        connect_service: ConnectService,
        relay_factory: RelayFactory,
        connect_timeout_s: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._sock = sock
        self._connect_service = connect_service
        self._relay_factory = relay_factory
        self._connect_timeout_s = connect_timeout_s
        self._loop = loop
        self._relays: set[Relay] = set()
        self._opening: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closing = False
        self.address: Address = sock.getsockname()[:2]
        self.stats = ServerStats()

    @property
    def relays(self) -> frozenset[Relay]:
        return frozenset(self._relays)

    @property
    def closing(self) -> bool:
        return self._closing

    def snapshot(self) -> ServerStats:
        stats = self.stats
        return ServerStats(
            accepted=stats.accepted,
            connect_failures=stats.connect_failures,
            live=len(self._relays) + len(self._opening),
            outcomes=Counter(stats.outcomes),
            bytes_client_to_service=stats.bytes_client_to_service,
            bytes_service_to_client=stats.bytes_service_to_client,
        )

    def _start_accepting(self) -> None:
        self._retry = None
        if not self._closing:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)

    def _on_acceptable(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                client, client_addr = self._sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # the client gave up while in the backlog
            except OSError as error:
                if error.errno not in _ACCEPT_RESOURCE_ERRORS:
                    # Linux reports a pending error of the new connection (ENETDOWN,
                    # EHOSTUNREACH, EPROTO, ...) through accept(): that client is lost, not us.
                    _log.info("accept: %s", error)
                    continue
                # Out of descriptors or memory: the backlog holds clients until we recover.
                _log.warning("accept: %s; pausing %.1f s", error, _ACCEPT_RETRY_S)
                self._loop.remove_reader(self._sock.fileno())
                self._retry = self._loop.call_later(_ACCEPT_RETRY_S, self._start_accepting)
                return
            self.stats.accepted += 1
            self._open(client, client_addr[:2])

    def _open(self, client: socket.socket, client_addr: Address) -> None:
        """Connect to the service and start the relay: here and now when the connect completes
        at once (a service on loopback: the handshake is over inside connect()), without a
        task, a timeout or a turn of the loop; in a task, bounded by the connect timeout,
        when it has to wait. ``connect_service``'s coroutine is therefore run up to its first
        suspension outside any task: it must not need ``asyncio.current_task()`` before it."""
        try:
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connecting = self._connect_service(client, client_addr)
            if isinstance(connecting, Coroutine):
                try:
                    waiting = connecting.send(None)
                except StopIteration as done:
                    service: socket.socket = done.value
                else:
                    self._open_later(client, client_addr, _Resumed(connecting, waiting))
                    return
            else:
                self._open_later(client, client_addr, connecting)
                return
        except Exception as error:
            self._connect_failed(client, client_addr, error)
            return
        self._start_relay(client, service, client_addr)

    def _open_later(
        self, client: socket.socket, client_addr: Address, connecting: Awaitable[socket.socket]
    ) -> None:
        task = self._loop.create_task(self._wait_connected(client, client_addr, connecting))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _wait_connected(
        self, client: socket.socket, client_addr: Address, connecting: Awaitable[socket.socket]
    ) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                service = await connecting
        except asyncio.CancelledError:
            close_abortively(client)
            raise
        except Exception as error:
            self._connect_failed(client, client_addr, error)
            return
        self._start_relay(client, service, client_addr)

    def _connect_failed(
        self, client: socket.socket, client_addr: Address, error: Exception
    ) -> None:
        # A client we cannot serve learns it at once (RST) rather than by a timeout.
        self.stats.connect_failures += 1
        _log.info("service connection for %s:%d failed: %r", *client_addr, error)
        close_abortively(client)

    def _start_relay(
        self, client: socket.socket, service: socket.socket, client_addr: Address
    ) -> None:
        try:
            service.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            relay = self._relay_factory(client, service, client_addr)
            relay.start()
        except Exception as error:
            self.stats.connect_failures += 1
            _log.warning("relay for %s:%d not started: %r", *client_addr, error)
            close_abortively(client)
            close_abortively(service)
            return
        if relay.ended:
            self._relay_closed(relay, relay.closed)
            return
        self._relays.add(relay)
        relay.closed.add_done_callback(functools.partial(self._relay_closed, relay))

    def _relay_closed(self, relay: Relay, closed: asyncio.Future[RelayOutcome]) -> None:
        self._relays.discard(relay)
        if closed.cancelled():
            return
        outcome = closed.result()
        self.stats.outcomes[outcome.reason.value] += 1
        self.stats.bytes_client_to_service += outcome.bytes_client_to_service
        self.stats.bytes_service_to_client += outcome.bytes_service_to_client

    def close(self) -> None:
        """Stop accepting, cancel connections being opened, abort every live relay."""
        if self._closing:
            return
        self._closing = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in list(self._opening):
            task.cancel()
        for relay in list(self._relays):
            relay.abort()

    async def wait_closed(self, timeout_s: float = 10.0) -> None:
        """After ``close()``: wait (bounded) until the cancelled connects have unwound."""
        pending = list(self._opening)
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        await asyncio.sleep(0)  # let the relays' done callbacks run


async def serve(
    listen: Address,
    connect_service: ConnectService,
    *,
    relay_factory: RelayFactory = splice_both_ways,
    backlog: int = DEFAULT_BACKLOG,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> RelayServer:
    """Listen on ``listen``; for every client, open its service connection with
    ``connect_service(client_socket, client_address)`` (within ``connect_timeout_s``; on failure
    the client is reset) and relay the two with ``relay_factory``. TCP_NODELAY is set on both
    sockets: the relay forwards what it reads at once, so Nagle would only add delay."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(listen)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    server = RelayServer(sock, connect_service, relay_factory, connect_timeout_s, loop)
    server._start_accepting()
    return server


# --- command line: python -m proxy.relay ----------------------------------------------------

_MODE_SPECS: Final = (
    "splice",
    "splice:noop",
    "splice:sha256",
    "copy",
    "copy:noop",
    "copy:sha256",
)


def _noop_observer(chunk: memoryview) -> None:
    """Costs one Python call per chunk, nothing else: the floor of any observer."""


def mode_from_spec(spec: str, *, pipe_size: int, buffer_size: int) -> Mode:
    """``splice``, ``copy`` (no observer), or either with ``:noop`` or ``:sha256`` (a fresh
    hash) as observer (spliced: fed from a tee of the stream)."""
    if spec == "splice":
        return Splice(pipe_size)
    if spec == "splice:noop":
        return Splice(pipe_size, _noop_observer, buffer_size)
    if spec == "splice:sha256":
        return Splice(pipe_size, hashlib.sha256().update, buffer_size)
    if spec == "copy":
        return Copy(None, buffer_size)
    if spec == "copy:noop":
        return Copy(_noop_observer, buffer_size)
    if spec == "copy:sha256":
        return Copy(hashlib.sha256().update, buffer_size)
    raise ValueError(f"unknown mode {spec!r}: one of {', '.join(_MODE_SPECS)}")


def _parse_address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.relay",
        description="Relay TCP clients to a service (the server shim's data path, standalone).",
    )
    parser.add_argument("--listen", type=_parse_address, required=True, help="HOST:PORT")
    parser.add_argument("--service", type=_parse_address, required=True, help="HOST:PORT")
    parser.add_argument(
        "--transparent",
        action="store_true",
        help="connect to the service from the client's own address (IP_TRANSPARENT)",
    )
    parser.add_argument("--mode", choices=_MODE_SPECS, default="splice", help="both directions")
    parser.add_argument("--client-to-service", choices=_MODE_SPECS, help="overrides --mode")
    parser.add_argument("--service-to-client", choices=_MODE_SPECS, help="overrides --mode")
    parser.add_argument("--pipe-size", type=int, default=DEFAULT_PIPE_SIZE, metavar="BYTES")
    parser.add_argument("--buffer-size", type=int, default=DEFAULT_BUFFER_SIZE, metavar="BYTES")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--status-file",
        type=Path,
        help="on SIGUSR1, write the server's counters and open fds here as JSON",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def _write_status(server: RelayServer, path: Path) -> None:
    stats = server.snapshot()
    status = {
        "pid": os.getpid(),
        "accepted": stats.accepted,
        "connect_failures": stats.connect_failures,
        "live_relays": stats.live,
        "outcomes": dict(stats.outcomes),
        "bytes_client_to_service": stats.bytes_client_to_service,
        "bytes_service_to_client": stats.bytes_service_to_client,
        "open_fds": len(os.listdir("/proc/self/fd")) - 1,  # minus listdir's own
    }
    write_private(path, (json.dumps(status) + "\n").encode())  # readers never see half a file


async def _run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    service: Address = args.service

    # serve() bounds the whole callback with its own connect timeout.
    async def connect(client: socket.socket, client_addr: Address) -> socket.socket:
        if args.transparent:
            return await connect_transparent(service, client_addr[0], loop=loop, timeout_s=None)
        return await connect_plain(service, loop=loop, timeout_s=None)

    c2s = args.client_to_service or args.mode
    s2c = args.service_to_client or args.mode
    sizes = {"pipe_size": args.pipe_size, "buffer_size": args.buffer_size}

    def factory(client: socket.socket, service_sock: socket.socket, addr: Address) -> Relay:
        return Relay(
            client,
            service_sock,
            client_to_service=mode_from_spec(c2s, **sizes),
            service_to_client=mode_from_spec(s2c, **sizes),
            loop=loop,
        )

    server = await serve(args.listen, connect, relay_factory=factory, backlog=args.backlog)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if args.status_file is not None:
        loop.add_signal_handler(signal.SIGUSR1, _write_status, server, args.status_file)
    host, port = server.address
    print(
        f"relay listening on {host}:{port} -> {service[0]}:{service[1]} "
        f"(c2s {c2s}, s2c {s2c}{', transparent' if args.transparent else ''}, {args.loop})",
        flush=True,
    )
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s relay %(levelname)s %(message)s",
    )
    raise_open_file_limit()
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run(args))
    else:
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
