"""Regeneration from the client's position: an HTTP response re-created with ``Range``.

Theory of operation (ARCHITECTURE.md, "Regenerate from where the client is"): a new server
re-creates a connection by replaying the client's request to a fresh service connection and
reading the answer up to the client's position. For a client 200 MiB into a download that is
200 MiB read and hashed before the hand-over can be answered. When the response being sent has
a *strong validator* (an entity tag not marked weak, or a Last-Modified date at least a second
before the response's Date, RFC 9110 8.8.2.2 and 13.1.5) and the service announced byte ranges
(``Accept-Ranges: bytes``), the old server records in its checkpoint a ``RangeRecord``: the
validator, the body's length and start, and the SHA-256 of a *window* of the body just before
the checkpoint's position (``WINDOW_BYTES``). The new server then

1. replays the client's request rewritten with ``Range: bytes=N-`` and ``If-Range: <validator>``
   (``plan``), ``N`` the body offset of the window's start or of the client's position,
   whichever is earlier;
2. checks the answer's head (``check_answer``): a 206 must name the same validator and exactly
   ``bytes N-(length-1)/length``; a 200 means If-Range fell back because the replica's
   representation differs, or the replica ignores ranges (then it regenerates from the start and
   the checkpoint's full hash decides, as without a range record); anything else diverged;
3. reads the 206's body, whose bytes are the original stream's from ``body_start + N`` on,
   compares the window with the checkpoint's hash, and relays only what follows the client's
   position.

A record whose ``full_hash`` is False (its server hashed only windows of such bodies, or was
itself resumed from a range) comes with a checkpoint that commits to nothing else of the
response: any regeneration of it, by range or from the start (a replica that ignores ranges,
a client behind the head), is checked against the window, which is then all it checks.

What a Range hand-over cannot detect is in docs/architecture.md: a replica whose file differs
only outside the window (before it: the client already has those bytes; after the client's
position: the client gets the replica's bytes, as with any regeneration past a checkpoint)
while keeping the same validator.

The client's later requests in the replay (a keep-alive client that has begun its next
download, or pipelining) follow the rewritten one verbatim: HTTP/1.1 answers in order, and the
206's body ends where the original response ended, so their answers land at the positions
they had. A first request that does not fit (not GET, a body, the client's own Range or
If-Range) and responses without a record regenerate from the fresh point (``FromFreshPoint``
says why). Pure: bytes in, decisions out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from migrate.checkpoint import (
    MAX_VALIDATOR_BYTES,
    Checkpoint,
    RangeRecord,
    sealed_has_range,
)

WINDOW_BYTES: Final = 64 * 1024
"""Body bytes before a checkpoint's position that a Range hand-over compares."""

MAX_HEAD_BYTES: Final = 64 * 1024
"""Largest response head a new server reads before the body (as the HTTP codec)."""

MIN_BODY_BYTES: Final = 1024 * 1024
"""Smaller bodies are not looked at for a range record: regenerating one from its start costs
a few milliseconds, and parsing every small response's head (about 20 us) would tax keep-alive
GETs for nothing."""

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/1\.1")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
# RFC 9110 8.8.3: entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE.
_STRONG_ETAG = re.compile(rb'"[\x21\x23-\x7e\x80-\xff]*"')
_CONTENT_RANGE = re.compile(rb"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18})")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# RFC 9110 5.6.7 IMF-fixdate, the format a server must send (the obsolete ones are not taken:
# such a date is then no validator here, and the response regenerates from its start).
_IMF_FIXDATE = re.compile(
    rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{2}) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|"
    rb"Nov|Dec) ([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT"
)
_MONTHS = b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def http_date(value: bytes) -> int | None:
    """Seconds since the epoch of an IMF-fixdate, None if it is not one."""
    match = _IMF_FIXDATE.fullmatch(value)
    if match is None:
        return None
    day, month_name, year, hour, minute, second = match.groups()
    month = _MONTHS.index(month_name) + 1
    if not 1 <= int(day) <= _MONTH_DAYS[month - 1] or int(hour) > 23 or int(minute) > 59:
        return None
    if int(second) > 60:  # 60: a leap second
        return None
    days = _days_from_civil(int(year), month, int(day))
    return days * 86400 + int(hour) * 3600 + int(minute) * 60 + int(second)


class RangeDiverged(Exception):
    """The replica's answer to a range request does not continue the client's response."""


@dataclass(frozen=True, slots=True)
class Validator:
    value: bytes  # the field value, as the service sent it
    etag: bool  # an entity tag (else a Last-Modified date)


