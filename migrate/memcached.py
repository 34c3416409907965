"""memcached text protocol codec: a fresh point after every complete exchange.

Theory of operation: a memcached text connection holds no session state between commands, so
as for HTTP the fresh point is the end of the last command whose reply has been sent (and of
every command before it). The codec follows the framing of both directions:

* client commands are lines (``\\r\\n``, or a bare ``\\n`` which memcached accepts too); the
  storage commands (set, add, replace, append, prepend, cas; meta ``ms``) are followed by a data
  block of the announced length and ``\\r\\n``, which is counted, never buffered;
* replies are self-describing lines: ``VALUE key flags bytes [cas]`` and meta ``VA size ...``
  announce a data block; a retrieval (get, gets, gat, gats) or ``stats`` reply ends at ``END``
  (``stats reset`` at ``RESET``, ``stats detail on`` at ``OK``), or at an error line; every
  other reply is one line.

Replies answer the commands in order. A command with ``noreply`` gets no reply at all, so it is
answered as soon as every command before it is. A *quiet* meta command (flag ``q``) is answered
only when it fails or hits, so one cannot count its replies: such a command opens a group that
the next ``mn`` (meta no-op, always answered ``MN``) closes, and the whole group is answered by
the ``MN``. ``quit`` gets no reply (the server closes).

What the codec cannot be sure of degrades it (the fresh point stops moving, as for HTTP): the
binary protocol (first byte 0x80), an unknown command, a malformed command line (memcached may
or may not read a data block after it), a line over ``MAX_LINE_BYTES``, a reply without a
command, more than ``MAX_PENDING`` commands waiting. ``watch`` (a log stream pushed by the
server) is not replayable. Bad input never raises.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from migrate.codec import CodecReport, FreshPoint

MAX_LINE_BYTES: Final = 8 * 1024
"""Longest command or reply line followed (memcached's own limit is 2048 for commands)."""

MAX_PENDING: Final = 16384
"""Most commands that may wait for their replies; one more degrades the codec."""

_MAX_KEY = 250
_MAX_DATA = 1 << 40  # a larger data block is not from a real peer

_STORAGE = frozenset({b"set", b"add", b"replace", b"append", b"prepend", b"cas"})
_RETRIEVAL = frozenset({b"get", b"gets", b"gat", b"gats"})
_NOREPLY_OK = frozenset({b"delete", b"incr", b"decr", b"touch", b"verbosity", b"flush_all"})
_ONE_LINE = frozenset({b"version", b"mn", b"mg", b"md", b"ma", b"me", b"ms"}) | _NOREPLY_OK
_ERROR_LINES = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")

# How a command is answered.
_LINE = 0  # one reply line (or a VA block)
_UNTIL_END = 1  # lines until END or an error line (retrieval, stats)
_NONE = 2  # no reply (noreply, quit)
_UNTIL_MN = 3  # a group of commands with quiet ones, answered by the closing mn's MN
_STATS = 4  # any lines until END, RESET, OK or an error line


class _Degrade(Exception):
    """Internal: the stream left what the codec can follow. Never escapes a ``feed_*`` call."""


class _Unreplayable(Exception):
    """Internal: the connection uses something a new server cannot re-create."""


@dataclass(slots=True)
class _Side:
    """The framing state of one direction."""

    position: int  # absolute position of the next byte
    start: int = 0  # where the last line began
    line: bytearray = field(default_factory=bytearray)  # an unfinished line
    payload: int = 0  # data block bytes still to come
    crlf: int = 0  # bytes of the data block's CRLF still to come


@dataclass(slots=True)
class _Pending:
    end: int
    answer: int


class MemcachedCodec(CodecReport):
    """memcached text protocol: the fresh point follows completed exchanges."""

    name = "memcached"

    def __init__(self, *, c2s_start: int = 0, s2c_start: int = 0) -> None:
        super().__init__(c2s_start, s2c_start)
        self._pending: deque[_Pending] = deque()
        self._group: _Pending | None = None  # an open group of quiet meta commands
        self._c2s = _Side(c2s_start)
        self._s2c = _Side(s2c_start)
        self._answer_next = _LINE  # how the storage command whose data block comes is answered
        self._block_word = b""  # the reply line (VALUE or VA) whose data block comes
        self._in_reply = False  # a multi-line reply has begun

    def feed_c2s(self, data: bytes | memoryview) -> None:
        self._feed(True, data)

    def feed_s2c(self, data: bytes | memoryview) -> None:
        self._feed(False, data)

    def _feed(self, c2s: bool, data: bytes | memoryview) -> None:
        if self._degraded is not None:
            return
        with memoryview(data) as raw, raw.cast("B") as view:
            try:
                if c2s:
                    self._read(view, c2s=True)
                else:
                    self._read(view, c2s=False)
            except _Unreplayable as error:
                self._unreplayable = str(error)
                self._stop(f"not replayable: {error}")
            except _Degrade as error:
                where = (self._c2s if c2s else self._s2c).start
                self._stop(f"{'c2s' if c2s else 's2c'} at byte {where}: {error}")

    def _stop(self, reason: str) -> None:
        self._degraded = reason
        self._pending.clear()
        self._group = None

    def _read(self, view: memoryview, *, c2s: bool) -> None:
        """Split ``view`` into lines and data blocks; hand each complete line on."""
        side = self._c2s if c2s else self._s2c
        i, n = 0, len(view)
        line = side.line
        while i < n:
            if side.payload:
                taken = min(side.payload, n - i)
                i += taken
                side.position += taken
                side.payload -= taken
                if side.payload == 0:
                    side.crlf = 2
                continue
            if side.crlf:
                if view[i] != b"\r\n"[2 - side.crlf]:
                    raise _Degrade("data block not followed by CRLF")
                i += 1
                side.position += 1
                side.crlf -= 1
                if side.crlf == 0:
                    if c2s:
                        self._command_done()
                    else:
                        self._block_done()
                continue
            if not line:
                side.start = side.position
            chunk = bytes(view[i : min(n, i + MAX_LINE_BYTES + 1 - len(line))])
            lf = chunk.find(b"\n")
            if lf != -1:
                chunk = chunk[: lf + 1]
            line += chunk
            i += len(chunk)
            side.position += len(chunk)
            if lf == -1:
                if len(line) > MAX_LINE_BYTES:
                    raise _Degrade(f"line over {MAX_LINE_BYTES} bytes")
                if c2s and line[:1] == b"\x80":
                    raise _Degrade("binary protocol")
                continue
            text = bytes(line[:-2] if line.endswith(b"\r\n") else line[:-1])
            line.clear()
            if c2s:
                self._command(text)
            else:
                self._reply_line(text)

    def _block(self, side: _Side, length: int) -> None:
        """A data block of ``length`` bytes and its CRLF follow on ``side``."""
        side.payload = length
        side.crlf = 0 if length else 2

    # --- client side ------------------------------------------------------------------

    def _command(self, text: bytes) -> None:
        if text[:1] == b"\x80":
            raise _Degrade("binary protocol")
        tokens = text.split()
        if not tokens:
            raise _Degrade("empty command line")
        verb = tokens[0]
        answer = _LINE
        if verb in _STORAGE or verb == b"ms":
            self._block(self._c2s, self._data_length(verb, tokens))
            self._answer_next = self._storage_answer(verb, tokens)
            return  # answered once its data block has arrived
        if verb in _RETRIEVAL:
            if len(tokens) < (3 if verb in (b"gat", b"gats") else 2):
                raise _Degrade(f"{verb.decode()} without a key")
            self._check_keys(tokens[2 if verb in (b"gat", b"gats") else 1 :])
            answer = _UNTIL_END
        elif verb == b"stats":
            answer = _STATS
        elif verb == b"quit":
            answer = _NONE
        elif verb == b"watch":
            raise _Unreplayable("watch (the server pushes its logs)")
        elif verb in _ONE_LINE:
            if len(tokens) > 1 and verb in (b"mg", b"md", b"ma", b"me"):
                self._check_keys(tokens[1:2])
            if verb in _NOREPLY_OK and tokens[-1] == b"noreply":
                answer = _NONE
            elif verb in (b"mg", b"md", b"ma") and _quiet(tokens[2:]):
                answer = _UNTIL_MN
        else:
            raise _Degrade(f"unknown command {verb[:32]!r}")
        self._queue(answer, verb == b"mn")

    def _data_length(self, verb: bytes, tokens: list[bytes]) -> int:
        index, least = (2, 3) if verb == b"ms" else (4, 6 if verb == b"cas" else 5)
        if len(tokens) < least:
            raise _Degrade(f"malformed {verb.decode()} command line")
        self._check_keys(tokens[1:2])
        length = tokens[index]
        if not length.isdigit() or len(length) > 13 or int(length) > _MAX_DATA:
            raise _Degrade(f"malformed {verb.decode()} data length")
        if verb != b"ms":
            for number in tokens[2:4]:
                if not number.lstrip(b"-").isdigit():
                    raise _Degrade(f"malformed {verb.decode()} command line")
        return int(length)

    def _storage_answer(self, verb: bytes, tokens: list[bytes]) -> int:
        if verb == b"ms":
            return _UNTIL_MN if _quiet(tokens[3:]) else _LINE
        noreply_at = 6 if verb == b"cas" else 5
        return _NONE if len(tokens) > noreply_at and tokens[noreply_at] == b"noreply" else _LINE

    def _check_keys(self, keys: list[bytes]) -> None:
        for key in keys:
            if len(key) > _MAX_KEY:
                raise _Degrade("key over 250 bytes")

    def _command_done(self) -> None:
        """A storage command's data block has arrived."""
        answer, self._answer_next = self._answer_next, _LINE
        self._queue(answer, False)

    def _queue(self, answer: int, closes_group: bool) -> None:
        group = self._group
        if group is not None or answer == _UNTIL_MN:
            # Inside a group every reply, whatever its command, waits for the closing MN.
            if group is None:
                group = self._group = _Pending(self._c2s.position, _UNTIL_MN)
                self._push(group)
            group.end = self._c2s.position
            if closes_group:
                self._group = None
            return
        self._push(_Pending(self._c2s.position, answer))
        self._settle_silent()

    def _push(self, pending: _Pending) -> None:
        if len(self._pending) >= MAX_PENDING:
            raise _Degrade(f"more than {MAX_PENDING} commands wait for their replies")
        self._pending.append(pending)

    # --- server side ------------------------------------------------------------------

    def _reply_line(self, text: bytes) -> None:
        pending = self._pending
        if not pending or pending[0].answer == _NONE:
            raise _Degrade("a reply without a command")
        head = pending[0]
        word = text.split(b" ", 1)[0]
        if word in (b"VALUE", b"VA"):
            tokens = text.split()
            size = tokens[3] if word == b"VALUE" and len(tokens) >= 4 else b""
            if word == b"VA" and len(tokens) >= 2:
                size = tokens[1]
            if not size.isdigit() or len(size) > 13:
                raise _Degrade(f"malformed {word.decode()} line")
            if word == b"VALUE" and head.answer not in (_UNTIL_END, _UNTIL_MN):
                raise _Degrade("VALUE outside a retrieval reply")
            self._block(self._s2c, int(size))
            self._block_word = word
            self._in_reply = True
            return
        if head.answer == _UNTIL_END:
            if word == b"STAT" or (word == b"ITEM" and self._in_reply):
                self._in_reply = True
                return
            if word in (b"END", b"RESET", b"OK") or word in _ERROR_LINES:
                self._reply_done()
                return
            raise _Degrade(f"unexpected line {word[:32]!r} in a retrieval reply")
        if head.answer == _STATS:
            self._in_reply = True
            if word in (b"END", b"RESET", b"OK") or word in _ERROR_LINES:
                self._reply_done()
            return
        if head.answer == _UNTIL_MN:
            if word == b"MN" and self._group is not head:
                self._reply_done()
            return
        self._reply_done()

    def _block_done(self) -> None:
        """A reply's data block has arrived: a VA ends its reply, a VALUE does not."""
        head = self._pending[0]
        if self._block_word == b"VA" and head.answer == _LINE:
            self._reply_done()

    def _reply_done(self) -> None:
        self._in_reply = False
        done = self._pending.popleft()
        self._boundaries += 1
        self._fresh = FreshPoint(done.end, self._s2c.position)
        self._settle_silent()

    def _settle_silent(self) -> None:
        """Commands without a reply are answered once every command before them is."""
        pending = self._pending
        changed = False
        while pending and pending[0].answer == _NONE and not self._s2c_mid_reply():
            done = pending.popleft()
            self._fresh = FreshPoint(done.end, self._s2c.position)
            changed = True
        if changed:
            self._boundaries += 1

    def _s2c_mid_reply(self) -> bool:
        side = self._s2c
        return bool(side.line) or side.payload > 0 or side.crlf > 0 or self._in_reply


def _quiet(flags: list[bytes]) -> bool:
    return any(flag[:1] == b"q" for flag in flags)
