"""Bounded logging of rejected datagrams: the first of each kind per period, then a count.

Theory of operation. Anyone can send the shims datagrams that fail authentication: logging
each one in full lets an outsider write the logs at the rate of its link (and fill the disk).
A ``RejectionLimiter`` lets the first rejection of each *key* (the event and the error class,
never the attacker-chosen source or reason text) through in full in each period, counts the
rest, and at the end of the period hands back one summary per key that had more. So an
operator still sees every kind of rejection at once and how many there were, and the log
grows by at most ``2 * max_keys`` lines per period whatever the rate. Memory is bounded too:
at most ``max_keys`` distinct keys per period; further keys share one ``OVERFLOW_KEY``.

A period of 0 turns the limit off: every rejection is logged in full (for debugging, and for
tests that account for each datagram they send).

Time comes in as ``now`` (seconds, any monotonic-ish clock). A period ends ``period_s`` after
it began, so a gap of any length simply ends it; a clock that steps back ends it as well (the
counts are reported, never lost or attributed to a period that has not begun).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PERIOD_S = 60.0
DEFAULT_MAX_KEYS = 32
OVERFLOW_KEY = "(other)"


@dataclass(frozen=True, slots=True)
class Suppressed:
    """Rejections of one key that were counted, not logged, in one period."""

    key: str
    count: int
    period_start: float
    period_end: float


class RejectionLimiter:
    def __init__(self, period_s: float = DEFAULT_PERIOD_S, max_keys: int = DEFAULT_MAX_KEYS):
        if not period_s >= 0:
            raise ValueError(f"period must be 0 or positive, got {period_s}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.period_s = period_s
        self.max_keys = max_keys
        self._start: float | None = None
        # key -> rejections counted after the first (the first was logged in full)
        self._counts: dict[str, int] = {}

    def _ended(self, now: float) -> bool:
        start = self._start
        return start is not None and not start <= now < start + self.period_s

    def flush(self, now: float) -> list[Suppressed]:
        """Summaries of a period that has ended by ``now`` (empty if it has not)."""
        if not self._ended(now):
            return []
        start = self._start
        assert start is not None
        end = min(start + self.period_s, max(now, start))
        summaries = [
            Suppressed(key, count, start, end) for key, count in self._counts.items() if count
        ]
        self._start = None
        self._counts = {}
        return summaries

    def record(self, key: str, now: float) -> tuple[bool, list[Suppressed]]:
        """Count one rejection: (log it in full?, summaries of the period that just ended)."""
        if self.period_s == 0:
            return True, []  # no limit: every rejection in full (an operator's choice)
        summaries = self.flush(now)
        if self._start is None:
            self._start = now
        if key not in self._counts and len(self._counts) >= self.max_keys:
            key = OVERFLOW_KEY
        if key in self._counts:
            self._counts[key] += 1
            return False, summaries
        self._counts[key] = 0
        return True, summaries

    @property
    def keys(self) -> int:
        return len(self._counts)
