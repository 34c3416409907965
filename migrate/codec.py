"""Stream codecs: where a connection's replay log may start (ARCHITECTURE.md, "Checkpoints").

Theory of operation: the application state of an unmodified service is the client-to-server
(c2s) bytes it has read. A new server re-creates it by replaying those bytes to a fresh service
instance, so the replay log must reach back to a point where the service's state was that of a
new connection: the *fresh point*, one absolute byte position in each direction. A codec watches
both directions of one connection (bytes in, state out: no I/O, no clock) and says where that
point is, so the log stays small.

* ``GenericCodec`` knows nothing of the protocol: the fresh point is the connection's start,
  forever, and the log holds every byte.
* ``Http11Codec`` follows HTTP/1.1 (and 1.0) message framing (RFC 9112) in both directions. A
  stateless HTTP service is fresh again between two exchanges, so after the ``k``-th exchange
  has completed (its request fully received *and* its response fully sent) the fresh point is
  (end of request ``k`` in c2s, end of response ``k`` in s2c). The c2s end is where request
  ``k + 1`` begins, whether or not it has begun to arrive; empty lines before a request line
  (RFC 9112 section 2.2) belong to that next request. Pipelined requests queue in order; a
  response answers the oldest unanswered request (that request's method decides whether a body
  follows: not after HEAD). Interim 1xx responses (100 Continue) complete nothing. An exchange
  whose response is delimited by the connection's close never completes, and neither does any
  later one: the codec stops parsing and the fresh point stays where it is.

Positions are absolute byte offsets since the connection started. After a migration the new
server resumes mid-connection from a fresh point, ``Http11Codec(c2s_start=..., s2c_start=...)``,
and feeds the replayed bytes from there on.

Bytes arrive in arbitrary chunks, one byte at a time in the worst case, and the result does not
depend on the chunking. The one ordering the caller owes is causality across directions: feed
client bytes before the server bytes that answer them (a relay feeds what it reads before it
forwards it), or a response may find no request and degrade the codec.

Memory is bounded: bodies are counted, never buffered; only an unfinished header section (at
most ``MAX_HEAD_BYTES``), chunk-size line or trailer section is buffered, and at most
``MAX_PIPELINED`` requests may wait for their responses.

Bad input from the network never raises. Whatever the codec cannot follow with certainty
(CONNECT, a 101 Switching Protocols, malformed syntax, ambiguous framing, a header section over
64 KiB, a response without a request) *degrades* it: ``degraded`` says why in one line, and from
then on the codec behaves as generic from its last fresh point, which no longer moves. The codec
only has to be right when it claims a boundary; when it cannot be sure it claims none. Errors
raised are the caller's: a negative position, an unknown codec name.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from migrate.errors import ConfigError

MAX_HEAD_BYTES: Final = 64 * 1024
"""Largest header section (start line, fields and the final empty line), or trailer section, or
chunk-size line, that the HTTP codec follows; a larger one degrades it."""

MAX_PIPELINED: Final = 1024
# Response bodies noted between two ``take_bodies`` (a megabyte chunk of the smallest
# responses with a Content-Length holds fewer).
MAX_BODIES_KEPT: Final = 1 << 16
"""Most requests that may wait for their responses; one more degrades the HTTP codec."""

MAX_INTERIM_KEPT: Final = 8
"""Interim (1xx) response ends the HTTP codec remembers (``Http11Codec.interim_ends``)."""

CODEC_NAMES: Final = ("generic", "http", "resp", "memcached")
"""The codecs a connection may use (and a checkpoint names)."""

CODEC_CHOICES: Final = ("auto", *CODEC_NAMES)
"""What ``--codec`` accepts: ``auto`` picks one of ``CODEC_NAMES`` per connection
(``migrate.autodetect``)."""


@dataclass(frozen=True, slots=True)
class FreshPoint:
    """Where the replay log starts: absolute byte positions in each direction.

    ``c2s`` is where the oldest request not yet fully answered begins; ``s2c`` is where its
    response begins, which is where the previous response ended. ``state`` is what a new
    server must send the service before the client's bytes from ``c2s`` on, to re-create the
    session those bytes expect (redis: AUTH, SELECT...; ``migrate.resp``); empty for a
    protocol whose connections are fresh between exchanges. Its replies are not part of the
    client's stream (``state_replies``).
    """

    c2s: int
    s2c: int
    state: bytes = b""

    def __post_init__(self) -> None:
        if self.c2s < 0 or self.s2c < 0:
            raise ValueError(f"a fresh point has no negative positions: {self.c2s}, {self.s2c}")


@runtime_checkable
class StreamCodec(Protocol):
    """Watches both directions of one connection and says where its fresh point is."""

    name: str

    def feed_c2s(self, data: bytes | memoryview) -> None:
        """The next client-to-server bytes, in order."""

    def feed_s2c(self, data: bytes | memoryview) -> None:
        """The next server-to-client bytes, in order."""

    @property
    def fresh(self) -> FreshPoint:
        """The latest fresh point: the replay log may start here."""

    @property
    def boundaries(self) -> int:
        """Completed request/response exchanges so far; a checkpoint is due when it grows."""

    @property
    def degraded(self) -> str | None:
        """Why the codec stopped advancing the fresh point, or None.

        Still None after a response whose body ends with the connection (plain HTTP/1.0): no
        exchange completes after it, but nothing was wrong either.
        """

    @property
    def unreplayable(self) -> str | None:
        """Why no new server can re-create this connection (e.g. redis SUBSCRIBE), or None.

        Set at once when the client does it, so that the connection is reported unmigratable
        then, not at the next roam; the codec is degraded too.
        """


class CodecReport:
    """What every codec reports (the read-only side of ``StreamCodec``), kept in one place:
    the codecs set ``_fresh``, ``_boundaries``, ``_degraded`` and ``_unreplayable``."""

    def __init__(self, c2s_start: int, s2c_start: int, state: bytes = b"") -> None:
        self._fresh = FreshPoint(c2s_start, s2c_start, state)
        self._boundaries = 0
        self._degraded: str | None = None
        self._unreplayable: str | None = None

    @property
    def fresh(self) -> FreshPoint:
        return self._fresh

    @property
    def boundaries(self) -> int:
        return self._boundaries

    @property
    def degraded(self) -> str | None:
        return self._degraded

    @property
    def unreplayable(self) -> str | None:
        return self._unreplayable


class GenericCodec(CodecReport):
    """Any protocol: the fresh point is where the connection (or the codec) started, forever."""

    name = "generic"

    def __init__(self, *, c2s_start: int = 0, s2c_start: int = 0) -> None:
        super().__init__(c2s_start, s2c_start)

    def feed_c2s(self, data: bytes | memoryview) -> None:
        pass

    def feed_s2c(self, data: bytes | memoryview) -> None:
        pass


def codec_for(
    name: str, *, c2s_start: int = 0, s2c_start: int = 0, state: bytes = b""
) -> StreamCodec:
    """A new codec by its name in configuration and checkpoints (``CODEC_NAMES``), resuming at
    a fresh point with its session ``state`` (from a checkpoint; only redis has one)."""
    # Imported here: the protocol modules import FreshPoint from this one.
    from migrate.memcached import MemcachedCodec
    from migrate.resp import RespCodec

    if state and name != "resp":
        raise ConfigError(f"the {name} codec has no session state")
    if name == "generic":
        return GenericCodec(c2s_start=c2s_start, s2c_start=s2c_start)
    if name == "http":
        return Http11Codec(c2s_start=c2s_start, s2c_start=s2c_start)
    if name == "resp":
        return RespCodec(c2s_start=c2s_start, s2c_start=s2c_start, state=state)
    if name == "memcached":
        return MemcachedCodec(c2s_start=c2s_start, s2c_start=s2c_start)
    raise ConfigError(f"unknown codec {name!r} (known: {', '.join(CODEC_NAMES)})")


class StateReplies(Protocol):
    """Reads the service's replies to a replayed session state (see ``FreshPoint.state``)."""

    @property
    def done(self) -> bool:
        """True once every reply to the state has been read (or one refused it)."""

    @property
    def refused(self) -> str | None:
        """Why the service did not accept the state, or None."""

    def feed(self, data: bytes | memoryview) -> int:
        """The service's next bytes; returns how many of them answer the state (drop those)."""


