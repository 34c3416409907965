"""k of N in the shims (PROTOCOL.md section 4): the pure answers they ask for (a server's gate
and the clients it admits, a client's server and its next change), and the server shim's gate
plan with k > 1."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from client_shim.daemon import ClientShim
from migrate.activeset import ActiveSchedule
from migrate.endpoints import Endpoint, parse_address_and_port
from migrate.gating import gate_at
from migrate.kernel.deployment import load_bundle
from migrate.kernel.eventlog import EventLog
from migrate.suspects import parse_report
from proxy.daemon import ServerOptions, ServerShim
from proxy.rules import SYN_COUNTER, gate_table_body
from roam_cli.main import main
from tests.unit.test_activeset import SIX, schedule, server
from tests.unit.test_control_handling import SERVERS, make_shim

CLIENTS = (1, 2, 7)
# Times around the boundaries of the section 4 vector (epochs start 0, 48, 88, 117, 170, 214).
PROBES = [x * 0.25 for x in range(0, 880)]


def test_gate_is_open_exactly_in_the_windows_of_the_set():
    active = ActiveSchedule(schedule(delta=0.5, gamma=0.5), 3)
    for now in PROBES:
        open_now = active.open_servers(now)
        for member in SIX:
            is_open, epoch, is_active, until = active.gate_at(member, now)
            assert is_open == (member in open_now), (member, now)
            assert epoch == active.schedule.epoch_at(now).index
            assert is_active == (member in active.active(epoch))
            assert until > now
            # Nothing changes before ``until``: the answer just before it is the same.
            assert active.gate_at(member, until - 1e-6)[0] == is_open


def test_k1_gate_matches_section1():
    plain = schedule(delta=0.5, gamma=0.5)
    active = ActiveSchedule(schedule(delta=0.5, gamma=0.5), 1)
    for now in PROBES:
        for member in SIX:
            expected = gate_at(plain, member, now)
            assert active.gate_at(member, now)[:3] == (
                expected.open,
                expected.epoch,
                expected.active,
            ), (member, now)


def test_a_member_admits_only_its_assigned_clients():
    active = ActiveSchedule(schedule(delta=0.5, gamma=0.5), 3)
    for now in PROBES:
        for member in SIX:
            admitted = active.admitted(member, CLIENTS, now)
            assert admitted == {c for c in CLIENTS if active.admits(member, c, now)}
            if admitted:
                assert member in active.open_servers(now)
    # Epoch 1 (section 4's table): client 1 on .2, clients 2 and 7 on .6, nobody on .5.
    assert active.admitted(server(".2"), CLIENTS, 10.0) == {1}
    assert active.admitted(server(".6"), CLIENTS, 10.0) == {2, 7}
    assert active.admitted(server(".5"), CLIENTS, 10.0) == frozenset()
    # Near the boundary into epoch 2 (48.0), client 1 moves .2 -> .3: both admit it.
    assert 1 in active.admitted(server(".2"), CLIENTS, 48.2)
    assert 1 in active.admitted(server(".3"), CLIENTS, 48.2)
    assert 1 not in active.admitted(server(".2"), CLIENTS, 49.0)


def test_a_client_switches_only_when_its_server_changes():
    active = ActiveSchedule(schedule(), 3)
    # Client 7 is on .6 in epochs 1-4, on .5 in epoch 5 (starts 170.0).
    assert active.client_switch(7, 1.0) == (5, 170.0, server(".5"))
    assert active.client_leaving(server(".6"), 7, 1.0) == 170.0
    assert active.client_leaving(server(".5"), 7, 1.0) is None
    # Client 1: .2 in epoch 1, .3 in epoch 2.
    assert active.client_switch(1, 1.0) == (2, 48.0, server(".3"))
    for now in PROBES:
        for client in CLIENTS:
            switch = active.client_switch(client, now)
            current = active.schedule.epoch_at(now).index
            assert switch is not None
            index, start, target = switch
            mine = active.client_epoch(client, current)
            assert target != mine
            assert target == active.client_epoch(client, index)
            assert all(active.client_epoch(client, i) == mine for i in range(current, index))
            assert start == active.schedule.start_of(index)


def make_active_deployment(tmp_path: Path, k: int) -> Path:
    directory = tmp_path / "dep"
    start = str(round(time.time() - 5))
    init = ["init", str(directory), "--servers", SERVERS, "--vip", "10.99.0.1"]
    init += ["--chain-length", "100000", "--m", "3", "--tick", "1", "--start", start]
    assert main([*init, "--active", str(k)]) == 0
    for index, name in enumerate(("alice", "bob", "carol", "dave", "erin")):
        subscribe = ["subscribe", str(directory), name, "--address", f"10.0.0.{60 + index}"]
        bundle = str(tmp_path / name)
        assert main([*subscribe, "--until-epoch", "50000", "--out", bundle]) == 0
    return directory


def test_the_server_gate_admits_the_clients_assigned_to_it(tmp_path: Path) -> None:
    directory = make_active_deployment(tmp_path, 2)
    now = time.time()
    shim = make_shim(directory, clock=lambda: now)
    assert shim.k == 2
    active = shim.active_schedule()
    me = shim.options.listen
    ids = [c.client_id for c in shim.pool.clients.clients]
    gate = shim._gate_at(now)
    shim._admit_now(now)
    assert gate.open == (me in active.open_servers(now))
    plan = shim._plan(gate)
    expected = {c.address for c in shim.pool.clients.clients if active.admits(me, c.client_id, now)}
    assert set(plan.allowed) == expected
    assert shim.admitted == active.admitted(me, ids, now)
    # Each assigned client's connections leave when its server changes.
    for client in shim.pool.clients.clients:
        leaving = shim.client_leaving_at(client.client_id)
        assert leaving == active.client_leaving(me, client.client_id, now)


def test_k1_server_plan_is_unchanged(tmp_path: Path) -> None:
    directory = make_active_deployment(tmp_path, 1)
    now = time.time()
    shim = make_shim(directory, clock=lambda: now)
    gate = shim._gate_at(now)
    assert gate == gate_at(shim.pool.schedule, shim.options.listen, now)
    assert set(shim._plan(gate).allowed) == {c.address for c in shim.pool.clients.clients}


def make_client(tmp_path: Path, name: str, now: float) -> Any:
    bundle_path = tmp_path / name
    log = EventLog("client", stream=io.StringIO())
    return ClientShim(
        load_bundle(bundle_path),
        bundle_path=bundle_path,
        state_path=tmp_path / f"{name}.state",
        status_path=tmp_path / f"{name}.status",
        log=log,
        clock=lambda: now,
    )


def test_each_client_targets_the_server_that_admits_it(tmp_path: Path) -> None:
    directory = make_active_deployment(tmp_path, 2)
    now = time.time()
    # The server shims' view (each computes the same schedule; one stands for all).
    server_view = make_shim(directory, clock=lambda: now).active_schedule()
    pool = [Endpoint.parse(listen) for listen in SERVERS.split(",")]
    for name in ("alice", "bob", "carol", "dave", "erin"):
        client = make_client(tmp_path, name, now)
        assert client.k == 2
        epoch = client._epoch_now()
        mine = client.server_of(epoch)
        # Exactly the client's server admits it, in the middle of an epoch.
        middle = epoch.start + epoch.length / 2
        client_id = client.bundle.client_id
        holders = [s for s in pool if client_id in server_view.admitted(s, [client_id], middle)]
        assert holders == [mine]
        index, _start, server = client._next_switch(now)
        assert server != mine
        assert client.server_of(client.schedule.epoch(index)) == server
        assert all(
            client.server_of(client.schedule.epoch(i)) == mine for i in range(epoch.index, index)
        )
        client.current, client.target = epoch, mine
        status = client.status()
        assert status["server"] == str(mine)
        assert status["active"] == 2
        assert str(mine) in status["active_set"]


def test_client_status_names_k_and_the_set(tmp_path: Path, capsys: Any) -> None:
    from tests.unit.test_client_status import status_file

    path = status_file(tmp_path, active=2, active_set=["10.0.0.3:80", "10.0.0.2:80"])
    assert main(["client", "status", "--status", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "epoch 42 on 10.0.0.2:80" in out
    assert "k of N: 2 active servers (10.0.0.3:80, 10.0.0.2:80)" in out
    path = status_file(tmp_path)
    assert main(["client", "status", "--status", str(path)]) == 0
    assert "k of N" not in capsys.readouterr().out


def server_shim(directory: Path, listen: str, now: float) -> ServerShim:
    options = ServerOptions(
        directory,
        parse_address_and_port(listen, 80),
        parse_address_and_port("127.0.0.1:8000", 8000),
    )
    return ServerShim(options, EventLog("server", stream=io.StringIO()), clock=lambda: now)


def test_the_servers_attack_reports_are_what_roam_suspects_reads(
    tmp_path: Path, capsys: Any
) -> None:
    directory = make_active_deployment(tmp_path, 2)
    now = time.time()
    shims = [server_shim(directory, listen, now) for listen in SERVERS.split(",")]
    names = {str(server): index for index, server in enumerate(shims[0].deployment.servers)}
    insider = shims[0].pool.clients.by_name("carol").client_id
    active = shims[0].active_schedule()
    written = 0
    for epoch in range(1, 41):
        members = active.indices(epoch)
        flooded = active.assignment(epoch).server_of(insider)
        for index, shim in enumerate(shims):
            dropped = 50_000 if index == flooded else 2
            line = shim.attack_report_line(epoch, dropped, 7, 0)
            if index not in members:
                assert line is None  # no summary for an epoch it was not active in
                continue
            assert line is not None
            report = parse_report(line, names, "test")
            assert (report.epoch, report.server, report.dropped, report.syn) == (
                epoch,
                index,
                dropped,
                7,
            )
            shim.reports_path.parent.mkdir(parents=True, exist_ok=True)
            with shim.reports_path.open("a") as stream:
                stream.write(line + "\n")
            written += 1
    capsys.readouterr()  # what init and subscribe printed
    assert main(["suspects", str(directory), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["reports"] == written
    assert document["suspects"][0]["client"] == "carol"
    assert document["attacks_outside_active_set"] == 0


def test_roam_suspects_without_reports_says_where_it_looked(tmp_path: Path, capsys: Any) -> None:
    directory = make_active_deployment(tmp_path, 2)
    assert main(["suspects", str(directory)]) != 0
    assert "no attack reports in" in capsys.readouterr().err


def test_syns_are_counted_only_with_k_above_1(tmp_path: Path) -> None:
    now = time.time()
    for k, counted in ((1, False), (2, True)):
        directory = make_active_deployment(tmp_path / str(k), k)
        shim = make_shim(directory, clock=lambda: now)
        plan = shim._plan(shim._gate_at(now))
        assert plan.count_syns == counted
        assert (SYN_COUNTER in gate_table_body(plan)) == counted


def test_a_client_gives_up_before_its_own_servers_window_closes(tmp_path: Path) -> None:
    make_active_deployment(tmp_path, 2)
    now = time.time()
    client = make_client(tmp_path, "alice", now)
    params = client.schedule.params
    first = client._epoch_now().index
    for index in range(first, first + 30):
        mine = client.server_of(client.schedule.epoch(index))
        last = index
        while client.server_of(client.schedule.epoch(last + 1)) == mine:
            last += 1
        run_closes = client.schedule.epoch(last).end + params.delta + params.gamma
        assert client._client_served_until(index, run_closes + 100) == run_closes
        own = client.schedule.epoch(index).end + params.delta + params.gamma
        assert client._client_served_until(index, own - 0.01) == own


def test_a_gate_due_to_open_is_open_before_the_tick_and_one_due_to_close_until_it(
    tmp_path: Path,
) -> None:
    """A busy loop runs a datagram before the tick's timer: a COMMIT that came a few ms after
    this server's window opened (its client's clock ahead) found the gate closed and was
    refused, the connection reset (CI, a client delta ahead). The gate's state is its last
    tick's, except that a gate due to open is open; one due to close stays open until the
    tick closes it and leaves its connections."""
    directory = make_active_deployment(tmp_path, 1)
    clock = {"now": time.time()}
    shim = make_shim(directory, clock=lambda: clock["now"])
    me = shim.options.listen
    schedule = shim.pool.schedule
    index = schedule.epoch_at(clock["now"]).index + 2
    while not (
        schedule.window(index).server == me
        and not gate_at(schedule, me, schedule.window(index).opens - 0.001).open
    ):
        index += 1
    window = schedule.window(index)

    def tick_at(when: float) -> None:
        clock["now"] = when
        gate = shim._gate_at(when)
        shim.gate, shim.plan = gate, shim._plan(gate)

    tick_at(window.opens - 0.01)
    assert not shim.gate_open
    clock["now"] = window.opens - 0.0001  # not due yet
    assert not shim.gate_open
    clock["now"] = window.opens + 0.003  # due; the tick has not run
    assert shim.gate_open
    tick_at(window.opens + 0.004)
    assert shim.gate_open
    closes = schedule.served_until(index, window.closes + 1.0)
    tick_at(closes - 0.001)
    clock["now"] = closes + 0.003  # due to close: open until the tick has closed it
    assert shim.gate_open
    tick_at(closes + 0.004)
    assert not shim.gate_open
