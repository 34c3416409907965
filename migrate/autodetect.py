"""``--codec auto``: the codec of a connection, recognised from its first bytes.

Theory of operation: HTTP/1.x, RESP (redis) and the memcached text protocol are all
client-first: the client's first bytes say which protocol it speaks. ``detect`` looks at them
(at most ``DETECT_BYTES``) and answers as soon as it is sure, or None while it needs more:

* ``*`` starts a RESP array: resp;
* a token then a space, the token an HTTP method and the next byte an origin-form target
  (``/``), ``*`` or an absolute-form ``http``: http;
* a lowercase memcached command word (get, set, mg...) then a space or a line end: memcached;
* an uppercase redis command (PING, AUTH, GET...) as an inline command: resp;
* anything else, or a server that speaks first (SMTP, FTP, SSH): generic.

Two protocols are recognised as not replayable whatever the codec (``Detection.unreplayable``):
TLS (a ClientHello, ``16 03``; end-to-end encryption with fresh keys on every connection) and
SSH (``SSH-`` from either side; server-chosen randomness). A replica cannot answer them with the
same bytes, so such a connection is marked unmigratable at once and never retried.

Ambiguities, decided for the common client: redis also accepts lowercase inline commands
(``get k``), which read as memcached; a redis inline command whose first argument starts with
``/`` (``GET /x``) reads as HTTP. Real redis clients send arrays (``*``), never inline commands.

``AutoCodec`` holds the first client bytes until ``detect`` answers (a server byte before that
decides with what has come), then hands everything to the chosen codec. Pure: bytes in, a
decision out, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from migrate.codec import FreshPoint, StreamCodec, codec_for

DETECT_BYTES: Final = 64
"""At most this many client bytes decide; no decision by then means generic."""

_HTTP_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"CONNECT"}
)
_MEMCACHED = frozenset(
    b"get gets gat gats set add replace append prepend cas incr decr delete touch stats "
    b"version verbosity flush_all quit mg ms md ma mn me".split()
)
_REDIS = frozenset(
    b"PING AUTH HELLO SELECT GET SET MGET MSET DEL EXISTS INCR DECR EXPIRE TTL KEYS SCAN "
    b"INFO CLIENT COMMAND CONFIG DBSIZE FLUSHDB FLUSHALL ECHO QUIT RESET MULTI EXEC "
    b"LPUSH RPUSH LPOP RPOP LRANGE LLEN HSET HGET HGETALL SADD SMEMBERS ZADD ZRANGE "
    b"XADD XRANGE XREAD PUBLISH SUBSCRIBE MONITOR BLPOP BRPOP".split()
)
_TOKEN = re.compile(rb"[A-Za-z_]{1,16}")


@dataclass(frozen=True, slots=True)
class Detection:
    """The codec chosen for a connection, and why."""

    codec: str
    reason: str
    unreplayable: str | None = None


def detect(first: bytes, *, final: bool = False) -> Detection | None:
    """The codec for a connection whose client sent ``first`` first; None: not sure yet.

    ``final``: no more client bytes will be looked at (the server spoke, or ``DETECT_BYTES``
    have come): always an answer.
    """
    final = final or len(first) >= DETECT_BYTES
    if not first:
        return Detection("generic", "the server spoke first") if final else None
    if first[:1] == b"\x16":
        if len(first) < 2:
            return None if not final else Detection("generic", "not a known protocol")
        if first[1] == 3:
            return Detection("generic", "TLS ClientHello", "TLS (end-to-end encryption)")
    if first[:4] == b"SSH-"[: len(first[:4])] and len(first) < 4 and not final:
        return None
    if first.startswith(b"SSH-"):
        return Detection("generic", "SSH banner", "SSH (server-chosen randomness)")
    if first[:1] == b"*":
        return Detection("resp", "a RESP array")
    return _by_first_word(first, final)


def detect_server_first(first: bytes) -> Detection:
    """The codec for a connection whose server spoke before the client."""
    if first.startswith(b"SSH-"):
        return Detection("generic", "SSH banner", "SSH (server-chosen randomness)")
    return Detection("generic", "the server spoke first")


def _by_first_word(first: bytes, final: bool) -> Detection | None:
    token = _TOKEN.match(first)
    if token is None:
        return Detection("generic", "not a known protocol")
    word = token[0]
    end = token.end()
    if end == len(first):
        if final or len(word) == 16:
            return Detection("generic", "not a known protocol")
        return None
    after = first[end : end + 2]
    if word in _HTTP_METHODS and after[:1] == b" ":
        if len(after) < 2:
            return None if not final else Detection("generic", "not a known protocol")
        if after[1:2] in (b"/", b"*", b"h") or word == b"CONNECT":
            return Detection("http", f"HTTP {word.decode()} request")
    if word in _MEMCACHED and after[:1] in (b" ", b"\r", b"\n"):
        return Detection("memcached", f"memcached {word.decode()} command")
    if word in _REDIS and after[:1] in (b" ", b"\r", b"\n"):
        return Detection("resp", f"redis inline {word.decode()} command")
    return Detection("generic", "not a known protocol")


class AutoCodec:
    """Chooses a codec from the connection's first bytes, then is that codec."""

    def __init__(self, *, c2s_start: int = 0, s2c_start: int = 0) -> None:
        self.name = "auto"
        self._c2s_start = c2s_start
        self._s2c_start = s2c_start
        self._first = bytearray()
        self.detection: Detection | None = None
        self._codec: StreamCodec | None = None

    @property
    def chosen(self) -> StreamCodec | None:
        return self._codec

    def feed_c2s(self, data: bytes | memoryview) -> None:
        if self._codec is not None:
            self._codec.feed_c2s(data)
            return
        with memoryview(data) as raw, raw.cast("B") as view:
            room = DETECT_BYTES - len(self._first)
            self._first += view[:room]
            detection = detect(bytes(self._first))
            if detection is None:  # fewer than DETECT_BYTES so far: all of view is held
                return
            codec = self._choose(detection)
            codec.feed_c2s(bytes(self._first))
            if room < len(view):
                codec.feed_c2s(view[room:])

    def feed_s2c(self, data: bytes | memoryview) -> None:
        if self._codec is None and len(data) == 0:
            return
        if self._codec is None:
            if self._first:
                self._choose(detect(bytes(self._first), final=True) or _GENERIC).feed_c2s(
                    bytes(self._first)
                )
            else:
                with memoryview(data) as view:
                    self._choose(detect_server_first(bytes(view[:4])))
        assert self._codec is not None
        self._codec.feed_s2c(data)

    def _choose(self, detection: Detection) -> StreamCodec:
        self.detection = detection
        self.name = detection.codec
        self._codec = codec_for(
            detection.codec, c2s_start=self._c2s_start, s2c_start=self._s2c_start
        )
        return self._codec

    @property
    def fresh(self) -> FreshPoint:
        if self._codec is None:
            return FreshPoint(self._c2s_start, self._s2c_start)
        return self._codec.fresh

    @property
    def boundaries(self) -> int:
        return 0 if self._codec is None else self._codec.boundaries

    @property
    def degraded(self) -> str | None:
        return None if self._codec is None else self._codec.degraded

    @property
    def unreplayable(self) -> str | None:
        if self.detection is not None and self.detection.unreplayable is not None:
            return self.detection.unreplayable
        return None if self._codec is None else self._codec.unreplayable


_GENERIC = Detection("generic", "not a known protocol")