def state_replies(name: str, state: bytes) -> StateReplies:
    """What reads the replies to ``state`` replayed to a service of codec ``name``."""
    from migrate.resp import StateReplies as RespStateReplies

    if name != "resp":
        raise ConfigError(f"the {name} codec has no session state")
    return RespStateReplies(state)


# --- HTTP/1.1 -----------------------------------------------------------------------------


class _Degrade(Exception):
    """Internal: the stream left what the codec can follow. Never escapes a ``feed_*`` call."""


# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/([0-9]\.[0-9])")
# The reason phrase may be empty and some servers drop the space before it.
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
# Field values: no control characters but HTAB (RFC 9110 section 5.5); OWS is stripped after.
_FIELD = re.compile(rb"(" + _TOKEN + rb"):([\t\x20-\x7e\x80-\xff]*)")
# RFC 9112 section 7.1: chunk-size [ chunk-ext ] CRLF, with BWS before the extensions.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
_END_OF_HEAD = re.compile(rb"\r\n\r\n")
# Every line of a header section after the first, each a valid field ending in CRLF (no
# obs-fold: a token never starts with a space), and the two fields that frame a body.
_FIELD_LINES = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_FRAMING_FIELD = re.compile(
    rb"^(content-length|transfer-encoding):([\t\x20-\x7e\x80-\xff]*)", re.IGNORECASE | re.MULTILINE
)
_LF = re.compile(rb"\n")
# Never valid in a header section: controls other than HTAB, CR and LF.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TCHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_VERSIONS = (b"1.0", b"1.1")

