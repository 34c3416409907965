"""Prometheus metrics (``--metrics``): the pure mapping from a daemon's status dict (and the
client's ``handoff`` events) to metric families, rendered and parsed back with
prometheus-client's own parser, and the server's count of group-control messages."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from migrate.control import OPERATOR, Revoke
from migrate.kernel.eventlog import EventLog
from migrate.kernel.metrics import (
    HandoffTally,
    client_families,
    registry_of,
    server_families,
)
from tests.unit.test_control_handling import OPERATOR_HOST, channel, make_deployment, make_shim

SERVER_STATUS: dict[str, Any] = {
    "epoch": 41,
    "open": True,
    "connections": 3,
    "gate_dropped": 17,
    "updates_sent": 250,
    "control_messages": {"revoke/applied": 1, "facts/merged": 40, "unopened/rejected": 5},
    "relay_bytes": {"client_to_service": 1000, "service_to_client": 5_000_000},
    "live": {
        "checkpoints_sent": 900,
        "admitted": 7,
        "ready": 5,
        "diverged": 1,
        "refused": 2,
        "failed": 1,
        "repeated": 0,
        "cover": 99,
    },
}

CLIENT_STATUS: dict[str, Any] = {
    "epoch": 41,
    "key_index": 141,
    "clock_offset": -0.25,
    "updates_accepted": 30,
    "updates_rejected": 4,
    "updates_rejected_by_reason": {"AuthenticationError": 3, "ReplayedMessageError": 1},
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by name and labels (parsed as Prometheus would)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def render(families: Any) -> str:
    return generate_latest(registry_of(lambda: families)).decode()


def test_server_status_maps_to_every_documented_metric() -> None:
    found = samples(render(server_families(SERVER_STATUS)))
    assert found[("roam_epoch", ())] == 41
    assert found[("roam_gate_open", ())] == 1
    assert found[("roam_connections", ())] == 3
    assert found[("roam_gate_dropped_packets_total", ())] == 17
    assert found[("roam_updates_sent_total", ())] == 250
    assert found[("roam_checkpoints_sent_total", ())] == 900
    assert found[("roam_reincarnations_total", (("outcome", "ready"),))] == 5
    assert found[("roam_reincarnations_total", (("outcome", "diverged"),))] == 1
    assert found[("roam_reincarnations_total", (("outcome", "refused"),))] == 2
    assert found[("roam_reincarnations_total", (("outcome", "failed"),))] == 1
    assert found[("roam_relay_bytes_total", (("direction", "service_to_client"),))] == 5_000_000
    assert found[("roam_relay_bytes_total", (("direction", "client_to_service"),))] == 1000
    control = (("kind", "revoke"), ("verdict", "applied"))
    assert found[("roam_control_messages_total", control)] == 1
    assert found[("roam_control_messages_total", (("kind", "facts"), ("verdict", "merged")))] == 40


def test_a_closed_gate_is_0_and_an_unknown_epoch_is_absent_not_0() -> None:
    status = {**SERVER_STATUS, "open": False, "epoch": None, "live": None, "gate_dropped": None}
    found = samples(render(server_families(status)))
    assert found[("roam_gate_open", ())] == 0
    assert not any(name == "roam_epoch" for name, _ in found)
    assert not any(name == "roam_gate_dropped_packets_total" for name, _ in found)
    assert found[("roam_reincarnations_total", (("outcome", "ready"),))] == 0


def test_label_values_stay_bounded_whatever_the_status_holds() -> None:
    status = {
        **SERVER_STATUS,
        "control_messages": {f"kind{i}/verdict{i}": 1 for i in range(1000)},
    }
    found = samples(render(server_families(status)))
    control = [labels for name, labels in found if name == "roam_control_messages_total"]
    assert control == [(("kind", "other"), ("verdict", "other"))]
    assert found[("roam_control_messages_total", control[0])] == 1000


def test_client_status_and_handoff_events_map_to_metrics() -> None:
    tally = HandoffTally()
    log = EventLog("client", stream=io.StringIO())
    log.taps.append(tally)
    for pause_ms, outcome in ((20.0, "migrated"), (20.0, "migrated"), (300.0, "failed")):
        log.event("handoff", epoch=41, port=1, outcome=outcome, pause_ms=pause_ms)
    log.event("handoff", epoch=42, port=2, outcome="some new outcome", pause_ms=7000.0)
    log.event("roam", epoch=41)  # not a hand-over
    found = samples(render(client_families(CLIENT_STATUS, tally)))
    assert found[("roam_epoch", ())] == 41
    assert found[("roam_key_epochs_left", ())] == 100
    assert found[("roam_clock_offset_seconds", ())] == -0.25
    assert found[("roam_updates_accepted_total", ())] == 30
    assert found[("roam_updates_rejected_total", (("reason", "AuthenticationError"),))] == 3
    assert found[("roam_handoffs_total", (("outcome", "migrated"),))] == 2
    assert found[("roam_handoffs_total", (("outcome", "failed"),))] == 1
    assert found[("roam_handoffs_total", (("outcome", "other"),))] == 1
    assert found[("roam_handoff_pause_seconds_bucket", (("le", "0.025"),))] == 2
    assert found[("roam_handoff_pause_seconds_bucket", (("le", "0.5"),))] == 3
    assert found[("roam_handoff_pause_seconds_bucket", (("le", "+Inf"),))] == 4
    assert found[("roam_handoff_pause_seconds_count", ())] == 4
    assert abs(found[("roam_handoff_pause_seconds_sum", ())] - 7.34) < 1e-9


def test_the_server_counts_control_messages_by_kind_and_verdict(tmp_path: Path) -> None:
    shim = make_shim(make_deployment(tmp_path))
    operator = channel(shim, OPERATOR)
    shim.on_control(operator.seal(Revoke(2), time.time()), OPERATOR_HOST)
    shim.on_control(operator.seal(Revoke(999), time.time()), OPERATOR_HOST)  # no such client
    shim.on_control(b"\x00" * 80, OPERATOR_HOST)
    # A server's message from another address than its registered one.
    shim.on_control(channel(shim, 1).seal(Revoke(1), time.time()), ("10.0.0.99", 47475))
    found = samples(render(server_families(shim.status())))
    metric = "roam_control_messages_total"
    assert found[(metric, (("kind", "revoke"), ("verdict", "applied")))] == 1
    assert found[(metric, (("kind", "revoke"), ("verdict", "refused")))] == 1
    assert found[(metric, (("kind", "unopened"), ("verdict", "rejected")))] == 1
    assert found[(metric, (("kind", "revoke"), ("verdict", "rejected")))] == 1


def test_the_guide_documents_every_metric_and_the_dashboard_uses_only_those() -> None:
    root = Path(__file__).resolve().parents[2]
    guide = (root / "docs" / "operators-guide.md").read_text()
    documented = set(re.findall(r"^\| `(roam_\w+)`", guide, flags=re.MULTILINE))
    tally = HandoffTally()
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for families in (server_families(SERVER_STATUS), client_families(CLIENT_STATUS, tally))
        for family in families
    }
    assert exposed == documented
    dashboard = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"roam_\w+", target["expr"])
    }
    assert used <= documented, used - documented
