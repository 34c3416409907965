"""Parsers of client output, lab records and generated service configs (no lab needed)."""

from __future__ import annotations

import json
import os
import tempfile
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from labs import ConfigError, LabError
from labs.cleanup import LAB_KIND, find_dead_labs, load_lab_record, namespaces_of, workdir_of
from labs.clients import (
    parse_curl_write_out,
    parse_iperf3_json,
    parse_ping,
    parse_redis_benchmark_csv,
    probe_interval_s,
)
from labs.naming import LabId
from labs.services import nginx_config
from migrate.kernel.files import write_private
from migrate.kernel.instances import Instance, InstanceRecord, Netns, record_paths

IPERF3_TCP = {
    "start": {"test_start": {"protocol": "TCP"}},
    "end": {
        "sum_sent": {"seconds": 3.0, "bytes": 7_500_000, "bits_per_second": 20e6, "retransmits": 4},
        "sum_received": {"seconds": 3.0, "bytes": 7_200_000, "bits_per_second": 19.2e6},
    },
}
IPERF3_UDP = {
    "start": {"test_start": {"protocol": "UDP"}},
    "end": {
        "sum_sent": {"seconds": 1.0, "bytes": 600000, "bits_per_second": 5e6, "packets": 3000},
        "sum_received": {
            "seconds": 1.0,
            "bytes": 539800,
            "bits_per_second": 4.5e6,
            "jitter_ms": 0.004,
            "lost_packets": 301,
            "packets": 3000,
            "lost_percent": 10.03,
        },
    },
}


def test_iperf3_tcp_and_udp() -> None:
    tcp = parse_iperf3_json(json.dumps(IPERF3_TCP))
    assert tcp.protocol == "TCP"
    assert tcp.received_mbit == pytest.approx(19.2)
    assert tcp.retransmits == 4
    assert tcp.lost_pct is None
    udp = parse_iperf3_json(json.dumps(IPERF3_UDP))
    assert udp.lost_packets == 301
    assert udp.lost_pct == pytest.approx(10.03)
    assert udp.retransmits is None


def test_iperf3_errors_are_one_line() -> None:
    with pytest.raises(LabError, match="iperf3: unable to connect"):
        parse_iperf3_json(json.dumps({"error": "unable to connect to server"}))
    with pytest.raises(LabError, match="no JSON"):
        parse_iperf3_json("iperf3: error")


def test_redis_benchmark_csv_of_redis_7_and_older() -> None:
    seven = (
        '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
        '"p99_latency_ms","max_latency_ms"\n'
        '"SET","52910.05","0.478","0.120","0.447","0.711","1.015","2.111"\n'
        '"GET","55555.56","0.455","0.112","0.431","0.679","0.967","1.511"\n'
    )
    results = parse_redis_benchmark_csv(seven)
    assert set(results) == {"SET", "GET"}
    assert results["GET"].requests_per_s == pytest.approx(55555.56)
    assert results["SET"].p99_latency_ms == pytest.approx(1.015)
    older = parse_redis_benchmark_csv('"PING_INLINE","49751.24"\n"SET","50000.00"\n')
    assert older["SET"].requests_per_s == 50000.0
    assert older["SET"].p50_latency_ms is None
    assert parse_redis_benchmark_csv("") == {}


def test_curl_write_out() -> None:
    out = json.dumps(
        {
            "http_code": 200,
            "size_download": 1300,
            "time_connect": 0.001,
            "time_starttransfer": 0.003,
            "time_total": 0.004,
            "speed_download": 325000,
            "errormsg": None,
        }
    )
    result = parse_curl_write_out(out, 0, body=b"x")
    assert result.ok
    assert result.size_download_bytes == 1300
    assert result.body == b"x"
    refused = parse_curl_write_out(
        json.dumps({"http_code": 0, "errormsg": "Failed to connect to 10.0.1.1 port 9"}), 7
    )
    assert not refused.ok
    assert refused.error.startswith("Failed to connect")
    nothing = parse_curl_write_out("", 6, stderr="curl: (6) Could not resolve host: x\n")
    assert nothing.http_code == 0
    assert nothing.error == "curl: (6) Could not resolve host: x"


def test_ping_summary() -> None:
    text = (
        "--- 10.0.1.2 ping statistics ---\n"
        "2000 packets transmitted, 1801 received, 9.95% packet loss, time 5030ms\n"
        "rtt min/avg/max/mdev = 0.004/0.020/0.300/0.010 ms\n"
    )
    result = parse_ping(text)
    assert (result.transmitted, result.received) == (2000, 1801)
    assert result.loss_pct == pytest.approx(9.95)
    assert result.rtt_avg_ms == pytest.approx(0.020)
    lost = parse_ping("3 packets transmitted, 0 received, 100% packet loss, time 2050ms\n")
    assert lost.rtt_avg_ms is None
    assert lost.loss_pct == 100.0
    with pytest.raises(LabError):
        parse_ping("ping: connect: Network is unreachable")


