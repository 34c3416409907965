"""A new server that cannot answer in its window: the connections wait for the next roam.

When the next server cannot prepare the client's connections within its epoch (here its shim
is stopped, SIGSTOP, from before its PREPAREs until after its epoch; in production, an epoch
too short for the number of connections on a loaded pool), the client does not reset them:
it keeps them frozen through the switch and moves them at the next roam, to another server,
from their checkpoints (docs/protocol.md, "A new server that cannot be ready in its window").
The application's GETs wait about an epoch, and every one is answered.

The same holding serves a client whose own host stalled through the new server's window
(docs/protocol.md, "A client that finds itself late"): it sends no COMMIT that would be LATE.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from labs import Lab, PoolTopo
from labs.benchmarks.roaming.orchestration import benchmark_argv, deploy, serve_files_with_nginx
from labs.roaming import LISTEN_PORT, SERVICE_PORT, RoamingLab
from labs.waiting import poll, wait_for
from migrate.handover import DEFER_WITHIN_S

pytestmark = pytest.mark.system

LabFactory = Callable[..., Lab]  # the lab_factory fixture (tests/system/conftest.py)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNECTIONS = 10
TICK = 1.0


def nginx_pool(lab_factory: LabFactory) -> RoamingLab:
    """Three servers, each with nginx serving ``/small`` (100 bytes), and the shims in live
    mode; stopped again if anything fails on the way."""
    lab = lab_factory(PoolTopo(servers=3, clients=1))
    pool = RoamingLab(lab, tick=TICK, m=1, service="none", start_delay=2.0)
    try:
        serve_files_with_nginx(pool, {"small": os.urandom(100)}, SERVICE_PORT)
        deploy(pool, mode="live", servers=list(pool.server_hosts), tick=TICK)
    except BaseException:
        pool.stop()
        raise
    return pool


def busy_client(pool: RoamingLab, tail: float) -> subprocess.Popen[str]:
    """``CONNECTIONS`` keep-alive connections opened within a second, each GETting every
    0.2 s for ``tail`` seconds more."""
    argv = benchmark_argv(
        "--role", "busy-client", "--host", pool.vip, "--port", LISTEN_PORT,
        "--path", "/small", "--rate", CONNECTIONS, "--seconds", 1, "--interval", 0.2,
        "--tail", round(tail, 1),
    )  # fmt: skip
    return pool.lab["c1"].popen(argv, cwd=PROJECT_ROOT, stdout=-1, stderr=-1, text=True)


def stalled_switch(pool: RoamingLab, earliest: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two switches in a row, the first at least ``earliest`` from now, the second to another
    server within ``DEFER_WITHIN_S`` of it: the first's server is the one stopped."""
    epochs = pool.schedule(1, 200)
    switches = [b for a, b in itertools.pairwise(epochs) if a["server"] != b["server"]]
    now = time.time()
    for first, second in itertools.pairwise(switches):
        if (
            first["start"] >= now + earliest
            and second["server"] != first["server"]
            and second["start"] - first["start"] <= DEFER_WITHIN_S - 0.5
        ):
            return first, second
    pytest.fail("the schedule offers no two roams close enough in its first 200 epochs")


def test_connections_the_new_server_cannot_prepare_wait_for_the_next_roam(
    lab_factory: LabFactory,
) -> None:
    pool = nginx_pool(lab_factory)
    try:
        first, second = stalled_switch(pool, earliest=6.0)
        stalled = pool.host_of(first["server"])
        # Connections open well before the stalled roam, GETting until after the next one.
        tail = second["start"] + 3.0 - time.time()
        client = busy_client(pool, tail)
        # Stopped before the client's PREPAREs reach it (the lead is well under a second for
        # ten connections), resumed once its epoch is over.
        shim = pool.servers[stalled].process
        time.sleep(max(0.0, first["start"] - 1.5 - time.time()))
        shim.send_signal(signal.SIGSTOP)
        try:
            time.sleep(max(0.0, second["start"] + 0.5 - time.time()))
        finally:
            shim.send_signal(signal.SIGCONT)
        out, err = client.communicate(timeout=tail + 60)
        events = pool.clients["c1"].events()
    finally:
        pool.stop()
    assert out.strip(), err[-800:]
    result = json.loads(out.strip().splitlines()[-1])
    handoffs = [e for e in events if e["event"] == "handoff"]
    at_first = [e["outcome"] for e in handoffs if e["epoch"] == first["epoch"]]
    at_second = [e["outcome"] for e in handoffs if e["epoch"] == second["epoch"]]
    summary = {k: v for k, v in result.items() if k != "errors"}
    assert at_first == ["deferred"] * CONNECTIONS, (at_first, handoffs[-25:])
    assert at_second == ["migrated"] * CONNECTIONS, (at_second, handoffs[-25:])
    assert result["opened"] == CONNECTIONS, summary
    assert result["broken"] == 0, (summary, result["errors"][:3])
    assert result["answered"] == result["gets"], summary


