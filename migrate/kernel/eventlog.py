"""Structured logs and status files of the daemons.

Every event is one JSON object per line in the ``--log-json`` file (``ts``, ``component``,
``event``, ``level`` and the event's own fields) and one short human line on stderr. Status
files are small JSON documents replaced atomically, so a reader (``roam client status``) never
sees half of one. Both name the active server and the epoch ends, so both are 0600 in a
directory created 0700 (``migrate.kernel.files``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from migrate.kernel.files import LatestWriter, open_private_log
from migrate.ratelog import DEFAULT_PERIOD_S, RejectionLimiter, Suppressed


def _default(value: object) -> str:
    return str(value)


class EventLog:
    def __init__(
        self,
        component: str,
        json_path: Path | None = None,
        stream: IO[str] | None = sys.stderr,
        quiet: bool = False,
        rejection_period_s: float = DEFAULT_PERIOD_S,
    ) -> None:
        self.component = component
        self.stream = None if quiet else stream
        self.rejections = RejectionLimiter(rejection_period_s)
        self._file: IO[str] | None = None
        # Called with every event's name and fields (the metrics count hand-overs from the
        # very events the JSON log records, so the two cannot disagree).
        self.taps: list[Callable[[str, dict[str, Any]], None]] = []
        if json_path is not None:
            self._file = open_private_log(json_path)

    def event(self, name: str, /, level: str = "info", **fields: Any) -> None:
        record = {
            "ts": round(time.time(), 6),
            "component": self.component,
            "event": name,
            "level": level,
            **fields,
        }
        if self._file is not None:
            self._file.write(json.dumps(record, default=_default) + "\n")
        if self.stream is not None:
            details = " ".join(f"{key}={value}" for key, value in fields.items())
            self.stream.write(f"{self.component}: {level}: {name} {details}\n".rstrip() + "\n")
            self.stream.flush()
        for tap in self.taps:
            tap(name, fields)

    def rejection(self, name: str, /, now: float | None = None, **fields: Any) -> None:
        """Log a rejected datagram, bounded (``migrate.ratelog``): the first of each event and
        error class per period in full, the rest as one ``rejections_suppressed`` count."""
        # Monotonic: a wall-clock step must not stretch or shrink the period.
        when = time.monotonic() if now is None else now
        logged, summaries = self.rejections.record(f"{name}/{fields.get('error', '')}", when)
        self._summaries(summaries)
        if logged:
            self.event(name, level="warning", **fields)

    def flush_rejections(self, now: float | None = None) -> None:
        """Log the counts of a period that has ended (call it now and then: on a timer)."""
        self._summaries(self.rejections.flush(time.monotonic() if now is None else now))

    def _summaries(self, summaries: list[Suppressed]) -> None:
        for summary in summaries:
            rejected, _, error = summary.key.partition("/")
            self.event(
                "rejections_suppressed",
                level="warning",
                rejected=rejected,
                error=error,
                count=summary.count,
                period_s=round(summary.period_end - summary.period_start, 3),
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def status_bytes(status: dict[str, Any]) -> bytes:
    return (json.dumps(status, indent=2, default=_default) + "\n").encode()


class DaemonFiles:
    """A daemon's state file and (optional) status file, each replaced from its own
    ``LatestWriter`` thread, never on the event loop: a file replaced on the loop stalled
    hand-overs behind the disk (``migrate.kernel.files``). The status is not fsync-ed: it is
    rewritten at every gate change and hand-over (two fsyncs each were a tenth of an idle server
    shim's CPU in a busy pool) and again when the daemon starts."""

    def __init__(self, state_path: Path, status_path: Path | None) -> None:
        self.state_path = state_path
        self.status_path = status_path
        self._state = LatestWriter(state_path)
        self._status = LatestWriter(status_path, durable=False) if status_path else None

    def save_state(self, content: bytes, *, wait: bool = False) -> None:
        """Hand the newest state to its writer; with ``wait``, return once it is on disk (a
        counter reservation). A failed earlier write is raised here, as ``OSError``."""
        self._state.submit(content)
        if wait:
            self._state.flush()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until both files hold everything handed over so far. For tests: a daemon
        waits for its state file alone (``save_state(wait=True)``), and ``close`` ends both."""
        for writer in (self._status, self._state):
            if writer is not None:
                writer.flush(timeout=timeout)

    def show_status(self, status: dict[str, Any]) -> None:
        if self._status is not None:
            self._status.submit(status_bytes(status))

    def close(self, log: EventLog) -> None:
        """At the daemon's exit: its last state on disk, and its status file removed (after the
        writer's last write, which would otherwise bring it back). A failure is logged."""
        for writer in (self._status, self._state):
            if writer is None:
                continue
            try:
                writer.close()
            except Exception as error:  # shutting down: say so and go on
                log.event("write_failed", level="error", path=str(writer.path), reason=str(error))
        if self.status_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.status_path.unlink()


def read_events(path: Path) -> list[dict[str, Any]]:
    """All events of a JSON log (for tests and labs)."""
    events = []
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if line:
                events.append(json.loads(line))
    return events
