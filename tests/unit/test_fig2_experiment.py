"""The pure parts of ``roam lab fig2``: arrivals, scaling, targets, fixed epochs, reports."""

import csv
import itertools
import json
import os
import random
import statistics

import pytest

from labs.experiments import agents, poisson, report
from labs.experiments.epochs import find_fixed_stretch
from labs.experiments.poisson import (
    Configuration,
    Epoch,
    PaperParams,
    Scaling,
    attack_targets,
    configurations,
    follow_target,
    legit_targets,
    poisson_arrivals,
    roam_times,
    server_at,
    stream_rng,
)
from labs.experiments.report import (
    RESULT_FIELDS,
    Record,
    acceptance,
    make_record,
    markdown_table,
    validate_results,
)
from labs.stats import percentile
from migrate.errors import ConfigError
from migrate.hashchain import KeyChain
from migrate.schedule import epoch_units, server_index
from roam_cli import experiments as cli_experiments
from roam_cli.main import main

SERVERS = ["s1", "s2"]


def alternating(count=7, epoch_s=60.0, first="s1"):
    other = {"s1": "s2", "s2": "s1"}
    epochs, server = [], first
    for index in range(count):
        epochs.append(Epoch(index * epoch_s, server))
        server = other[server]
    return epochs


# --- arrivals and scaling -------------------------------------------------------------------


def test_poisson_arrivals_are_seeded_increasing_and_have_the_mean_gap():
    first = poisson_arrivals(random.Random(7), 8.0, count=2000)
    again = poisson_arrivals(random.Random(7), 8.0, count=2000)
    assert first == again
    assert all(b > a for a, b in itertools.pairwise(first))
    gaps = [b - a for a, b in zip([0.0, *first], first, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(8.0, rel=0.08)
    assert len(poisson_arrivals(random.Random(1), 8.0, count=20)) == 20


def test_poisson_arrivals_until_a_time():
    arrivals = poisson_arrivals(random.Random(3), 1.0, until_s=300.0)
    assert all(0 < t < 300.0 for t in arrivals)
    assert 240 < len(arrivals) < 360  # 300 expected; about 5.8 standard deviations of room
    assert poisson_arrivals(random.Random(3), 1.0, until_s=0.0) == []


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"count": 3, "until_s": 3.0}, {"count": -1}, {"until_s": float("inf")}],
)
def test_poisson_arrivals_refuse_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        poisson_arrivals(random.Random(0), 1.0, **kwargs)


@pytest.mark.parametrize("mean", [0.0, -1.0, float("nan")])
def test_poisson_arrivals_refuse_bad_means(mean):
    with pytest.raises(ConfigError):
        poisson_arrivals(random.Random(0), mean, count=1)


def test_streams_differ_by_purpose_and_repeat_but_not_by_mode():
    a = poisson_arrivals(stream_rng(0, 0, "legit"), 8.0, count=5)
    assert a == poisson_arrivals(stream_rng(0, 0, "legit"), 8.0, count=5)
    assert a != poisson_arrivals(stream_rng(0, 1, "legit"), 8.0, count=5)
    assert a != poisson_arrivals(stream_rng(1, 0, "legit"), 8.0, count=5)
    assert a != poisson_arrivals(stream_rng(0, 0, "attack"), 8.0, count=5)


def test_scaling_divides_times_and_multiplies_rates():
    scaling = Scaling(10)
    assert scaling.to_lab(60.0) == 6.0
    assert scaling.to_paper(6.0) == 60.0
    assert scaling.rate(2.0) == 20.0
    params = PaperParams()
    # the shape is kept: a file still takes epoch/15 of an epoch on an empty link
    lab_file_s = params.file_bytes * 8 / (scaling.rate(params.rate_mbit) * 1e6)
    assert lab_file_s / scaling.to_lab(params.epoch_s) == pytest.approx(4.0 / 60.0)


@pytest.mark.parametrize("scale", [0, -2, float("inf"), float("nan"), True, "10"])
def test_scaling_refuses_bad_scales(scale):
    with pytest.raises(ConfigError):
        Scaling(scale)


# --- who each request goes to ---------------------------------------------------------------


