"""Prometheus metrics of the daemons: ``roam server|client --metrics HOST:PORT``.

Theory of operation: nothing is counted twice. At each scrape, a collector (one registry per
daemon, never prometheus-client's global one) reads the daemon's status dict, the very one its
``--status`` file holds, and maps it to metric families (``server_families`` and
``client_families``, pure functions of a dict). The client's hand-overs are counted from the
``handoff`` events of its ``EventLog`` (``HandoffTally``, an event tap): the JSON log and the
metrics see the same events. Label values come from bounded sets; anything else is ``other``.

The endpoint is an asyncio handler on the daemon's own loop (so the status is read where it is
changed, never half-updated from another thread), bound to the given address only, bounded per
connection in bytes and time and in connections at once; it answers ``GET /metrics`` and 404
otherwise, and is closed with the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from migrate.errors import ConfigError

# Hand-over pauses: tens of milliseconds when all goes well, up to the hand-over budget.
PAUSE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HANDOFF_OUTCOMES = (
    "migrated",
    "closed",
    "deferred",
    "failed",
    "diverged",
    "refused",
    "late",
    "unmigratable",
    "pending",
    "other",
)
# The live mode's counts of re-incarnations (proxy/live.py ``LiveMode.counts``) by outcome:
# restored and ready for GO, failed, diverged from the checkpoint, refused (not admitted).
REINCARNATION_OUTCOMES = ("ready", "failed", "diverged", "refused")
CONTROL_KINDS = (
    "threat",
    "trigger",
    "revoke",
    "strike",
    "facts",
    "statequery",
    "ack",
    "statereport",
    "unopened",
)
CONTROL_VERDICTS = ("applied", "refused", "answered", "merged", "repeated", "rejected", "taken")
RELAY_DIRECTIONS = ("client_to_service", "service_to_client")
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_SCRAPES_AT_ONCE = 4


def bounded(value: object, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``other`` (label values stay bounded)."""
    text = str(value)
    return text if text in allowed else "other"


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _gauge(name: str, doc: str, value: object) -> list[Metric]:
    number = _number(value)
    if number is None:
        return []  # not known yet (before the first epoch): absent rather than a false 0
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], number)
    return [family]


def _counter(name: str, doc: str, value: object) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], _number(value) or 0.0)
    return family


