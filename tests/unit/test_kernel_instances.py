"""Pure parts of instance records: specs, serialization, liveness, file-only instances.

Nothing here touches the kernel's tables, rules or routes; records live in a temporary run
directory (``SERVER_ROAMING_RUN_DIR``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from migrate.errors import ConfigError
from migrate.kernel.instances import (
    ChildProcess,
    Instance,
    InstanceError,
    InstanceRecord,
    InstanceRecordError,
    IpRoute,
    IpRule,
    Netns,
    NftTable,
    OwnedFile,
    RouteSpec,
    RuleSpec,
    SysctlRestore,
    WorkDir,
    XtQueueRule,
    instances_dir,
)
from migrate.kernel.processes import is_alive, process_start_time


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SERVER_ROAMING_RUN_DIR", str(tmp_path))
    return tmp_path / "instances"


RULE = RuleSpec(priority=4700, table=4700, src="127.0.0.1/32", ip_proto=6, sport=8080)
ROUTE = RouteSpec(dst="0.0.0.0/0", table=4700, type="local", oif=1, dev="lo", scope=254)


def full_record() -> InstanceRecord:
    return InstanceRecord(
        kind="server",
        pid=4242,
        starttime=123456,
        token="0a1b2c3d",
        netns="roam-lab-s1",
        netns_inode=4026532000,
        created=[
            NftTable("inet", "roam_srv_4242"),
            SysctlRestore("net.ipv4.conf.all.route_localnet", "0"),
            IpRoute(ROUTE),
            IpRule(RULE),
            IpRoute(RouteSpec(dst="10.99.0.1/32", oif=3, dev="eth0", gateway="10.0.0.1")),
            ChildProcess(4300, 123500),
            OwnedFile("/run/server-roaming/x.sock"),
            WorkDir("/tmp/roam-4242-abcd-x1"),
            Netns("roam-4242-abcd-r1"),
            XtQueueRule("ip", 4243),
        ],
    )


def test_rule_spec_as_pyroute2_arguments_and_text() -> None:
    assert RULE.kwargs() == {
        "family": 2,
        "priority": 4700,
        "table": 4700,
        "src": "127.0.0.1",
        "src_len": 32,
        "ip_proto": 6,
        "sport_range": "8080:8080",
    }
    assert (
        RULE.describe() == "ip rule pref 4700 from 127.0.0.1/32 ipproto tcp sport 8080 lookup 4700"
    )
    marked = RuleSpec(priority=100, table=254, fwmark=1, fwmask=0xFF)
    assert marked.describe() == "ip rule pref 100 from all fwmark 0x1/0xff lookup main"


def test_route_spec_as_pyroute2_arguments_and_text() -> None:
    assert ROUTE.kwargs() == {
        "family": 2,
        "dst": "0.0.0.0/0",
        "table": 4700,
        "type": "local",
        "oif": 1,
        "scope": 254,
    }
    assert ROUTE.describe() == "ip route local 0.0.0.0/0 dev lo table 4700"
    via = RouteSpec(dst="10.99.0.1/32", oif=3, dev="eth0", gateway="10.0.0.1", prefsrc="10.0.0.2")
    assert via.describe() == "ip route 10.99.0.1/32 via 10.0.0.1 dev eth0 src 10.0.0.2 table main"


@pytest.mark.parametrize(
    "make",
    [
        lambda: RuleSpec(priority=0, table=4700),
        lambda: RuleSpec(priority=40000, table=4700),
        lambda: RuleSpec(priority=1, table=4700, src="::1/128"),
        lambda: RuleSpec(priority=1, table=4700, sport=70000),
        lambda: RuleSpec(priority=1, table=4700, src="10.0.0.1/8"),
        lambda: RouteSpec(dst="nonsense"),
        lambda: RouteSpec(dst="10.0.0.0/8", type="nat"),
        lambda: RouteSpec(dst="10.0.0.0/8", gateway="x"),
        lambda: SysctlRestore("kernel.panic", "0"),
        lambda: SysctlRestore("net.ipv4/../../x", "0"),
        lambda: NftTable("inet", "bad name"),
        lambda: OwnedFile("relative/path"),
        lambda: WorkDir("relative/path"),
        lambda: Netns("../escape"),
    ],
)
def test_invalid_specs_are_refused(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]


def test_record_round_trip() -> None:
    record = full_record()
    decoded = InstanceRecord.decode(record.encode())
    assert decoded == record
    assert decoded.filename == "server-4242-0a1b2c3d.json"
    assert decoded.tables == [("inet", "roam_srv_4242")]
    assert decoded.rules == [RULE]
    assert decoded.routes[0] == ROUTE
    assert decoded.children == [(4300, 123500)]
    assert decoded.files == ["/run/server-roaming/x.sock"]
    assert decoded.sysctls == [("net.ipv4.conf.all.route_localnet", "0")]
    # a route's own "type" does not clash with the entry's tag
    entries = json.loads(record.encode())["created"]
    assert entries[2]["object"] == "route"
    assert entries[2]["type"] == "local"


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(extra=1),
        lambda d: d.update(pid="1"),
        lambda d: d.update(pid=True),
        lambda d: d.update(kind="Server!"),
        lambda d: d.update(token="zz"),
        lambda d: d.update(netns="../etc"),
        lambda d: d.update(created={}),
        lambda d: d["created"].append({"object": "bomb"}),
        lambda d: d["created"].append({"object": "file", "path": "/x", "mode": 1}),
        lambda d: d["created"].append({"object": "rule", "priority": 1}),
        lambda d: d["created"].append({"object": "sysctl", "key": "kernel.x", "old": "0"}),
        lambda d: d["created"].append({"object": "xt_queue", "family": "inet", "queue": 1}),
        lambda d: d["created"].append({"object": "xt_queue", "family": "ip", "queue": 70000}),
        lambda d: d["created"].append({"object": "xt_queue", "family": "ip"}),
    ],
)
def test_malformed_records_are_refused(change: object) -> None:
    data = full_record().to_json()
    change(data)  # type: ignore[operator]
    with pytest.raises(InstanceRecordError):
        InstanceRecord.decode(json.dumps(data).encode())


def test_not_json_is_refused() -> None:
    with pytest.raises(InstanceRecordError, match="not JSON"):
        InstanceRecord.decode(b"{")


def test_liveness_uses_the_start_time() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    assert is_alive(me, start)
    assert not is_alive(me, start + 1)  # same pid, another process: a reused pid
    done = subprocess.Popen(["true"])
    done.wait()
    assert process_start_time(done.pid) is None
    assert not is_alive(done.pid, start)


def test_run_directory_follows_the_environment(run_dir: Path) -> None:
    assert instances_dir() == run_dir


def test_file_instance_records_before_and_cleans_on_close(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "state.sock"
    with Instance.start("test") as instance:
        assert instance.path.parent == run_dir
        instance.add_file(target)
        on_disk = InstanceRecord.load(instance.path)
        assert on_disk.files == [str(target)]  # recorded before the file exists
        assert on_disk.pid == os.getpid()
        target.write_text("x")
        assert instance.table_name("srv") == f"roam_srv_{os.getpid()}"
    assert not target.exists()
    assert list(run_dir.glob("*.json")) == []
    assert instance.close() == []  # idempotent
    with pytest.raises(InstanceError, match="closed"):
        instance.add_file(target)


def test_children_are_stopped_on_close(run_dir: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        instance = Instance.start("test")
        instance.add_child(sleeper.pid)
        lines = instance.close()
        assert lines == [f"stopped process {sleeper.pid}"]
        assert sleeper.wait(timeout=5) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_undo_one_object(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "a"
    with Instance.start("test") as instance:
        instance.add_file(target)
        assert instance.undo(OwnedFile(str(target))) == f"file {target} already gone"
        assert instance.record.created == []
        with pytest.raises(InstanceError, match="not recorded"):
            instance.undo(OwnedFile(str(target)))


def test_a_work_directory_is_removed_whole_and_a_symlink_left_alone(
    run_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "f").write_text("x")
    with Instance.start("test") as instance:
        instance.add_workdir(work)
        assert InstanceRecord.load(instance.path).created == [WorkDir(str(work))]
    assert not work.exists()
    # a recorded directory replaced by a symlink (a local user's trick) is not followed
    target = tmp_path / "keep"
    target.mkdir()
    (target / "f").write_text("x")
    instance = Instance.start("test")
    instance.add_workdir(work)
    work.symlink_to(target)
    with pytest.raises(InstanceError, match="symbolic link"):
        instance.close()
    assert (target / "f").exists()
    assert InstanceRecord.load(instance.path).created == [WorkDir(str(work))]  # kept for cleanup
    work.unlink()
    assert instance.close() == [f"directory {work} already gone"]


def test_an_instance_may_choose_its_token(run_dir: Path) -> None:
    with Instance.start("lab", token="abcd") as instance:
        assert instance.path.name == f"lab-{os.getpid()}-abcd.json"
    with pytest.raises(ConfigError, match="token"):
        Instance.start("lab", token="../x")


def test_invalid_kind_and_missing_namespace(run_dir: Path) -> None:
    with pytest.raises(ConfigError):
        Instance.start("Bad Kind")
    with pytest.raises(ConfigError, match="does not exist"):
        Instance.start("test", netns="roam-no-such-namespace-xyz")
