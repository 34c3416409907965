"""Instance records and ``sweep_dead``: a SIGKILLed owner's objects go, a live one's stay.

Everything is created in a namespace of our own (``roamk<pid>i<n>``), except one unrecorded
table ``roam_test_<dead pid>`` in the root namespace, which the sweep must delete by its name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from migrate.kernel import nft
from migrate.kernel.files import write_private
from migrate.kernel.instances import (
    Instance,
    InstanceError,
    InstanceRecord,
    NftTable,
    OwnedFile,
    RouteSpec,
    RuleSpec,
    read_sysctl,
    sweep_dead,
)
from migrate.kernel.processes import is_alive, process_start_time

pytestmark = pytest.mark.system

SYSCTL = "net.ipv4.conf.all.route_localnet"

CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    from migrate.kernel import nft
    from migrate.kernel.instances import Instance, RouteSpec, RuleSpec
    netns, marker = sys.argv[1], sys.argv[2]
    instance = Instance.start("test", netns=netns)
    name = instance.table_name("test")
    instance.add_table("inet", name, "chain input { type filter hook input priority 0; }")
    instance.add_xt_queue("ip", 4242)
    instance.add_rule(RuleSpec(priority=4800, table=4800, src="10.243.0.9/32"))
    instance.add_route(RouteSpec(dst="10.243.9.0/24", table=4800, type="blackhole"))
    instance.set_sysctl("net.ipv4.conf.all.route_localnet", "1")
    instance.add_file(marker)
    open(marker, "w").close()
    sleeper = subprocess.Popen(["sleep", "60"])
    instance.add_child(sleeper.pid)
    # a table named after this process but never recorded, in the root namespace
    nft.replace_table("inet", name, "")
    print(sleeper.pid, flush=True)
    time.sleep(60)
    """
)


def ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SERVER_ROAMING_RUN_DIR", str(tmp_path))
    return tmp_path / "instances"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_sweep_removes_a_killed_instance_and_keeps_a_live_one(
    netns: str, run_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, netns, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    root_table = f"roam_test_{child.pid}"
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child instance did not start"
        sleeper = int(line)
        sleeper_start = process_start_time(sleeper)
        assert sleeper_start is not None
        with Instance.start("test", netns=netns) as live:
            live_table = live.table_name("live")
            live.add_table("inet", live_table)
            live.add_rule(RuleSpec(priority=4801, table=4801, src="10.243.0.10/32"))
            live.set_sysctl(SYSCTL, "1")
            assert live.record.sysctls == [(SYSCTL, "0")]  # the original, not the child's "1"
            assert len(list(run_dir.glob("*.json"))) == 2

            # a live owner is never swept
            assert sweep_dead(dry_run=True) == []

            child.send_signal(signal.SIGKILL)
            child.wait()
            assert ("inet", root_table) in nft.list_tables()

            planned = sweep_dead(dry_run=True)
            assert any("would delete nft table inet roam_test_" in p for p in planned)
            assert any(f"unrecorded nft table inet {root_table}" in p for p in planned)
            assert ("inet", root_table) in nft.list_tables()  # dry run changed nothing

            removed = sweep_dead()
            text = "\n".join(removed)
            assert f"deleted nft table inet roam_test_{child.pid}" in text
            assert "deleted ip rule pref 4800 from 10.243.0.9/32 lookup 4800" in text
            assert "deleted ip route blackhole 10.243.9.0/24 table 4800" in text
            assert f"stopped process {sleeper}" in text
            assert f"left sysctl {SYSCTL} as it is" in text
            assert f"unrecorded nft table inet {root_table}: deleted" in text
            assert "deleted iptables raw rule for NFQUEUE 4242" in text

            assert not is_alive(sleeper, sleeper_start)
            assert not marker.exists()
            tables = nft.list_tables(netns=netns)
            assert ("inet", f"roam_test_{child.pid}") not in tables
            assert ("inet", live_table) in tables
            assert ("ip", "raw") not in tables  # the rule's table, empty, went with it
            assert ("inet", root_table) not in nft.list_tables()
            shown = ip("-n", netns, "rule", "show")
            assert "lookup 4800" not in shown
            assert "lookup 4801" in shown
            assert ip("-n", netns, "route", "show", "table", "4800") == ""
            assert read_sysctl(SYSCTL, netns=netns) == "1"  # the live instance needs it
            assert [p.name for p in run_dir.glob("*.json")] == [live.path.name]
            assert sweep_dead() == []
        # the live instance, closed, restores the original value
        assert read_sysctl(SYSCTL, netns=netns) == "0"
        assert "lookup 4801" not in ip("-n", netns, "rule", "show")
        assert nft.list_tables(netns=netns) == []
        assert list(run_dir.glob("*.json")) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        nft.delete_table("inet", root_table)


def test_record_of_a_vanished_namespace(run_dir: Path, tmp_path: Path) -> None:
    """Its kernel objects went with the namespace; its files are still removed."""
    leftover = tmp_path / "leftover"
    leftover.write_text("x")
    record = InstanceRecord("test", dead_pid(), 1, "ab", "roamk-gone", netns_inode=1)
    record.created += [OwnedFile(str(leftover)), NftTable("inet", "roam_x_1")]
    write_private(run_dir / record.filename, record.encode())
    lines = sweep_dead()
    assert any("nft table inet roam_x_1 gone with its network namespace" in x for x in lines)
    assert any(f"removed file {leftover}" in x for x in lines)
    assert any(f"removed record {record.filename}" in x for x in lines)
    assert not leftover.exists()
    assert list(run_dir.glob("*.json")) == []


def test_unreadable_record_is_reported_and_left(run_dir: Path) -> None:
    bad = run_dir / "test-1-aa.json"
    write_private(bad, b"{not json")
    assert any("unreadable instance record" in line for line in sweep_dead())
    assert bad.exists()


def test_sweep_in_the_current_namespace(run_dir: Path) -> None:
    """A dead instance that ran in this (root) namespace: its unique table is removed here."""
    pid = dead_pid()
    name = nft.instance_table_name("test", pid)
    record = InstanceRecord(
        "test", pid, 1, "cd", None, netns_inode=os.stat("/proc/self/ns/net").st_ino
    )
    nft.replace_table("inet", name, "")
    try:
        record.created.append(NftTable("inet", name))
        write_private(run_dir / record.filename, record.encode())
        lines = sweep_dead()
        assert f"test instance of pid {pid} (dead): deleted nft table inet {name}" in lines
        assert ("inet", name) not in nft.list_tables()
    finally:
        nft.delete_table("inet", name)


def test_failed_creation_is_not_recorded(netns: str, run_dir: Path) -> None:
    with Instance.start("test", netns=netns) as instance:
        spec = RouteSpec(dst="10.243.7.0/24", table=4802, type="blackhole")
        instance.add_route(spec)
        with pytest.raises(InstanceError, match=r"cannot add ip route blackhole 10\.243\.7\.0/24"):
            instance.add_route(spec)  # exists already: not ours twice
        assert instance.record.routes == [spec]
        with pytest.raises(nft.NftError):
            instance.add_table("inet", instance.table_name("bad"), "chain c { junk }")
        assert instance.record.tables == []
    assert ip("-n", netns, "route", "show", "table", "4802") == ""


DAEMON = textwrap.dedent(
    """
    import time
    from migrate.kernel.instances import Instance, RuleSpec
    instance = Instance.start("test")
    instance.add_table("inet", instance.table_name("srv"))
    instance.add_rule(RuleSpec(priority=4803, table=4803, src="10.243.0.11/32"))
    print(instance.record.netns, flush=True)
    time.sleep(60)
    """
)


def test_daemon_killed_inside_a_namespace_is_swept_from_outside(netns: str, run_dir: Path) -> None:
    """A shim run whole under ``ip netns exec``: the sweep finds its namespace by inode."""
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", DAEMON],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline().strip() == netns  # the record names its namespace
        assert ("inet", f"roam_srv_{daemon.pid}") in nft.list_tables(netns=netns)
        daemon.kill()
        daemon.wait()
        text = "\n".join(sweep_dead())
        assert f"test instance of pid {daemon.pid} in netns {netns} (dead)" in text
        assert f"deleted nft table inet roam_srv_{daemon.pid}" in text
        assert nft.list_tables(netns=netns) == []
        assert "lookup 4803" not in ip("-n", netns, "rule", "show")
        assert list(run_dir.glob("*.json")) == []
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_destroy_orphans_records_its_hush_table_while_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary ``roam_hush_<pid>`` table is in the instance record for as long as it
    exists: a shim killed while it aborts orphans leaves a record the sweep acts on."""
    from migrate.kernel import sockdiag
    from migrate.kernel.orphans import HUSH_FAMILY, destroy_orphans

    monkeypatch.setenv("SERVER_ROAMING_RUN_DIR", str(tmp_path))
    listener = socket.create_server(("127.0.0.1", 0))
    listen = listener.getsockname()
    client = socket.create_connection(listen)
    accepted, _ = listener.accept()
    accepted.close()  # our side becomes an orphan in FIN_WAIT2 (the client keeps its end open)
    seen = []
    real_destroy = sockdiag.destroy

    def destroy(src: tuple[str, int], dst: tuple[str, int]) -> bool:
        seen.append((InstanceRecord.load(instance.path).tables, nft.list_tables()))
        return real_destroy(src, dst)

    monkeypatch.setattr(sockdiag, "destroy", destroy)
    try:
        with Instance.start("server") as instance:
            hush = (HUSH_FAMILY, instance.table_name("hush"))
            assert destroy_orphans(listen, instance) == 1
            assert len(seen) == 1
            recorded, existing = seen[0]
            assert hush in recorded
            assert hush in existing
            assert hush not in InstanceRecord.load(instance.path).tables  # forgotten once deleted
            assert not nft.table_exists(*hush)
            assert destroy_orphans(listen, instance) == 0  # nothing left to abort
    finally:
        client.close()
        listener.close()