def _labelled_counter(
    name: str, doc: str, label: str, values: Mapping[str, float], allowed: Iterable[str]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    totals: dict[str, float] = dict.fromkeys(allowed, 0.0)
    for key, count in values.items():
        kind = bounded(key, totals)
        totals[kind] = totals.get(kind, 0.0) + count
    for key, count in totals.items():
        family.add_metric([key], count)
    return family


def server_families(status: Mapping[str, Any]) -> list[Metric]:
    """The server shim's metrics from its status dict (``ServerShim.status()``)."""
    live: Mapping[str, Any] = status.get("live") or {}
    families: list[Metric] = []
    families += _gauge("roam_epoch", "Epoch this shim is in.", status.get("epoch"))
    families += _gauge(
        "roam_gate_open", "1 while this server's gate lets clients in.", status.get("open")
    )
    # Live mode holds the re-incarnated connections as well as those accepted here.
    connections = live.get("live_connections", status.get("connections"))
    families += _gauge("roam_connections", "Client connections relayed now.", connections)
    dropped = status.get("gate_dropped")
    if dropped is not None:
        families.append(
            _counter(
                "roam_gate_dropped_packets",
                "Packets to the service port dropped by the gate (closed, blocked or not "
                "subscribed).",
                dropped,
            )
        )
    families.append(
        _labelled_counter(
            "roam_reincarnations",
            "Re-incarnations of live connections on this server, by outcome.",
            "outcome",
            {key: float(live.get(key, 0)) for key in REINCARNATION_OUTCOMES},
            REINCARNATION_OUTCOMES,
        )
    )
    families.append(
        _counter(
            "roam_checkpoints_sent",
            "Checkpoint carriers sent to clients.",
            live.get("checkpoints_sent", 0),
        )
    )
    families.append(
        _counter(
            "roam_connections_unmigratable",
            "Connections found unmigratable (replay past --max-replay, not replayable...).",
            live.get("unmigratable", 0),
        )
    )
    families.append(
        _counter(
            "roam_replay_streamed_bytes",
            "Replay bytes taken on the replay stream (re-sent at each roam).",
            live.get("streamed_bytes", 0),
        )
    )
    relay: Mapping[str, Any] = status.get("relay_bytes") or {}
    families.append(
        _labelled_counter(
            "roam_relay_bytes",
            "Bytes relayed between clients and the service.",
            "direction",
            {key: float(relay.get(key, 0)) for key in RELAY_DIRECTIONS},
            RELAY_DIRECTIONS,
        )
    )
    families.append(
        _counter(
            "roam_updates_sent", "Roaming updates sent to clients.", status.get("updates_sent")
        )
    )
    control = CounterMetricFamily(
        "roam_control_messages",
        "Group-control datagrams received, by kind and verdict.",
        labels=["kind", "verdict"],
    )
    totals: dict[tuple[str, str], float] = {}
    for key, count in (status.get("control_messages") or {}).items():
        kind, _, verdict = str(key).partition("/")
        label = (bounded(kind, CONTROL_KINDS), bounded(verdict, CONTROL_VERDICTS))
        totals[label] = totals.get(label, 0.0) + float(count)
    for (kind, verdict), count in sorted(totals.items()):
        control.add_metric([kind, verdict], count)
    families.append(control)
    return families


def client_families(status: Mapping[str, Any], tally: HandoffTally | None) -> list[Metric]:
    """The client shim's metrics from its status dict (``ClientShim.status()``) and the
    hand-overs counted from its log."""
    families: list[Metric] = []
    epoch = status.get("epoch")
    families += _gauge("roam_epoch", "Epoch this shim is in.", epoch)
    families.append(
        _counter(
            "roam_updates_accepted",
            "Roaming updates accepted.",
            status.get("updates_accepted"),
        )
    )
    rejected = CounterMetricFamily(
        "roam_updates_rejected",
        "Datagrams refused on the roaming port, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted((status.get("updates_rejected_by_reason") or {}).items()):
        rejected.add_metric([str(reason)], float(count))
    families.append(rejected)
    families += _gauge(
        "roam_clock_offset_seconds",
        "This host's clock minus the servers' (from roaming updates).",
        status.get("clock_offset"),
    )
    key_index = status.get("key_index")
    if isinstance(key_index, int) and isinstance(epoch, int):
        families += _gauge(
            "roam_key_epochs_left",
            "Epochs left on the keys this client holds (0: its subscription ends).",
            max(0, key_index - epoch),
        )
    live: Mapping[str, Any] = status.get("live") or {}
    capture: Mapping[str, Any] = live.get("capture") or {}
    stream: Mapping[str, Any] = live.get("replay_stream") or {}
    if live:
        families.append(
            _counter(
                "roam_connections_unmigratable",
                "Connections marked unmigratable when it happened (past --max-replay, FIN...).",
                capture.get("unmigratable", 0),
            )
        )
        families.append(
            _counter(
                "roam_replay_streamed_bytes",
                "Replay bytes sent on replay streams (re-sent at each roam).",
                stream.get("bytes_sent", 0),
            )
        )
    if tally is not None:
        families += tally.families()
    return families


class HandoffTally:
    """Hand-overs by outcome and their pauses, counted from the client's ``handoff`` events
    (an ``EventLog`` tap): cumulative, where ``Migrator.roams`` keeps only the last few."""

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = dict.fromkeys(HANDOFF_OUTCOMES, 0)
        self.buckets = [0] * len(PAUSE_BUCKETS_S)
        self.count = 0
        self.total_s = 0.0

    def __call__(self, name: str, fields: Mapping[str, Any]) -> None:
        if name != "handoff":
            return
        outcome = bounded(fields.get("outcome"), HANDOFF_OUTCOMES)
        self.outcomes[outcome] += 1
        pause_ms = _number(fields.get("pause_ms"))
        if pause_ms is None or pause_ms < 0:
            return
        pause = pause_ms / 1000
        self.count += 1
        self.total_s += pause
        for index, bound in enumerate(PAUSE_BUCKETS_S):
            if pause <= bound:
                self.buckets[index] += 1

    def families(self) -> list[Metric]:
        handoffs = CounterMetricFamily(
            "roam_handoffs", "Hand-overs of live connections, by outcome.", labels=["outcome"]
        )
        for outcome, count in self.outcomes.items():
            handoffs.add_metric([outcome], float(count))
        pauses = HistogramMetricFamily(
            "roam_handoff_pause_seconds",
            "Pause of each hand-over: from the roam's start to the switch.",
        )
        buckets: list[tuple[str, float]] = [
            (repr(bound), float(n)) for bound, n in zip(PAUSE_BUCKETS_S, self.buckets, strict=True)
        ]
        buckets.append(("+Inf", float(self.count)))
        pauses.add_metric([], buckets, sum_value=self.total_s)
        return [handoffs, pauses]


class StatusCollector(Collector):
    """Reads the daemon's status at scrape time and maps it to families."""

    def __init__(self, families: Callable[[], list[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


def registry_of(families: Callable[[], list[Metric]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(families))
    return registry


class MetricsServer:
    """``GET /metrics`` on one address, on the running event loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.before_scrape = before_scrape
        self._server: asyncio.Server | None = None
        self._busy = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=MAX_REQUEST_BYTES, reuse_address=True
            )
        except OSError as error:
            raise ConfigError(f"--metrics {host}:{port}: {error.strerror or error}") from None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Scrapes under way (or idle connections) end now, not when their timeout comes.
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._busy >= MAX_SCRAPES_AT_ONCE:
            writer.close()
            return
        self._busy += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await asyncio.wait_for(self._answer(reader, writer), REQUEST_TIMEOUT_S)
        except (TimeoutError, OSError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        except ValueError:  # the request head went over the limit
            pass
        except asyncio.CancelledError:
            pass  # ``close``: this connection ends with the endpoint
        finally:
            self._busy -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].split()
        if len(request_line) < 2 or request_line[0] not in (b"GET", b"HEAD"):
            writer.write(_response(405, b"text/plain", b"only GET\n"))
            return
        if request_line[1].split(b"?", 1)[0] != b"/metrics":
            writer.write(_response(404, b"text/plain", b"see /metrics\n"))
            return
        if self.before_scrape is not None:
            await self.before_scrape()
        body = generate_latest(self.registry)
        if request_line[0] == b"HEAD":
            writer.write(_response(200, CONTENT_TYPE_LATEST.encode(), b"", len(body)))
        else:
            writer.write(_response(200, CONTENT_TYPE_LATEST.encode(), body))
        await writer.drain()


def _response(code: int, content_type: bytes, body: bytes, length: int | None = None) -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}[code]
    size = len(body) if length is None else length
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (code, reason, content_type, size)
    ) + body


__all__ = [
    "HandoffTally",
    "MetricsServer",
    "client_families",
    "registry_of",
    "server_families",
]