# Reader states.
_HEAD = 0  # buffering a start line and header fields, up to the empty line
_LENGTH = 1  # counting the bytes of a Content-Length body
_CHUNK_LINE = 2  # buffering a chunk-size line
_CHUNK_DATA = 3  # counting the bytes of one chunk
_CHUNK_END = 4  # the CRLF after a chunk's data
_TRAILERS = 5  # buffering the trailer section after the last chunk
_UNTIL_CLOSE = 6  # a body delimited by the connection's close: never ends

# Body framing decided from a header section.
_NO_BODY = 0
_CHUNKED = -1
_UNTIL_CLOSED = -2
_INTERIM = -3  # a 1xx response: another response follows for the same request


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A final response head with a Content-Length body: where the response and its body
    start (absolute s2c positions), the request's method, the header section as received."""

    start: int
    body_start: int
    method: bytes
    section: bytes
    length: int  # the body's (Content-Length)


@dataclass(slots=True)
class _Exchange:
    """One request and, once it comes, its response."""

    method: bytes
    request_end: int | None = None
    response_end: int | None = None


def _head_lines(head: bytes) -> list[bytes]:
    """The lines of a header section that ends with CRLF CRLF, without line terminators."""
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise _Degrade("bare CR or LF in a header section")
    return lines


def _first_line(section: bytes) -> tuple[bytes, list[bytes] | None]:
    """A header section's first line, and its lines if the field lines need checking one by
    one (None: ``_FIELD_LINES`` found them all valid). Raises what ``_head_lines`` raises.

    Most heads are well formed: one match over all their field lines (and, in
    ``_framing``, one search for the two framing fields) decides them without a Python loop
    over every line; anything else goes the line-by-line way, for its exact error."""
    first_end = section.find(b"\r\n")
    first = section[:first_end]
    if (
        b"\r" not in first
        and b"\n" not in first
        and _FIELD_LINES.fullmatch(section, first_end + 2, len(section) - 2)
    ):
        return first, None
    lines = _head_lines(section)
    return lines[0], lines


def _framing(section: bytes, lines: list[bytes] | None) -> tuple[list[bytes], list[bytes] | None]:
    """``_framing_fields`` of a section whose first line ``_first_line`` gave with ``lines``."""
    if lines is not None:
        return _framing_fields(lines[1:])
    found = _FRAMING_FIELD.finditer(section, section.find(b"\r\n") + 2)
    return _framing_of((match[1].lower(), match[2]) for match in found)


def _framing_fields(lines: list[bytes]) -> tuple[list[bytes], list[bytes] | None]:
    """Validate header field lines; return Content-Length elements and transfer codings.

    The codings are None when there is no Transfer-Encoding field.
    """
    return _framing_of(_checked_fields(lines))