def test_server_at_and_roam_times():
    epochs = alternating(4)
    assert server_at(epochs, 0.0, SERVERS) == "s1"
    assert server_at(epochs, 59.9, SERVERS) == "s1"
    assert server_at(epochs, 60.0, SERVERS) == "s2"
    assert server_at(epochs, 1000.0, SERVERS) == "s2"
    assert server_at(epochs, -0.1, SERVERS) == "s2"  # before the start: "roamed" to s1 at 0
    assert roam_times(epochs) == [60.0, 120.0, 180.0]
    assert roam_times([Epoch(0, "s1"), Epoch(60, "s1"), Epoch(120, "s2")]) == [120.0]


def test_follow_attacker_with_no_delay_always_hits_and_with_an_epoch_always_misses():
    epochs = alternating(7)
    times = [t / 10 for t in range(0, 3600)]

    def hit(t, delay):
        return follow_target(epochs, t, delay, SERVERS) == server_at(epochs, t, SERVERS)

    hits = {delay: [hit(t, delay) for t in times] for delay in (0.0, 15.0, 30.0, 45.0, 60.0)}
    assert all(hits[0.0])
    assert not any(hits[60.0])
    for delay in (15.0, 30.0, 45.0):
        assert sum(hits[delay]) / len(times) == pytest.approx(1 - delay / 60.0, abs=0.01)


def test_follow_target_refuses_negative_delays():
    with pytest.raises(ConfigError):
        follow_target(alternating(), 1.0, -1.0, SERVERS)


def test_attack_targets():
    arrivals = poisson_arrivals(random.Random(5), 1.0, until_s=300.0)
    assert attack_targets("none", arrivals, random.Random(0), servers=SERVERS) == []
    diluted = attack_targets("diluted", arrivals, random.Random(0), servers=SERVERS)
    assert set(diluted) == set(SERVERS)
    assert 0.35 < diluted.count("s1") / len(diluted) < 0.65
    follow = attack_targets(
        "follow", arrivals, random.Random(0), servers=SERVERS, epochs=alternating(), delay_s=0
    )
    assert follow == [server_at(alternating(), t, SERVERS) for t in arrivals]
    with pytest.raises(ConfigError):
        attack_targets("flood", arrivals, random.Random(0), servers=SERVERS)


def test_legit_targets():
    replicated = legit_targets("replication", 200, random.Random(0), SERVERS)
    assert set(replicated) == set(SERVERS)
    assert legit_targets("roaming-live", 3, random.Random(0), SERVERS) == ["vip"] * 3
    with pytest.raises(ConfigError):
        legit_targets("anycast", 3, random.Random(0), SERVERS)


def test_configurations_cover_the_figure():
    points = configurations()
    assert len(points) == 2 + 7 + 7
    assert not [p for p in points if p.mode == "replication" and p.attack == "follow"]
    live = [p for p in points if p.mode == "roaming-live" and p.attack == "follow"]
    follow = [p.discovery_delay_s for p in live]
    assert follow == [0.0, 15.0, 30.0, 45.0, 60.0]
    assert len(set(points)) == len(points)
    with pytest.raises(ConfigError):
        Configuration("roaming-live", "diluted", 15.0)
    with pytest.raises(ConfigError):
        Configuration("roaming", "none")


# --- fixed epochs from a real chain -------------------------------------------------------


def test_a_fixed_stretch_is_what_the_schedule_computes():
    rng = random.Random(11)
    chain_length = 4000
    for _ in range(200):
        key = rng.randbytes(32)
        stretch = find_fixed_stretch(key, chain_length, m=1, server_count=2, count=5)
        if stretch is not None:
            break
    else:
        pytest.fail("no stretch in 200 chains")
    chain = KeyChain(key, chain_length)
    units = [epoch_units(chain.key(i), 1) for i in range(1, stretch.first_epoch + 5)]
    servers = [server_index(chain.key(i), 2) for i in range(1, stretch.first_epoch + 5)]
    first = stretch.first_epoch
    assert sum(units[: first - 1]) == stretch.units_before
    assert units[first - 1 : first + 4] == [1] * 5
    window = servers[first - 2 : first + 4]
    assert all(a != b for a, b in itertools.pairwise(window))
    assert servers[first - 1] == 0 == stretch.servers[0]


