"""RESP2/RESP3 (redis) codec: the fresh point plus the session state that survives it.

Theory of operation: a redis connection is not fresh between two commands the way an HTTP
connection is. AUTH, HELLO, SELECT, CLIENT SETNAME... change the connection's *session* and
stay in force, so a replay starting after them would run the next commands as another user, in
another database, speaking another protocol version. This codec therefore reports, with each
fresh point, the *session state*: the raw bytes of the session commands still in force, in
order (``FreshPoint.state``). A new server replays that state first (its replies are read and
dropped, ``StateReplies``), then the client's bytes from the fresh point on. The log the
client keeps stays as short as the unanswered commands, whatever the connection's age.

Client side (c2s): commands are RESP arrays of bulk strings (``*2\\r\\n$3\\r\\nGET\\r\\n...``) or
inline lines (``PING\\r\\n``); a blank inline line and an empty array are no command (redis does
not answer them). Bulk payloads are counted, never buffered, except the first bytes of the
first few arguments (to classify the command) and the whole command when it is a session
command (at most ``MAX_STATE_BYTES``).

Server side (s2c): every RESP2 and RESP3 type is followed: simple strings, errors, integers,
bulk strings, arrays, null, doubles, booleans, blob errors, verbatim strings, big numbers,
maps, sets, attributes (``|``, which precede a reply and are not one), pushes (``>``, out of
band: they answer nothing) and streamed strings and aggregates (``$?``, ``*?``...). Each
top-level reply answers the oldest command waiting; nesting is a stack of counters, so a huge
aggregate count costs no memory.

Fresh points: after a command is answered, the point just after that command (c2s) and just
after its reply (s2c) is fresh unless the connection is inside a transaction or a watch: from
MULTI or WATCH to the reply of EXEC, DISCARD (or UNWATCH, RESET) no fresh point is claimed, so a
transaction is replayed whole or not at all. CLIENT CACHING and ASKING bind the next command:
no fresh point between the two. A session command counts only if its reply is not an error;
inside a transaction it takes effect with a successful EXEC. The later of two commands that set
the same thing (AUTH, SELECT, CLIENT SETNAME, READONLY/READWRITE, ...) replaces the earlier;
CLIENT TRACKING OFF drops the tracking commands; RESET drops the whole state.

Write commands need nothing special: a command is replayed only while it is after the fresh
point, i.e. unanswered (or answered but not yet acknowledged by the client, which is why the
service's replicas must hold equal data by their own replication).

Blocking commands (BLPOP, BRPOP, BLMOVE, BZPOPMIN, XREAD BLOCK, WAIT, ...) are ordinary
commands here: while unanswered they are replayed and block again at the new server.

Not replayable, declared at once in ``unreplayable`` (the connection cannot migrate): SUBSCRIBE,
PSUBSCRIBE, SSUBSCRIBE and MONITOR (the server pushes what other clients cause), SYNC/PSYNC (a
replication stream), CLIENT REPLY (commands without replies) and CLIENT TRACKING without BCAST
(the old server knows which keys the client caches; invalidations would be lost).

What the codec cannot follow (malformed RESP, a reply without a command, more than
``MAX_PENDING`` unanswered commands, a session state over ``MAX_STATE_BYTES``) *degrades* it, as
for HTTP: the fresh point and state stop moving. Bad input never raises.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from migrate.codec import CodecReport, FreshPoint
from migrate.errors import MalformedMessageError

MAX_STATE_BYTES: Final = 768
"""Largest session state carried in a checkpoint; a checkpoint travels in one segment."""

MAX_PENDING: Final = 16384
"""Most commands that may wait for their replies; one more degrades the codec."""

MAX_LINE_BYTES: Final = 64 * 1024
"""Longest inline command or reply line followed (redis's own inline limit is 64 KiB)."""

MAX_DEPTH: Final = 1024
"""Deepest nesting of reply aggregates followed."""

MAX_HELD_BYTES: Final = 64 * 1024
"""Most bytes of session commands held while they wait for their replies or for EXEC."""

_HEADER_BYTES = 24  # "*" or "$" and a count: 20 digits and a sign fit
_ARGS_KEPT = 6  # arguments kept to classify a command (XREAD COUNT n BLOCK ms...)
_ARG_BYTES = 32  # bytes kept of each of them
_MAX_BULK = 1 << 48  # a larger bulk length is not RESP from a real peer

# Session commands: each sets one thing; the later one of the same kind replaces the earlier.
_REPLACING = frozenset(
    {
        "auth",
        "select",
        "readmode",
        "setname",
        "no-evict",
        "no-touch",
        "lib-name",
        "lib-ver",
    }
)
_UNREPLAYABLE = {
    b"SUBSCRIBE": "SUBSCRIBE (the server pushes what other clients publish)",
    b"PSUBSCRIBE": "PSUBSCRIBE (the server pushes what other clients publish)",
    b"SSUBSCRIBE": "SSUBSCRIBE (the server pushes what other clients publish)",
    b"MONITOR": "MONITOR (the server pushes what other clients do)",
    b"SYNC": "SYNC (a replication stream)",
    b"PSYNC": "PSYNC (a replication stream)",
}


class _Degrade(Exception):
    """Internal: the stream left what the codec can follow. Never escapes a ``feed_*`` call."""


class _Unreplayable(Exception):
    """Internal: the connection uses something a new server cannot re-create."""


class Command:
    """One parsed command: what the codec needs of it, not its bytes (unless session state)."""

    __slots__ = ("args", "end", "raw")

    def __init__(self, args: list[bytes] | None = None, end: int = 0) -> None:
        self.args = [] if args is None else args  # the first bytes of the first arguments
        self.raw: bytearray | None = bytearray()  # kept while it may be session state
        self.end = end

    @property
    def name(self) -> bytes:
        return self.args[0].upper() if self.args else b""

    def arg(self, k: int) -> bytes:
        return self.args[k].upper() if k < len(self.args) else b""


@dataclass(slots=True)
class _Pending:
    end: int  # c2s position just after the command
    held: bool  # no fresh point just after it (a transaction, watch or binding is open)
    kind: str | None  # its session kind, or None
    raw: bytes  # its bytes, when a session command
    resets: bool  # RESET
    queued: bool  # inside MULTI: a session command takes effect with EXEC
    exec_: bool  # EXEC: applies the queued session commands if it succeeds
    ends_txn: bool  # EXEC, DISCARD or RESET: queued session commands are settled


def _session_kind(command: Command) -> str | None:
    """The kind of session state a command sets, or None for an ordinary command.

    Raises ``_Unreplayable`` for a command whose effect a new server cannot re-create.
    """
    name = command.name
    if name in _UNREPLAYABLE:
        raise _Unreplayable(_UNREPLAYABLE[name])
    if name in (b"AUTH", b"SELECT"):
        return name.decode().lower()
    if name == b"HELLO":
        return "hello"
    if name in (b"READONLY", b"READWRITE"):
        return "readmode"
    if name != b"CLIENT":
        return None
    sub = command.arg(1)
    if sub == b"SETNAME":
        return "setname"
    if sub in (b"NO-EVICT", b"NO-TOUCH"):
        return sub.decode().lower()
    if sub == b"SETINFO":
        return command.arg(2).decode("ascii", "replace").lower()
    if sub == b"REPLY":
        raise _Unreplayable("CLIENT REPLY (commands without replies)")
    if sub == b"TRACKING":
        if command.arg(2) == b"OFF":
            return "tracking-off"
        if b"BCAST" not in (command.arg(k) for k in range(3, len(command.args))):
            raise _Unreplayable(
                "CLIENT TRACKING without BCAST (the old server knows the cached keys)"
            )
        return "tracking"
    return None


class _CommandReader:
    """Parses client commands, calling ``done(command)`` for each complete one."""

    __slots__ = (
        "arg",
        "args_left",
        "bulk_left",
        "command",
        "done",
        "line",
        "position",
        "start",
        "state",
    )

    # States.
    START, ARRAY, BULK_HEADER, BULK, BULK_END, INLINE = range(6)

    def __init__(self, start: int, done: Callable[[Command], None]) -> None:
        self.position = start  # absolute position of the next byte fed
        self.start = start  # where the command being read began
        self.done = done
        self.state = self.START
        self.line = bytearray()
        self.command = Command()
        self.arg = -1  # index of the bulk argument being read
        self.args_left = 0
        self.bulk_left = 0

    def feed(self, view: memoryview) -> None:
        i, n = 0, len(view)
        # Whole commands within one chunk, the common case, are parsed in one go.
        data = bytes(view) if n <= _FAST_CHUNK else None
        try:
            while i < n:
                state = self.state
                if state == self.START:
                    self.start = self.position + i
                    whole = _whole_command(data, i) if data is not None else None
                    if whole is not None:
                        end, args = whole
                        command = Command(args, self.position + end)
                        command.raw = bytearray(view[i:end]) if end - i <= MAX_STATE_BYTES else None
                        self.command = command
                        i = end
                        self.done(self.command)
                        continue
                    self.command = Command()
                    self.arg = -1
                    self.state = self.ARRAY if view[i] == 0x2A else self.INLINE
                elif state == self.BULK:
                    i = self.bulk(view, i, n)
                elif state == self.INLINE:
                    i = self.inline(view, i, n)
                elif state == self.BULK_END:
                    i = self.bulk_end(view, i)
                else:
                    i = self.header(view, i, n)
        finally:
            self.position += i

    def keep(self, data: bytes | memoryview) -> None:
        """Keep the command's bytes while it may be a session command and is small."""
        raw = self.command.raw
        if raw is not None:
            if len(raw) + len(data) > MAX_STATE_BYTES:
                self.command.raw = None
            else:
                raw += data

    def header(self, view: memoryview, i: int, n: int) -> int:
        """``*count`` or ``$length``, up to its CRLF."""
        line = self.line
        chunk = bytes(view[i : min(n, i + _HEADER_BYTES + 1 - len(line))])
        lf = chunk.find(b"\n")
        if lf != -1:
            chunk = chunk[: lf + 1]
        line += chunk
        self.keep(chunk)
        end = i + len(chunk)
        if lf == -1:
            if len(line) > _HEADER_BYTES:
                raise _Degrade("malformed multibulk header")
            return end
        text = bytes(line)
        line.clear()
        if len(text) < 4 or text[-2] != 13:
            raise _Degrade("malformed multibulk header")
        count = _number(text[1:-2])
        if self.state == self.ARRAY:
            if count is None or count >= 1 << 31:
                raise _Degrade("invalid multibulk length")
            if count <= 0:  # redis ignores an empty array: no command, no reply
                self.command_done(None)
            else:
                self.args_left = count
                self.state = self.BULK_HEADER
            return end
        if text[0] != 0x24:
            raise _Degrade("expected '$' in a multibulk command")
        if count is None or not 0 <= count < _MAX_BULK:
            raise _Degrade("invalid bulk length")
        self.arg += 1
        command = self.command
        if self.arg == 1 and not _may_be_state(command.args[0]):
            command.raw = None
        if self.arg < _ARGS_KEPT:
            command.args.append(b"")
        self.bulk_left = count
        self.state = self.BULK if count else self.BULK_END
        return end

    def bulk(self, view: memoryview, i: int, n: int) -> int:
        taken = min(self.bulk_left, n - i)
        chunk = view[i : i + taken]
        args = self.command.args
        if self.arg < _ARGS_KEPT and len(args[-1]) < _ARG_BYTES:
            args[-1] += bytes(chunk[: _ARG_BYTES - len(args[-1])])
        self.keep(chunk)
        self.bulk_left -= taken
        if self.bulk_left == 0:
            self.state = self.BULK_END
        return i + taken

    def bulk_end(self, view: memoryview, i: int) -> int:
        expected = 13 if not self.line else 10
        if view[i] != expected:
            raise _Degrade("bulk string not followed by CRLF")
        self.keep(view[i : i + 1])
        if expected == 13:
            self.line.append(13)
            return i + 1
        self.line.clear()
        self.args_left -= 1
        if self.args_left == 0:
            self.command_done(self.position + i + 1)
        else:
            self.state = self.BULK_HEADER
        return i + 1

    def inline(self, view: memoryview, i: int, n: int) -> int:
        line = self.line
        chunk = bytes(view[i : min(n, i + MAX_LINE_BYTES + 1 - len(line))])
        lf = chunk.find(b"\n")
        if lf == -1:
            line += chunk
            if len(line) > MAX_LINE_BYTES:
                raise _Degrade("inline command over 64 KiB")
            return i + len(chunk)
        line += chunk[: lf + 1]
        text = bytes(line)
        line.clear()
        end = i + lf + 1
        words = text.split()
        if not words:  # a blank line: redis answers nothing
            self.command_done(None)
            return end
        if b'"' in text or b"'" in text:
            # redis splits inline arguments with quotes and escapes; not followed here.
            raise _Degrade("inline command with quotes")
        self.command.args = [word[:_ARG_BYTES] for word in words[:_ARGS_KEPT]]
        self.command.raw = bytearray(text) if len(text) <= MAX_STATE_BYTES else None
        self.command_done(self.position + end)
        return end

    def command_done(self, end: int | None) -> None:
        """The command ended at ``end`` (None: there was no command, nothing answers it)."""
        self.state = self.START
        if end is not None:
            self.command.end = end
            self.done(self.command)


_FAST_CHUNK = 1 << 16  # chunks up to this size are copied once for the fast paths


def _whole_command(data: bytes, i: int) -> tuple[int, list[bytes]] | None:
    """A multibulk command wholly in ``data`` from ``i``: its end and kept arguments.

    None when it is not whole, or anything is unusual: the byte-wise reader then decides, so
    both paths always agree."""
    if data[i] != 0x2A:
        return None
    lf = data.find(b"\r\n", i, i + _HEADER_BYTES)
    if lf == -1:
        return None
    count = _number(data[i + 1 : lf])
    if count is None or not 0 < count <= 64:
        return None
    p = lf + 2
    args: list[bytes] = []
    for k in range(count):
        if data[p : p + 1] != b"$":
            return None
        lf = data.find(b"\r\n", p, p + _HEADER_BYTES)
        if lf == -1:
            return None
        length = _number(data[p + 1 : lf])
        if length is None or length < 0:
            return None
        start = lf + 2
        end = start + length
        if data[end : end + 2] != b"\r\n":
            return None
        if k < _ARGS_KEPT:
            args.append(data[start : start + min(length, _ARG_BYTES)])
        p = end + 2
    return p, args


def _whole_reply(data: bytes, i: int) -> tuple[int, int] | None:
    """A simple string, error, integer or bulk string reply wholly in ``data`` from ``i``: its
    end and type. None when not whole or unusual (the byte-wise reader decides)."""
    kind = data[i]
    if kind in (0x2B, 0x2D, 0x3A):
        lf = data.find(b"\n", i + 1, i + 1024)
        if lf == -1 or data[lf - 1] != 13:
            return None
        return lf + 1, kind
    if kind != 0x24:
        return None
    lf = data.find(b"\n", i + 1, i + _HEADER_BYTES)
    if lf == -1 or data[lf - 1] != 13:
        return None
    count = _number(data[i + 1 : lf - 1])
    if count is None or count < -1:
        return None
    if count == -1:
        return lf + 1, _NULL
    end = lf + 1 + count
    if data[end : end + 2] != b"\r\n":
        return None
    return end + 2, kind


def _may_be_state(name: bytes) -> bool:
    return name.upper() in (
        b"AUTH",
        b"HELLO",
        b"SELECT",
        b"READONLY",
        b"READWRITE",
        b"CLIENT",
    )


def _number(text: bytes) -> int | None:
    """A RESP integer as redis reads one (string2ll): an optional minus, then 0 or 1 to 20
    digits without a leading zero; anything else (``+1``, ``01``, spaces) is not one."""
    digits = text[1:] if text[:1] == b"-" else text
    if not 1 <= len(digits) <= 20 or not digits.isdigit() or not digits.isascii():
        return None
    if digits[0] == 0x30 and (len(digits) > 1 or len(text) > 1):
        return None
    return int(text)


# --- replies ------------------------------------------------------------------------------

_LINE_TYPES = frozenset(b"+-:_,#(")  # one line each
_BLOB_TYPES = frozenset(b"$!=")  # a length, then that many bytes and CRLF
_AGGREGATES = {0x2A: 1, 0x7E: 1, 0x3E: 1, 0x25: 2, 0x7C: 2}  # * ~ > : elements; % | : pairs
_NUMERIC = _BLOB_TYPES | frozenset(_AGGREGATES) | frozenset(b";")
_NULL = 0x5F  # "_": what a RESP2 null ($-1, *-1) counts as
_ERRORS = frozenset(b"-!")
_STREAMED = -1  # the remaining count of a streamed aggregate (ends with ".")


class _ReplyReader:
    """Parses replies, calling ``answered(kind, end)`` for each top-level reply.

    ``kind`` is the reply's type byte (``_NULL`` for a RESP2 null). Pushes and attributes
    answer nothing. ``stop`` makes ``feed`` return just after the reply that set it.
    """

    __slots__ = (
        "answered",
        "blob_kind",
        "blob_left",
        "kind",
        "line",
        "line_length",
        "position",
        "stack",
        "start",
        "state",
        "stop",
        "streamed",
    )

    LINE, BLOB, BLOB_END = range(3)

    def __init__(self, start: int, answered: Callable[[int, int], None]) -> None:
        self.position = start
        self.start = start  # where the reply being read began
        self.answered = answered
        self.state = self.LINE
        self.line = bytearray()  # a numeric line's bytes (up to _HEADER_BYTES)
        self.line_length = 0
        self.kind = 0  # type byte of the line being read (0: not begun)
        self.blob_left = 0
        self.blob_kind = 0
        self.streamed = False  # inside a streamed string ($?): chunks ;n follow
        self.stack: list[list[int]] = []  # [type, remaining] of each open aggregate
        self.stop = False

    def feed(self, view: memoryview) -> int:
        """Consume ``view``; return how many bytes were consumed (all, unless stopped)."""
        i, n = 0, len(view)
        self.stop = False
        data = bytes(view) if n <= _FAST_CHUNK else None
        try:
            while i < n and not self.stop:
                if self.state == self.LINE:
                    if data is not None and self.kind == 0 and not self.stack and not self.streamed:
                        whole = _whole_reply(data, i)
                        if whole is not None:
                            self.start = self.position + i
                            i = whole[0]
                            self.value_done(whole[1], self.position + i)
                            continue
                    i = self.read_line(view, i, n)
                elif self.state == self.BLOB:
                    taken = min(self.blob_left, n - i)
                    i += taken
                    self.blob_left -= taken
                    if self.blob_left == 0:
                        self.state = self.BLOB_END
                        self.line_length = 0
                else:
                    if view[i] != (13 if self.line_length == 0 else 10):
                        raise _Degrade("bulk reply not followed by CRLF")
                    i += 1
                    self.line_length += 1
                    if self.line_length == 2:
                        self.state = self.LINE
                        if not self.streamed:
                            self.value_done(self.blob_kind, self.position + i)
        finally:
            self.position += i
        return i

    def read_line(self, view: memoryview, i: int, n: int) -> int:
        if self.kind == 0:
            if not self.stack and not self.streamed:
                self.start = self.position + i
            self.kind = view[i]
            self.line_length = 0
            self.line.clear()
            if self.streamed and self.kind != 0x3B:
                raise _Degrade("streamed string chunk without ';'")
            if self.kind not in _LINE_TYPES and self.kind not in _NUMERIC and self.kind != 0x2E:
                raise _Degrade(f"unknown reply type byte {self.kind:#04x}")
        numeric = self.kind in _NUMERIC
        limit = _HEADER_BYTES if numeric else MAX_LINE_BYTES
        chunk = bytes(view[i : min(n, i + limit + 1 - self.line_length)])
        lf = chunk.find(b"\n")
        if lf != -1:
            chunk = chunk[: lf + 1]
        self.line_length += len(chunk)
        if numeric or self.kind == 0x2E:
            self.line += chunk
        else:
            self.line[:] = (bytes(self.line) + chunk)[-2:]  # only the CR before LF matters
        end = i + len(chunk)
        if lf == -1:
            if self.line_length > limit:
                raise _Degrade("reply line too long")
            return end
        if len(self.line) < 2 or self.line[-2] != 13:
            raise _Degrade("reply line not ended by CRLF")
        kind, self.kind = self.kind, 0
        self.line_done(kind, bytes(self.line[:-2]), self.position + end)
        return end

    def line_done(self, kind: int, text: bytes, end: int) -> None:
        if kind in _LINE_TYPES:
            if kind == _NULL and self.line_length != 3:
                raise _Degrade("malformed null reply")
            self.value_done(kind, end)
            return
        if kind == 0x2E:  # ".": the end of a streamed aggregate
            if text != b"." or not self.stack or self.stack[-1][1] != _STREAMED:
                raise _Degrade("unexpected end of a streamed aggregate")
            self.value_done(self.stack.pop()[0], end)
            return
        if text[1:] == b"?":
            if kind in (0x24, 0x2A, 0x7E, 0x25, 0x7C, 0x3E) and not self.streamed:
                if kind == 0x24:
                    self.streamed = True
                else:
                    self.open(kind, _STREAMED)
                return
            raise _Degrade("malformed streamed reply")
        count = _number(text[1:])
        if count is None or count < -1 or count >= _MAX_BULK:
            raise _Degrade("malformed reply length")
        if kind == 0x3B:  # ";": one chunk of a streamed string
            if count == -1:
                raise _Degrade("malformed streamed string chunk")
            if count == 0:
                self.streamed = False
                self.value_done(0x24, end)
            else:
                self.blob_left = count
                self.state = self.BLOB
                self.line_length = 0
            return
        if count == -1:
            if kind not in (0x24, 0x2A):
                raise _Degrade("null length outside RESP2 bulk strings and arrays")
            self.value_done(_NULL, end)
        elif kind in _BLOB_TYPES:
            self.blob_left = count
            self.blob_kind = kind
            self.state = self.BLOB if count else self.BLOB_END
            self.line_length = 0
        elif count == 0:
            self.value_done(kind, end)
        else:
            self.open(kind, count * _AGGREGATES[kind])

    def open(self, kind: int, remaining: int) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise _Degrade(f"replies nested deeper than {MAX_DEPTH}")
        self.stack.append([kind, remaining])

    def value_done(self, kind: int, end: int) -> None:
        """A value of type ``kind`` ended at ``end``: count it in its aggregate, or answer."""
        stack = self.stack
        while stack:
            if kind == 0x7C:  # an attribute is not an element of what holds it
                return
            frame = stack[-1]
            if frame[1] == _STREAMED:
                return
            frame[1] -= 1
            if frame[1]:
                return
            stack.pop()
            kind = frame[0]
        if kind not in (0x7C, 0x3E):  # attributes precede a reply; pushes are out of band
            self.answered(kind, end)


# --- the codec ----------------------------------------------------------------------------


class RespCodec(CodecReport):
    """RESP2/RESP3: fresh points after answered commands, with the session state in force."""

    name = "resp"

    def __init__(self, *, c2s_start: int = 0, s2c_start: int = 0, state: bytes = b"") -> None:
        self._session: list[tuple[str, bytes]] = [] if not state else _parse_state(state)
        self._state = state  # the session's bytes, joined
        super().__init__(c2s_start, s2c_start, state)
        self._pending: deque[_Pending] = deque()
        self._queued: list[tuple[str, bytes]] = []  # session commands inside MULTI
        self._held_bytes = 0  # bytes of session commands in _pending and _queued
        # What the command stream has opened, as the client sent it (ahead of the replies).
        self._multi = False
        self._watch = False
        self._bind_next = False
        self._c2s = _CommandReader(c2s_start, self._command)
        self._s2c = _ReplyReader(s2c_start, self._answered)

    def feed_c2s(self, data: bytes | memoryview) -> None:
        self._feed(self._c2s.feed, self._c2s, "c2s", data)

    def feed_s2c(self, data: bytes | memoryview) -> None:
        self._feed(self._s2c.feed, self._s2c, "s2c", data)

    def _feed(
        self,
        feed: Callable[[memoryview], object],
        reader: _CommandReader | _ReplyReader,
        direction: str,
        data: bytes | memoryview,
    ) -> None:
        if self._degraded is not None:
            return
        with memoryview(data) as raw, raw.cast("B") as view:
            try:
                feed(view)
            except _Unreplayable as error:
                self._unreplayable = str(error)
                self._stop(f"not replayable: {error}")
            except _Degrade as error:
                what = "command" if direction == "c2s" else "reply"
                self._stop(f"{direction} {what} at byte {reader.start}: {error}")

    def _stop(self, reason: str) -> None:
        self._degraded = reason
        self._pending.clear()
        self._queued.clear()
        self._held_bytes = 0

    def _command(self, command: Command) -> None:
        if len(self._pending) >= MAX_PENDING:
            raise _Degrade(f"more than {MAX_PENDING} commands wait for their replies")
        name = command.name
        kind = _session_kind(command)
        queued = self._multi and name not in (b"EXEC", b"DISCARD", b"MULTI", b"RESET", b"WATCH")
        resets = name == b"RESET"
        ends_txn = name in (b"EXEC", b"DISCARD") or resets
        if name == b"MULTI":
            self._multi = True
        elif name == b"WATCH" and not self._multi:
            self._watch = True
        elif ends_txn or (name == b"UNWATCH" and not self._multi):
            self._multi = self._watch = False
        self._bind_next = name == b"ASKING" or (name == b"CLIENT" and command.arg(1) == b"CACHING")
        raw = bytes(command.raw) if kind is not None and command.raw is not None else b""
        if kind is not None and not raw:
            raise _Degrade(f"session command {name.decode('ascii', 'replace')} too long")
        self._held_bytes += len(raw)
        if self._held_bytes > MAX_HELD_BYTES:
            raise _Degrade(f"over {MAX_HELD_BYTES} bytes of session commands wait")
        self._pending.append(
            _Pending(
                end=command.end,
                held=self._multi or self._watch or self._bind_next,
                kind=kind,
                raw=raw,
                resets=resets,
                queued=queued,
                exec_=name == b"EXEC",
                ends_txn=ends_txn,
            )
        )

    def _answered(self, kind: int, end: int) -> None:
        if not self._pending:
            raise _Degrade("a reply without a command")
        command = self._pending.popleft()
        self._held_bytes -= len(command.raw)
        failed = kind in _ERRORS
        if command.resets and not failed:
            self._session.clear()
            self._state = b""
            self._held_bytes -= sum(len(raw) for _, raw in self._queued)
            self._queued.clear()
        elif command.ends_txn:
            if command.exec_ and kind == 0x2A:  # EXEC's array: the transaction ran
                for queued_kind, raw in self._queued:
                    self._apply(queued_kind, raw)
            self._held_bytes -= sum(len(raw) for _, raw in self._queued)
            self._queued.clear()
        elif command.kind is not None and not failed:
            if command.queued:
                self._queued.append((command.kind, command.raw))
                self._held_bytes += len(command.raw)  # held on until EXEC
            else:
                self._apply(command.kind, command.raw)
        if not command.held:
            self._boundaries += 1
            self._fresh = FreshPoint(command.end, end, self._state)

    def _apply(self, kind: str, raw: bytes) -> None:
        session = self._session
        if kind == "tracking-off":
            session[:] = [entry for entry in session if entry[0] != "tracking"]
        else:
            if kind in _REPLACING:
                session[:] = [entry for entry in session if entry[0] != kind]
            session.append((kind, raw))
        self._state = b"".join(entry[1] for entry in session)
        if len(self._state) > MAX_STATE_BYTES:
            raise _Degrade(f"session state over {MAX_STATE_BYTES} bytes")


def _parse_state(state: bytes) -> list[tuple[str, bytes]]:
    """The session commands of a state a checkpoint carried, each with its kind."""
    if len(state) > MAX_STATE_BYTES:
        raise MalformedMessageError(f"session state over {MAX_STATE_BYTES} bytes")
    commands: list[Command] = []
    reader = _CommandReader(0, commands.append)
    try:
        with memoryview(state) as view:
            reader.feed(view)
        if reader.state != reader.START:
            raise _Degrade("an unfinished command")
        session = []
        for command in commands:
            kind = _session_kind(command)
            if kind is None or command.raw is None:
                raise _Degrade("a command that is not session state")
            session.append((kind, bytes(command.raw)))
    except (_Degrade, _Unreplayable) as error:
        raise MalformedMessageError(f"malformed redis session state: {error}") from None
    return session


class StateReplies:
    """The service's replies to a replayed session state, which the client never sees.

    A new server sends ``FreshPoint.state`` to the service before the client's replay bytes and
    feeds what the service answers here: ``feed`` returns how many of the bytes are replies to
    the state (drop them; the rest is the regenerated stream, from the fresh point on), and
    ``done`` turns True after the last one. An error reply means the service no longer accepts
    the session (a changed password, a missing database): ``refused`` says which, and the
    connection cannot be re-created here.
    """

    def __init__(self, state: bytes) -> None:
        self._left = len(_parse_state(state))
        self.refused: str | None = None
        self._reader = _ReplyReader(0, self._answered)

    @property
    def done(self) -> bool:
        return self._left == 0 or self.refused is not None

    def feed(self, data: bytes | memoryview) -> int:
        if self.done:
            return 0
        with memoryview(data) as raw, raw.cast("B") as view:
            try:
                return self._reader.feed(view)
            except _Degrade as error:
                self.refused = f"malformed reply to the session state: {error}"
                return len(view)

    def _answered(self, kind: int, end: int) -> None:
        self._left -= 1
        if kind in _ERRORS:
            self.refused = "the service refused a session command of the replayed state"
        if self.done:
            self._reader.stop = True