def test_probe_pacing() -> None:
    # 242 bytes on the wire at 1 Mbit/s: one probe every 1.936 ms
    assert probe_interval_s(1.0, 200) == pytest.approx(0.001936)


def test_nginx_config_keeps_everything_in_its_directory(tmp_path: Path) -> None:
    config = nginx_config(tmp_path, Path("/srv/www"), IPv4Address("10.0.1.1"), 8080)
    assert "daemon off;" in config
    assert f"pid {tmp_path}/nginx.pid;" in config
    assert f"error_log {tmp_path}/error.log" in config
    assert f"client_body_temp_path {tmp_path}/client_body;" in config
    assert "listen 10.0.1.1:8080;" in config
    assert "root /srv/www;" in config


def test_lab_record_round_trip_and_validation(tmp_path: Path) -> None:
    lab_id = LabId(os.getpid(), "abcd")
    workdir = Path(tempfile.gettempdir()) / f"roam-{lab_id}-x"
    instance = Instance.start(LAB_KIND, directory=tmp_path, token=lab_id.token)
    instance.add_workdir(workdir)
    instance.add_netns(lab_id.namespace("a"))
    path = instance.path
    assert path.name == f"lab-{os.getpid()}-abcd.json"
    loaded_id, loaded = load_lab_record(path)
    assert (loaded_id, loaded) == (lab_id, instance.record)
    assert loaded.owner_alive()
    assert record_paths(tmp_path) == [path]
    assert (namespaces_of(loaded), workdir_of(loaded)) == ([lab_id.namespace("a")], workdir)
    # a record may only name namespaces and a work directory of its own lab
    good = json.loads(path.read_text())
    for created, reason in (
        ({"object": "netns", "name": "some-foreign-namespace"}, "namespace that is not its own"),
        ({"object": "workdir", "path": "/etc"}, "directory that is not its own"),
        ({"object": "file", "path": "/etc/passwd"}, "which labs never make"),
    ):
        path.write_text(json.dumps({**good, "created": [created]}))
        with pytest.raises(ConfigError, match=reason):
            load_lab_record(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="malformed"):
        load_lab_record(path)
    path.unlink()


def test_dead_owner_is_found_and_live_owner_is_not(tmp_path: Path) -> None:
    live = Instance.start(LAB_KIND, directory=tmp_path, token="0001")
    # pid_max is at most 2**22; this pid cannot exist
    dead_id = LabId(4_194_999, "0002")
    dead = InstanceRecord(LAB_KIND, dead_id.owner_pid, 12345, dead_id.token, None, 1)
    dead.created.append(Netns(dead_id.namespace("h")))
    write_private(tmp_path / dead.filename, dead.encode())
    found, problems = find_dead_labs(tmp_path)
    ids = {lab.lab_id for lab in found}
    assert dead_id in ids
    assert LabId(os.getpid(), "0001") not in ids
    assert problems == []
    live.close()


def test_a_log_line_still_being_written_is_left_for_the_next_read(tmp_path) -> None:
    """Found in CI: the load test read a shim's JSON log while the shim appended a long event,
    saw half of it, and failed with JSONDecodeError."""
    from labs.roaming import read_json_lines

    log = tmp_path / "shim.jsonl"
    assert read_json_lines(log) == []
    log.write_text('{"event": "start"}\n{"event": "roam", "outc')
    assert read_json_lines(log) == [{"event": "start"}]
    with log.open("a") as appending:
        appending.write('omes": {}}\n')
    assert read_json_lines(log) == [{"event": "start"}, {"event": "roam", "outcomes": {}}]


def test_a_deferred_hand_over_counts_as_failed_unless_a_later_roam_moved_it() -> None:
    from labs.faults import unfinished

    def handoff(port: int, epoch: int, outcome: str) -> dict[str, object]:
        return {"port": port, "epoch": epoch, "outcome": outcome, "detail": ""}

    moved_later = [handoff(1, 5, "deferred"), handoff(1, 6, "migrated")]
    closed_later = [handoff(2, 5, "deferred"), handoff(2, 7, "closed")]
    never = [handoff(3, 5, "deferred"), handoff(3, 4, "migrated")]  # moved before, not after
    other_port = [handoff(4, 5, "deferred"), handoff(5, 6, "migrated")]
    failed = [handoff(6, 5, "failed"), handoff(6, 6, "migrated")]  # a failure stays one
    events = moved_later + closed_later + never + other_port + failed
    assert unfinished(events) == [never[0], other_port[0], failed[0]]