def _checked_fields(lines: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Each field line's lower-case name and value; ``_Degrade`` at the first invalid line."""
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 section 5.2: obs-fold; a server may reject it, a proxy may rewrite it.
            raise _Degrade("obsolete line folding in a header field")
        match = _FIELD.fullmatch(line)
        if match is None:
            raise _Degrade("malformed header field")
        yield match[1].lower(), match[2]


def _framing_of(fields: Iterable[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes] | None]:
    """The Content-Length elements and transfer codings among ``fields`` (lower-case name,
    value); the codings are None when there is no Transfer-Encoding field."""
    lengths: list[bytes] = []
    codings: list[bytes] | None = None
    for name, value in fields:
        if name == b"content-length":
            lengths.extend(element.strip(b" \t") for element in value.split(b","))
        elif name == b"transfer-encoding":
            if codings is None:
                codings = []
            for element in value.split(b","):
                coding = element.split(b";", 1)[0].strip(b" \t").lower()
                if coding:
                    codings.append(coding)
    return lengths, codings


def _body_framing(
    lengths: list[bytes], codings: list[bytes] | None, version: bytes, *, request: bool
) -> int:
    """RFC 9112 section 6.3, the rules left once HEAD, 1xx, 204 and 304 are out of the way."""
    if codings is not None:
        if lengths:
            # Allowed to be resolved in favour of chunked, but it is the smuggling signature.
            raise _Degrade("Content-Length together with Transfer-Encoding")
        if version == b"1.0":
            raise _Degrade("Transfer-Encoding in an HTTP/1.0 message")
        if not codings or b"chunked" in codings[:-1]:
            raise _Degrade("malformed Transfer-Encoding")
        if codings[-1] == b"chunked":
            return _CHUNKED
        if request:
            raise _Degrade("request Transfer-Encoding does not end in chunked")
        return _UNTIL_CLOSED
    if lengths:
        values = set()
        for element in lengths:
            if _CONTENT_LENGTH.fullmatch(element) is None:
                raise _Degrade("invalid Content-Length")
            values.add(int(element))
        if len(values) > 1:
            raise _Degrade("conflicting Content-Length values")
        return values.pop()
    return _NO_BODY if request else _UNTIL_CLOSED


# A reader keeps the last head it parsed, up to this size, and what it said: a keep-alive
# connection's requests (and, within a second, its answers: their Date changes each second)
# repeat byte for byte, and the same bytes say the same (``_request_head`` and a status
# head's checks are functions of the section alone; what depends on the exchange, its method
# and whether there is one, is looked at every time). At most this much a direction a
# connection, most often a few hundred bytes.
MAX_KEPT_HEAD_BYTES = 4096

# A status head's checked facts: version, status, framing fields (``_framing``'s).
_StatusHead = tuple[bytes, int, tuple[list[bytes], list[bytes] | None]]


def _request_head(section: bytes) -> tuple[bytes, int]:
    """A request head's method and body framing; ``_Degrade`` for what cannot be followed."""
    first, lines = _first_line(section)
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        raise _Degrade("malformed request line")
    method, version = match[1], match[3]
    if version not in _VERSIONS:
        raise _Degrade(f"unsupported version HTTP/{version.decode()}")
    if method == b"CONNECT":
        raise _Degrade("CONNECT request (a tunnel follows)")
    lengths, codings = _framing(section, lines)
    return method, _body_framing(lengths, codings, version, request=True)


class _Reader:
    """Follows the message framing of one direction; the codec interprets the headers."""

    __slots__ = ("buffer", "crlf_seen", "message_start", "position", "remaining", "state")

    def __init__(self, start: int) -> None:
        self.position = start  # absolute position of the next byte fed
        self.message_start = start
        self.state = _HEAD
        self.buffer = bytearray()
        self.remaining = 0
        self.crlf_seen = 0

    def feed(self, view: memoryview) -> None:
        i = 0
        n = len(view)
        try:
            while i < n:
                state = self.state
                if state in (_LENGTH, _CHUNK_DATA):
                    taken = min(self.remaining, n - i)
                    i += taken
                    self.remaining -= taken
                    if self.remaining == 0:
                        if state == _LENGTH:
                            self.message_done(self.position + i)
                        else:
                            self.state = _CHUNK_END
                            self.crlf_seen = 0
                elif state in (_HEAD, _TRAILERS):
                    i = self.head(view, i, n)
                elif state == _CHUNK_LINE:
                    i = self.chunk_line(view, i, n)
                elif state == _CHUNK_END:
                    if view[i] != (13 if self.crlf_seen == 0 else 10):
                        raise _Degrade("chunk data not followed by CRLF")
                    i += 1
                    self.crlf_seen += 1
                    if self.crlf_seen == 2:
                        self.state = _CHUNK_LINE
                else:  # _UNTIL_CLOSE
                    i = n
        finally:
            self.position += i

    def head(self, view: memoryview, i: int, n: int) -> int:
        """Buffer a header (or trailer) section; parse it once its empty line arrives."""
        buffer = self.buffer
        if self.state == _HEAD and len(buffer) <= 1 and self.blank_lines_allowed():
            # RFC 9112 section 2.2: a server should ignore empty lines before a request line.
            if buffer == b"\r" and view[i] == 10:  # a CR ended the previous chunk
                buffer.clear()
                i += 1
            if not buffer:
                while i + 1 < n and view[i] == 13 and view[i + 1] == 10:
                    i += 2
                if i == n:
                    return i
        held = len(buffer)
        end = -1
        if held:
            # The empty line may straddle the previous chunk and this one.
            tail = bytes(buffer[-3:])
            found = (tail + bytes(view[i : i + 3])).find(b"\r\n\r\n")
            if found != -1:
                end = i + found + 4 - len(tail)
        if end == -1:
            match = _END_OF_HEAD.search(view, i, min(n, i + MAX_HEAD_BYTES - held))
            if match is not None:
                end = match.end()
        if end == -1:
            stop = min(n, i + MAX_HEAD_BYTES - held)
            buffer += view[i:stop]
            self.check_unfinished(held)
            if len(buffer) >= MAX_HEAD_BYTES:
                raise _Degrade("header section over 64 KiB")
            return stop
        if held + end - i > MAX_HEAD_BYTES:
            raise _Degrade("header section over 64 KiB")
        section = bytes(buffer) + bytes(view[i:end])
        buffer.clear()
        position = self.position + end
        if self.state == _TRAILERS:
            _framing_fields(_head_lines(section)[1:])  # the first line is the last chunk's
            self.message_done(position)
            return end
        framing = self.head_done(section, position)
        if framing == _INTERIM:
            self.message_start = position
        elif framing == _NO_BODY:
            self.message_done(position)
        elif framing == _CHUNKED:
            self.state = _CHUNK_LINE
        elif framing == _UNTIL_CLOSED:
            self.state = _UNTIL_CLOSE
            self.until_close()
        else:
            self.state = _LENGTH
            self.remaining = framing
        return end

    def check_unfinished(self, start: int) -> None:
        """Degrade on what the section's parse would reject anyway, without waiting for it.

        Bytes that are not HTTP (TLS, SSH) then cost one check rather than 64 KiB of buffer.
        ``start`` is where the bytes not yet checked begin.
        """
        buffer = self.buffer
        if self.state == _HEAD and start < 5:
            self.check_start(bytes(buffer[:5]))
        if _CONTROL.search(buffer, start) is not None:
            raise _Degrade("control character in a header section")
        lf = buffer.find(b"\n", start)
        while lf != -1:
            if lf == 0 or buffer[lf - 1] != 13:
                raise _Degrade("bare LF in a header section")
            lf = buffer.find(b"\n", lf + 1)

    def chunk_line(self, view: memoryview, i: int, n: int) -> int:
        buffer = self.buffer
        held = len(buffer)
        stop = min(n, i + MAX_HEAD_BYTES - held)
        match = _LF.search(view, i, stop)
        if match is None:
            buffer += view[i:stop]
            if len(buffer) >= MAX_HEAD_BYTES:
                raise _Degrade("chunk-size line over 64 KiB")
            return stop
        end = match.end()
        line = bytes(buffer) + bytes(view[i:end])
        buffer.clear()
        if not line.endswith(b"\r\n"):
            raise _Degrade("bare LF in a chunk-size line")
        size = _CHUNK_SIZE.fullmatch(line, 0, len(line) - 2)
        if size is None:
            raise _Degrade("malformed chunk-size line")
        self.remaining = int(size[1], 16)
        if self.remaining:
            self.state = _CHUNK_DATA
        else:
            # The last chunk's CRLF doubles as the start of the trailer section's empty line.
            self.state = _TRAILERS
            buffer += b"\r\n"
        return end

    def end_message(self, position: int) -> None:
        self.state = _HEAD
        self.message_start = position

    # Overridden by the two directions.

    def blank_lines_allowed(self) -> bool:
        raise NotImplementedError

    def check_start(self, start: bytes) -> None:
        """Degrade if a start line cannot begin with these (up to five) bytes."""
        raise NotImplementedError

    def head_done(self, section: bytes, end: int) -> int:
        """``section`` ends at position ``end`` (where a body would start)."""
        raise NotImplementedError

    def message_done(self, position: int) -> None:
        raise NotImplementedError

    def until_close(self) -> None:
        raise NotImplementedError


class _RequestReader(_Reader):
    __slots__ = ("_last", "codec", "exchange")

    def __init__(self, codec: Http11Codec, start: int) -> None:
        super().__init__(start)
        self.codec = codec
        self.exchange: _Exchange | None = None
        # The last head parsed and what it said (``MAX_KEPT_HEAD_BYTES``).
        self._last: tuple[bytes, tuple[bytes, int]] | None = None

    def blank_lines_allowed(self) -> bool:
        return True

    def check_start(self, start: bytes) -> None:
        if start[0] not in _TCHARS and start != b"\r":
            raise _Degrade("malformed request line")

    def head_done(self, section: bytes, end: int) -> int:
        last = self._last
        if last is not None and last[0] == section:
            method, framing = last[1]
        else:
            method, framing = _request_head(section)
            if len(section) <= MAX_KEPT_HEAD_BYTES:
                self._last = (section, (method, framing))
        self.exchange = self.codec._request_started(method)
        return framing

    def message_done(self, position: int) -> None:
        self.end_message(position)
        exchange, self.exchange = self.exchange, None
        assert exchange is not None
        exchange.request_end = position
        self.codec._retire()

    def until_close(self) -> None:
        raise AssertionError("a request body is never delimited by the connection's close")


class _ResponseReader(_Reader):
    __slots__ = ("_last", "codec")

    def __init__(self, codec: Http11Codec, start: int) -> None:
        super().__init__(start)
        self.codec = codec
        self._last: tuple[bytes, _StatusHead] | None = None  # as _RequestReader's

    def blank_lines_allowed(self) -> bool:
        return False

    def check_start(self, start: bytes) -> None:
        if not b"HTTP/".startswith(start):
            raise _Degrade("malformed status line")

    def head_done(self, section: bytes, end: int) -> int:
        last = self._last
        framed: tuple[list[bytes], list[bytes] | None] | None = None
        if last is not None and last[0] == section:
            version, status, framed = last[1]
            lines = None
        else:
            first, lines = _first_line(section)
            match = _STATUS_LINE.fullmatch(first)
            if match is None:
                raise _Degrade("malformed status line")
            version, status = match[1], int(match[2])
            if version not in _VERSIONS:
                raise _Degrade(f"unsupported version HTTP/{version.decode()}")
            if status < 100:
                raise _Degrade(f"invalid status code {status}")
        exchange = self.codec._unanswered()
        if exchange is None:
            raise _Degrade("response without a request")
        if status == 101:
            raise _Degrade("101 Switching Protocols (another protocol follows)")
        if framed is None:
            framed = _framing(section, lines)
            if len(section) <= MAX_KEPT_HEAD_BYTES:
                self._last = (section, (version, status, framed))
        lengths, codings = framed
        if status < 200:
            self.codec.interim_ends.append(end)
            return _INTERIM
        if exchange.method == b"HEAD" or status in (204, 304):
            return _NO_BODY
        framing = _body_framing(lengths, codings, version, request=False)
        if framing > 0:
            codec = self.codec
            codec.last_head = ResponseHead(
                self.message_start, end, exchange.method, section, framing
            )
            codec.heads += 1
            if len(codec.bodies) >= MAX_BODIES_KEPT:
                del codec.bodies[: MAX_BODIES_KEPT // 2]
            codec.bodies.append((end, framing))
        return framing

    def message_done(self, position: int) -> None:
        self.end_message(position)
        self.codec._response_done(position)

    def until_close(self) -> None:
        self.codec._stalled = True


class Http11Codec(CodecReport):
    """HTTP/1.1 and HTTP/1.0: the fresh point follows completed request/response exchanges."""

    name = "http"

    def __init__(self, *, c2s_start: int = 0, s2c_start: int = 0) -> None:
        super().__init__(c2s_start, s2c_start)
        # A response whose end is the connection's close: no exchange completes any more.
        self._stalled = False
        # Requests whose exchange has not completed, oldest first; the first ``_answered``
        # have their response (they wait for the rest of their own bytes).
        self._exchanges: deque[_Exchange] = deque()
        self._answered = 0
        self._c2s = _RequestReader(self, c2s_start)
        self._s2c = _ResponseReader(self, s2c_start)
        # The latest final response head with a Content-Length body, and how many there were
        # (``migrate.streamstate`` looks for the range facts of a response in it).
        self.last_head: ResponseHead | None = None
        self.heads = 0
        # (start, length) of each Content-Length response body whose head ended since the
        # last ``take_bodies`` (migrate.streamstate hashes body bytes without looking in them
        # for Date headers; it takes them after each feed, so they hold one chunk's at most,
        # fewer than the bound; a user that never takes them loses the oldest).
        self.bodies: list[tuple[int, int]] = []
        # Where the latest interim (1xx) responses ended, absolute s2c positions: a whole
        # service message ends there, though no exchange does (a 100 Continue before an
        # upload's body; proxy.replay may splice a young connection there).
        self.interim_ends: deque[int] = deque(maxlen=MAX_INTERIM_KEPT)

    def body_ahead(self) -> int:
        """How many of the next service bytes are the rest of a Content-Length body."""
        reader = self._s2c
        if self._degraded is not None or reader.state != _LENGTH:
            return 0
        return reader.remaining

    def take_bodies(self) -> list[tuple[int, int]]:
        """The Content-Length bodies whose heads ended since the last call (start, length)."""
        bodies, self.bodies = self.bodies, []
        return bodies

    def resume_body(self, position: int, remaining: int) -> None:
        """Continue in the body of the response to the oldest unanswered request, at s2c
        ``position`` with ``remaining`` body bytes to come: a connection re-created from a
        range (``migrate.rangeplan``), whose response head this codec never saw. Its request
        must have been fed."""
        reader = self._s2c
        if self._unanswered() is None or reader.state != _HEAD or reader.buffer:
            raise ValueError("a response body is resumed only where a response is due")
        if remaining <= 0:
            raise ValueError("a resumed body has bytes to come")
        reader.position = position
        reader.state = _LENGTH
        reader.remaining = remaining

    def skip_body(self, count: int) -> None:
        """Pass over ``count`` bytes of the Content-Length body under way without seeing them
        (a stream resumed from a range moving further into the same body); at least one of
        its bytes stays to come."""
        reader = self._s2c
        if reader.state != _LENGTH or not 0 <= count < reader.remaining:
            raise ValueError("only bytes inside a Content-Length body under way are skipped")
        reader.position += count
        reader.remaining -= count

    def feed_c2s(self, data: bytes | memoryview) -> None:
        self._feed(self._c2s, "c2s", data)

    def feed_s2c(self, data: bytes | memoryview) -> None:
        self._feed(self._s2c, "s2c", data)

    def _feed(self, reader: _Reader, direction: str, data: bytes | memoryview) -> None:
        if self._degraded is not None or self._stalled:
            return
        with memoryview(data) as raw, raw.cast("B") as view:
            try:
                reader.feed(view)
            except _Degrade as error:
                self._degraded = f"{direction} message at byte {reader.message_start}: {error}"
                self._exchanges.clear()
                self._answered = 0

    def _request_started(self, method: bytes) -> _Exchange:
        if len(self._exchanges) >= MAX_PIPELINED:
            raise _Degrade(f"more than {MAX_PIPELINED} requests wait for their responses")
        exchange = _Exchange(method)
        self._exchanges.append(exchange)
        return exchange

    def _unanswered(self) -> _Exchange | None:
        if self._answered < len(self._exchanges):
            return self._exchanges[self._answered]
        return None

    def _response_done(self, position: int) -> None:
        self._exchanges[self._answered].response_end = position
        self._answered += 1
        self._retire()

    def _retire(self) -> None:
        """Complete every exchange at the front whose request and response have both ended."""
        exchanges = self._exchanges
        while exchanges and self._answered:
            first = exchanges[0]
            if first.request_end is None or first.response_end is None:
                return
            exchanges.popleft()
            self._answered -= 1
            self._boundaries += 1
            self._fresh = FreshPoint(first.request_end, first.response_end)