@dataclass(frozen=True, slots=True)
class RangeFacts:
    """A response a Range hand-over can resume: its validator and body."""

    validator: Validator
    body_start: int
    length: int

    @property
    def body_end(self) -> int:
        return self.body_start + self.length


@dataclass(frozen=True, slots=True)
class RangePlan:
    """Replay ``request`` (the client's, its first request rewritten, later ones verbatim)
    and read the 206's body from s2c position ``s2c_start`` (body offset ``first``) on."""

    request: bytes
    first: int
    s2c_start: int
    record: RangeRecord


@dataclass(frozen=True, slots=True)
class FromFreshPoint:
    """Regenerate from the checkpoint's fresh point, as without a range record."""

    reason: str


Plan = RangePlan | FromFreshPoint


@dataclass(frozen=True, slots=True)
class Partial:
    """The replica answered 206 for exactly the range asked, with the same validator."""


@dataclass(frozen=True, slots=True)
class Whole:
    """The replica answered 200 with the same validator (it ignores ranges): regenerate from
    the start; the checkpoint's full hash decides, or without one (``full_hash`` False) its
    window, as for a range."""


def _fields(lines: list[bytes]) -> dict[bytes, list[bytes]] | None:
    """Header fields by lowercase name; None if any line is not a field (no obs-fold)."""
    fields: dict[bytes, list[bytes]] = {}
    for line in lines:
        match = _FIELD.fullmatch(line)
        if match is None:
            return None
        fields.setdefault(match[1].lower(), []).append(match[2])
    return fields