def test_no_stretch_in_a_chain_too_short():
    assert find_fixed_stretch(os.urandom(32), 70, m=1, server_count=2, count=7) is None
    with pytest.raises(ValueError, match="two servers"):
        find_fixed_stretch(os.urandom(32), 100, m=1, server_count=1, count=3)


# --- the agents' HTTP parsing ---------------------------------------------------------------


def test_agents_parse_and_check_responses():
    assert agents.http_request("/file", "10.0.0.1", 0).endswith(b"\r\n\r\n")
    assert b"Range: bytes=500-" in agents.http_request("/file", "h", 500)
    status, headers = agents.parse_head(b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 5-9/10")
    assert status == 206
    assert headers["content-range"] == "bytes 5-9/10"
    agents.check_response(206, headers, 5, 10)
    agents.check_response(200, {"content-length": "10"}, 0, 10)
    for status, headers, offset in [
        (200, {"content-length": "11"}, 0),
        (200, {}, 5),  # a server that ignores Range would repeat the start
        (206, {"content-range": "bytes 4-9/10"}, 5),
        (404, {}, 0),
    ]:
        with pytest.raises(agents.ProtocolError):
            agents.check_response(status, headers, offset, 10)
    with pytest.raises(agents.ProtocolError):
        agents.parse_head(b"garbage")


# --- reports --------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    assert percentile([1.0], 0.95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile(list(range(1, 21)), 0.95) == pytest.approx(19.05)
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 0.5)


def records():
    data = [
        ("replication", "none", 0, [4.0, 6.0], 0),
        ("replication", "diluted", 0, [200.0, 300.0], 1),
        ("roaming-live", "none", 0, [4.1, 6.1], 0),
        ("roaming-live", "diluted", 0, [100.0], 0),
        ("roaming-live", "follow", 0, [150.0], 0),
        ("roaming-live", "follow", 30, [50.0], 0),
        ("roaming-live", "follow", 60, [10.0], 0),
        ("roaming-reconnect", "follow", 15, [], 2),
    ]
    return [make_record(m, a, d, t, f, 1) for m, a, d, t, f in data]


def test_results_json_has_exactly_the_issue_fields(tmp_path):
    path = tmp_path / "results.json"
    report.write_results_json(records(), path)
    data = json.loads(path.read_text())
    assert validate_results(data) == data
    assert all(tuple(sorted(r)) == tuple(sorted(RESULT_FIELDS)) for r in data)
    assert data[0] == {
        "mode": "replication",
        "attack": "none",
        "discovery_delay_s": 0,
        "mean_s": 5.0,
        "median_s": 5.0,
        "p95_s": 5.9,
        "completed": 2,
        "failed": 0,
        "repeats": 1,
    }
    assert data[-1]["mean_s"] is None  # nothing completed
    assert report.records_from_json(data)[1].failed == 1


@pytest.mark.parametrize(
    ("change", "text"),
    [
        (lambda r: r.pop("p95_s"), "fields"),
        (lambda r: r.update(extra=1), "fields"),
        (lambda r: r.update(mode="anycast"), "mode"),
        (lambda r: r.update(attack="flood"), "attack"),
        (lambda r: r.update(discovery_delay_s=15), "discovery delay"),
        (lambda r: r.update(completed=-1), "completed"),
        (lambda r: r.update(failed=1.5), "failed"),
        (lambda r: r.update(mean_s=None), "null"),
        (lambda r: r.update(median_s="5"), "median_s"),
    ],
)
def test_validate_results_names_the_problem(change, text):
    data = [r.as_json() for r in records()]
    change(data[0])
    with pytest.raises(ConfigError, match=text):
        validate_results(data)


def test_validate_results_refuses_duplicates_and_non_lists():
    data = [r.as_json() for r in records()]
    with pytest.raises(ConfigError, match="second record"):
        validate_results([*data, data[0]])
    with pytest.raises(ConfigError):
        validate_results({"mode": "x"})