def consecutive_switches(
    pool: RoamingLab, earliest: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A switch at least ``earliest`` from now and the next one, to another server within
    ``DEFER_WITHIN_S - 0.5`` of it (so the first roam may hold connections for the second),
    that is not the server before the first either: a stalled client's segments still go to
    that one, and a server the service comes back to resets connections it no longer has."""
    epochs = pool.schedule(1, 200)
    now = time.time()
    switches = [i for i in range(1, len(epochs)) if epochs[i]["server"] != epochs[i - 1]["server"]]
    for a, b in itertools.pairwise(switches):
        before, first, second = epochs[a - 1], epochs[a], epochs[b]
        if (
            first["start"] >= now + earliest
            and second["start"] - first["start"] <= DEFER_WITHIN_S - 0.5
            and second["server"] != before["server"]
        ):
            return first, second
    pytest.fail("the schedule offers no three servers in a row close enough in 200 epochs")


def test_a_client_stalled_past_the_new_servers_window_holds_its_connections(
    lab_factory: LabFactory,
) -> None:
    """The client's shim is stopped (SIGSTOP: a starved or paused host) once the new server has
    answered its PREPAREs, and resumed after that server's window for the epoch closed. Its
    COMMITs would be answered LATE and every connection reset; instead none is sent, the
    connections are held, and the next roam (at once: the client is behind) moves them."""
    pool = nginx_pool(lab_factory)
    try:
        first, second = consecutive_switches(pool, earliest=6.0)
        new_server = pool.servers[pool.host_of(first["server"])]
        # The first server's window for the epoch closes when its run of epochs ends (at the
        # second switch) plus delta and gamma; the COMMITs would come after it.
        closes = second["start"] + pool.delta + pool.gamma
        tail = second["start"] + 3.0 - time.time()
        client = busy_client(pool, tail)
        shim = pool.clients["c1"]

        def prepared() -> bool:
            since = first["start"] - 1.5
            answered = [
                e for e in new_server.events() if e["event"] == "prepared" and e["ts"] > since
            ]
            return len(answered) >= CONNECTIONS

        wait_for(
            "the new server's prepared connections",
            prepared,
            first["start"] + 2 - time.time(),
            0.01,
        )
        stopped_at = time.time()
        shim.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(max(0.0, closes + 0.2 - time.time()))
        finally:
            shim.process.send_signal(signal.SIGCONT)
        out, err = client.communicate(timeout=tail + 60)

        def moved_on() -> list[dict[str, Any]]:
            events = shim.events()
            done = any(e["event"] == "roam" and e["epoch"] >= second["epoch"] for e in events)
            return events if done else []

        events = poll(moved_on, 10.0) or shim.events()
    finally:
        pool.stop()
    assert stopped_at < first["start"], "the client was stopped after the boundary: no stall"
    assert out.strip(), err[-800:]
    result = json.loads(out.strip().splitlines()[-1])
    handoffs = [e for e in events if e["event"] == "handoff"]
    at_first = [e for e in handoffs if e["epoch"] == first["epoch"]]
    at_second = [e["outcome"] for e in handoffs if e["epoch"] == second["epoch"]]
    summary = {k: v for k, v in result.items() if k != "errors"}
    roams = [
        {k: e[k] for k in ("ts", "event", "epoch", "outcomes", "reason") if k in e}
        for e in events
        if e["event"] in ("roam", "switch", "handoff_failed")
    ][-6:]
    closed = [(e["ts"], e["port"], e["detail"]) for e in at_first if e["outcome"] != "deferred"]
    diagnosis = json.dumps(
        {"first": first, "second": second, "stopped_at": stopped_at, "roams": roams,
         "not_deferred": closed[:3], "client": summary, "errors": result["errors"][:3]}
    )  # fmt: skip
    assert [e["outcome"] for e in at_first] == ["deferred"] * CONNECTIONS, diagnosis
    assert all("give-up time" in e["detail"] for e in at_first), diagnosis
    assert at_second == ["migrated"] * CONNECTIONS, diagnosis
    assert result["opened"] == CONNECTIONS, diagnosis
    assert result["broken"] == 0, diagnosis
    assert result["answered"] == result["gets"], diagnosis