def _one(fields: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    """The value of a field that must appear at most once; None if absent or repeated."""
    values = fields.get(name)
    return values[0] if values is not None and len(values) == 1 else None


def _lines(section: bytes) -> list[bytes] | None:
    if not section.endswith(b"\r\n\r\n"):
        return None
    lines = section[:-4].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return None
    return lines


def strong_validator(fields: dict[bytes, list[bytes]]) -> Validator | None:
    """The validator a client may send in If-Range (RFC 9110 13.1.5): a strong entity tag,
    else a Last-Modified date at least one second before the response's Date (8.8.2.2)."""
    if b"etag" in fields:
        etag = _one(fields, b"etag")
        if etag is None or _STRONG_ETAG.fullmatch(etag) is None:
            return None  # weak, malformed or repeated: no date fallback either (13.1.5)
        return Validator(etag, True) if len(etag) <= MAX_VALIDATOR_BYTES else None
    modified, date = _one(fields, b"last-modified"), _one(fields, b"date")
    if modified is None or date is None or len(modified) > MAX_VALIDATOR_BYTES:
        return None
    modified_at, sent_at = http_date(modified), http_date(date)
    if modified_at is None or sent_at is None or sent_at - modified_at < 1:
        return None
    return Validator(modified, False)


def response_facts(method: bytes, section: bytes, body_start: int) -> RangeFacts | None:
    """The facts of a response head (``section``, with its empty line) if a Range hand-over
    can resume it: a 200 to a GET, framed by Content-Length, byte ranges accepted, a strong
    validator."""
    if method != b"GET":
        return None
    lines = _lines(section)
    if lines is None:
        return None
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None or status[1] != b"1.1" or status[2] != b"200":
        return None
    fields = _fields(lines[1:])
    if fields is None or b"transfer-encoding" in fields or b"content-range" in fields:
        return None
    ranges = _one(fields, b"accept-ranges")
    if ranges is None or b"bytes" not in {u.strip(b" \t").lower() for u in ranges.split(b",")}:
        return None
    length = _one(fields, b"content-length")
    if length is None or _DIGITS.fullmatch(length) is None or int(length) == 0:
        return None
    validator = strong_validator(fields)
    if validator is None:
        return None
    return RangeFacts(validator, body_start, int(length))


@dataclass(frozen=True, slots=True)
class _Request:
    head: bytes  # the request line and fields, each line ending CRLF, without the empty line
    rest: bytes  # the client's bytes after the request (later requests)


def _parse_request(replay: bytes) -> _Request | str:
    """The first request of a replay log, a GET without a body, or why it does not fit a
    Range hand-over."""
    start = 0
    while replay.startswith(b"\r\n", start):  # empty lines before a request (RFC 9112 2.2)
        start += 2
    end = replay.find(b"\r\n\r\n", start, start + MAX_HEAD_BYTES)
    if end == -1:
        return "the replay holds no complete request head"
    lines = _lines(replay[start : end + 4])
    if lines is None:
        return "a malformed request head"
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        return "not an HTTP/1.1 request line"
    if request_line[1] != b"GET":
        return f"a {request_line[1].decode('ascii', 'replace')} request, not GET"
    fields = _fields(lines[1:])
    if fields is None:
        return "a malformed request header field"
    if b"transfer-encoding" in fields:
        return "a request with a body"
    length = fields.get(b"content-length")
    if length is not None and length != [b"0"]:
        return "a request with a body"
    for name in (b"range", b"if-range", b"expect"):
        if name in fields:
            return f"the request has its own {name.decode()} field"
    return _Request(replay[start : end + 2], replay[end + 4 :])


def plan(checkpoint: Checkpoint, replay: bytes, s2c_received: int) -> Plan:
    """How to regenerate the response of ``checkpoint`` for a client at ``s2c_received``
    whose replay bytes (from the fresh point) are ``replay``."""
    record = checkpoint.range
    if record is None:
        return FromFreshPoint("the response has no strong validator and byte ranges")
    if s2c_received < record.body_start:
        return FromFreshPoint("the client has not received the whole response head")
    request = _parse_request(replay)
    if isinstance(request, str):
        return FromFreshPoint(request)
    if s2c_received > record.body_end and not request.rest:
        return FromFreshPoint("the client has bytes past the response's end")
    s2c_start = min(record.window_start, s2c_received)
    first = s2c_start - record.body_start
    asked = _ranged(request, first, record.validator) + request.rest
    return RangePlan(asked, first, s2c_start, record)


def _ranged(request: _Request, first: int, validator: bytes, last: int | None = None) -> bytes:
    """``request``'s head asking for its response's body from offset ``first`` (to ``last``,
    inclusive, if given) if it is still the representation ``validator`` names."""
    asked = b"%d-%d" % (first, last) if last is not None else b"%d-" % first
    return request.head + b"Range: bytes=" + asked + b"\r\nIf-Range: " + validator + b"\r\n\r\n"


def replan(
    chosen: RangePlan, replay: bytes, s2c_start: int, later: bytes = b""
) -> RangePlan | None:
    """The response of ``chosen`` asked for again from s2c ``s2c_start``, further into its
    body (a COMMIT whose client is far past what the new server regenerated: it asks a second
    time rather than read the bytes between), followed by ``later``, requests the service has
    not been sent yet (the COMMIT's); None when ``s2c_start`` is not past the first range's
    start and inside the body, or the replay holds later requests than the first that are not
    all ``resendable`` (the first range's connection sent them: sent again, the service would
    do their work twice)."""
    record = chosen.record
    if not chosen.s2c_start < s2c_start < record.body_end:
        return None
    request = _parse_request(replay)
    if isinstance(request, str) or not resendable(request.rest):
        return None
    first = s2c_start - record.body_start
    asked = _ranged(request, first, record.validator) + request.rest + later
    return RangePlan(asked, first, s2c_start, record)


def resendable(data: bytes) -> bool:
    """Whether ``data`` is whole requests, each a GET without a body, that a service may be
    sent a second time: GET is a safe method (RFC 9110 9.2.1), asking again does no work twice.
    Anything else (another method, a body, a request cut short) is not."""
    while data:
        request = _parse_request(data)
        if isinstance(request, str):
            return False
        data = request.rest
    return True


def first_request_length(replay: bytes) -> int | None:
    """How many bytes of ``replay`` its first request takes, if it is a GET a range can
    resume (None otherwise); what follows are later requests."""
    request = _parse_request(replay)
    return None if isinstance(request, str) else len(replay) - len(request.rest)


def head_length(data: bytes | bytearray) -> int | None:
    """The length of the response head at the start of ``data`` (with its empty line), None
    while incomplete. Raises ``RangeDiverged`` past ``MAX_HEAD_BYTES``."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
    if end == -1:
        if len(data) >= MAX_HEAD_BYTES:
            raise RangeDiverged(f"the replica's response head exceeds {MAX_HEAD_BYTES} bytes")
        return None
    return end + 4


def _answer(section: bytes) -> tuple[int, dict[bytes, list[bytes]]]:
    """The status code and fields of the replica's answer to a range request."""
    lines = _lines(section)
    status = _STATUS_LINE.fullmatch(lines[0]) if lines else None
    fields = _fields(lines[1:]) if lines else None
    if lines is None or status is None or fields is None:
        raise RangeDiverged("the replica's answer to the range request is not an HTTP response")
    return int(status[2]), fields


def _check_partial(
    fields: dict[bytes, list[bytes]], record: RangeRecord, first: int, last: int
) -> None:
    """A 206's fields must name the checkpoint's validator and exactly the bytes asked."""
    name = b"etag" if record.etag else b"last-modified"
    theirs = _one(fields, name)
    kind = "ETag" if record.etag else "Last-Modified"
    if theirs != record.validator:
        raise RangeDiverged(
            f"the replica's 206 has {kind} {_show(theirs)}, the checkpoint's "
            f"{_show(record.validator)}"
        )
    if b"transfer-encoding" in fields:
        raise RangeDiverged("the replica's 206 is not framed by Content-Length")
    expected = b"bytes %d-%d/%d" % (first, last, record.length)
    content_range = _one(fields, b"content-range")
    match = _CONTENT_RANGE.fullmatch(content_range) if content_range is not None else None
    if match is None or content_range != expected:
        raise RangeDiverged(
            f"the replica's 206 has Content-Range {_show(content_range)}, expected "
            f"{expected.decode()}"
        )
    length = _one(fields, b"content-length")
    if length is None or length != b"%d" % (last + 1 - first):
        raise RangeDiverged(
            f"the replica's 206 has Content-Length {_show(length)}, expected {last + 1 - first}"
        )


def check_answer(section: bytes, chosen: RangePlan) -> Partial | Whole:
    """Check the replica's response head to the range request of ``chosen``."""
    record = chosen.record
    code, fields = _answer(section)
    if code == 200:
        theirs = _one(fields, b"etag" if record.etag else b"last-modified")
        if theirs != record.validator:
            kind = "ETag" if record.etag else "Last-Modified"
            raise RangeDiverged(
                f"the replica's representation differs: {kind} {_show(theirs)}, the "
                f"checkpoint's {_show(record.validator)} (If-Range fell back to 200)"
            )
        return Whole()
    if code != 206:
        raise RangeDiverged(f"the replica answered {code} to the range request")
    _check_partial(fields, record, chosen.first, record.length - 1)
    return Partial()


@dataclass(frozen=True, slots=True)
class WindowCheck:
    """Ask for the checkpoint's window alone: body offsets ``first`` to ``last`` (inclusive),
    the bytes ``[window_start, s2c_pos)`` whose hash the checkpoint carries."""

    request: bytes
    first: int
    last: int
    record: RangeRecord

    @property
    def length(self) -> int:
        return self.last + 1 - self.first


def window_check(chosen: RangePlan, replay: bytes, s2c_pos: int) -> WindowCheck | None:
    """For a client behind the window of ``chosen``'s checkpoint (at ``s2c_pos``): its first
    request asking for the window's bytes alone (``Range: bytes=a-b`` and If-Range), none of
    its later ones, so that the window can be checked on a connection of its own while the
    client's range starts where the client is. None if the first request does not fit."""
    record = chosen.record
    request = _parse_request(replay)
    if isinstance(request, str) or not record.window_start < s2c_pos <= record.body_end:
        return None
    first = record.window_start - record.body_start
    last = s2c_pos - record.body_start - 1
    return WindowCheck(_ranged(request, first, record.validator, last), first, last, record)


def check_window_answer(section: bytes, check: WindowCheck) -> None:
    """Check the replica's response head to ``check``'s request: a 206 of exactly the window,
    with the checkpoint's validator (a 200 here, after a 206 for the client's own range, is a
    replica that answers the same request two ways)."""
    code, fields = _answer(section)
    if code != 206:
        raise RangeDiverged(f"the replica answered {code} to the window's range request")
    _check_partial(fields, check.record, check.first, check.last)


def _show(value: bytes | None) -> str:
    if value is None:
        return "(none)"
    return value[:64].decode("ascii", "replace")


def expected_regeneration(received: int, sealed_checkpoint: bytes | None, s2c_pos: int) -> int:
    """The bytes a new server reads from the service to re-create a connection whose client
    has received ``received`` bytes and holds the checkpoint ``sealed_checkpoint`` (as pushed
    in a carrier, whose ``s2c_pos`` the client reads in clear). For the client's prepare lead
    (``client_shim``): a checkpoint with a range record (version 3, readable in its clear
    header) costs a window and the bytes since it; any other the client's whole position
    (an upper bound: the fresh point is sealed)."""
    if not sealed_has_range(sealed_checkpoint):
        return received
    return min(received, WINDOW_BYTES + abs(received - s2c_pos))


def regeneration_bytes(
    checkpoint: Checkpoint, replay: bytes, s2c_received: int, chosen: Plan | None = None
) -> int:
    """The service bytes a new server reads for a PREPARE (for its per-client meter,
    ``migrate.admission``): up to the client's claim and at least to the checkpoint's
    position, from the range's start when ``plan`` takes one (``chosen``, if already
    made), else from the fresh point."""
    goal = max(s2c_received, checkpoint.s2c_pos)
    if chosen is None:
        chosen = plan(checkpoint, replay, s2c_received)
    start = chosen.s2c_start if isinstance(chosen, RangePlan) else checkpoint.s2c_fresh
    return goal - start