def test_csv_and_markdown(tmp_path):
    path = tmp_path / "results.csv"
    report.write_csv(records(), path)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(RESULT_FIELDS)
    assert rows[-1]["mean_s"] == ""
    table = markdown_table(records())
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(records())
    assert "| roaming-live | none | - | 5.1 |" in table
    assert "+2%" in table  # 5.1 against 5.0
    assert "| roaming-live | follow | 30 | 50.0 |" in table
    assert "-80%" in table  # 50 against replication's diluted 250


def test_acceptance_goals():
    goals = {g.name.split(":")[0]: g for g in acceptance(records())}
    assert goals["no attack"].met is True
    assert goals["under attack"].met is True
    assert goals["follow"].met is True
    slower = {"mean_s": 5.5}
    worse = [
        Record(**{**r.__dict__, **slower}) if (r.mode, r.attack) == ("roaming-live", "none") else r
        for r in records()
    ]
    assert {g.name.split(":")[0]: g for g in acceptance(worse)}["no attack"].met is False
    assert all(g.met is None for g in acceptance([]))


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "fig2.png"
    report.plot_fig2(records(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command line -----------------------------------------------------------------------


def test_cli_constants_match_the_experiment():
    assert cli_experiments.MODES == poisson.MODES
    assert cli_experiments.ATTACKS == poisson.ATTACKS
    assert cli_experiments.DISCOVERY_DELAYS_S == poisson.DISCOVERY_DELAYS_S


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--scale", "0.5"], "--scale"),
        (["--scale", "abc"], "--scale"),
        (["--repeat", "0"], "--repeat"),
        (["--modes", "replication,anycast"], "--modes"),
        (["--attacks", ""], "--attacks"),
        (["--delays", "-15"], "--delays"),
        (["--seed", "x"], "--seed"),
    ],
)
def test_fig2_bad_arguments_are_one_line(capsys, tmp_path, argv, text):
    with pytest.raises(SystemExit) as exit_:
        main(["lab", "fig2", "--out", str(tmp_path), *argv])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert text in err


# --- the overhead lab's analysis ------------------------------------------------------------


def test_roam_pauses_take_the_longest_gap_around_each_switch():
    from labs.experiments.overhead import roam_pauses

    gaps = [[9.95, 10.05], [10.1, 10.4], [20.0, 20.01], [40.0, 45.0]]
    assert roam_pauses(gaps, [10.0, 20.2, 30.0]) == pytest.approx([0.3, 0.01, 0.0])


def test_pcap_frames_counts_original_lengths():
    import struct

    from labs.experiments.overhead import pcap_frames

    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 128, 1)
    records = b"".join(
        struct.pack("<IIII", 1, 0, len(payload), length) + payload
        for payload, length in [(b"x" * 60, 60), (b"y" * 128, 1514)]
    )
    assert pcap_frames(header + records) == (2, 1574)
    assert pcap_frames(header + records[:-5]) == (1, 60)  # a truncated last record
    assert pcap_frames(b"") == (0, 0)
    with pytest.raises(ValueError, match="pcap"):
        pcap_frames(b"\x00" * 40)


def test_overhead_report_renders_every_row():
    from labs.experiments.overhead import render_overhead, stream_rows

    def stream(migration, tick, goodput, pauses):
        return {
            "migration": migration,
            "tick_s": tick,
            "goodput_mbit_s": goodput,
            "roams_per_s": 0.5 if tick else 0.0,
            "pauses_ms": pauses,
            "intact": True,
            "outcomes": {"migrated": len(pauses)} if migration == "live" else {},
        }

    streams = [
        stream("live", 0.5, 18.0, [30.0, 50.0]),
        stream("live", None, 20.0, []),
        stream("reconnect", 0.5, 15.0, [300.0]),
    ]
    rows = stream_rows(streams)
    live = next(r for r in rows if r["migration"] == "live" and r["tick_s"] == 0.5)
    assert live["goodput_vs_no_roam"] == pytest.approx(0.9)
    assert live["pause_ms"]["median"] == 40.0
    reconnect = next(r for r in rows if r["migration"] == "reconnect")
    assert reconnect["goodput_vs_no_roam"] is None  # no baseline of its own
    text = render_overhead(
        {"link_mbit": 20, "seconds": 8, "repeat": 1, "streams": streams, "checkpoints": []}
    )
    assert "| live | 0.5 | 0.75 | 0.50 | 40 |" in text
    assert "no roam" in text
