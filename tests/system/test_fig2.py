"""``roam lab fig2`` end to end, in miniature: one roaming mode under a follow attack, a few
legitimate requests, at a high scale. Every legitimate request must be accounted for, every
output file written, and nothing of the lab left behind."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from labs.experiments.fig2 import Fig2Options, run_fig2
from labs.experiments.poisson import Configuration, PaperParams
from labs.experiments.report import RESULT_FIELDS, validate_results
from labs.naming import NETNS_DIR

pytestmark = pytest.mark.system

REQUESTS = 4


def test_a_tiny_fig2_run_accounts_for_every_request_and_leaves_nothing(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig2"
    options = Fig2Options(
        out=out,
        scale=20.0,
        seed=3,
        points=(Configuration("roaming-live", "follow", 30.0),),
        params=replace(PaperParams(), legit_requests=REQUESTS),
    )
    records = run_fig2(options)

    assert [(r.mode, r.attack, r.discovery_delay_s) for r in records] == [
        ("roaming-live", "follow", 30.0)
    ]
    (record,) = records
    assert record.completed + record.failed == REQUESTS
    assert record.repeats == 1

    results = validate_results(json.loads((out / "results.json").read_text()))
    assert len(results) == 1
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(RESULT_FIELDS)
    assert "| roaming-live | follow | 30 |" in (out / "results.md").read_text()
    assert (out / "fig2.png").read_bytes()[:4] == b"\x89PNG"

    details = json.loads((out / "runs.json").read_text())
    (run,) = details["runs"]
    requests = run["requests"]
    assert sorted(r["index"] for r in requests) == list(range(REQUESTS))
    for request in requests:
        # completed with the whole, intact file, or failed with a reason
        if request["ok"]:
            assert request["bytes"] == options.params.file_bytes
            assert request["reason"] == ""
        else:
            assert request["reason"]
    assert run["attacker"]["issued"] > 0
    # the roaming deployment really roamed under the client's connections
    assert run["epochs"][0]["length"] == pytest.approx(60.0 / options.scale)

    namespaces = details["lab"]["namespaces"]
    assert namespaces
    left = [name for name in namespaces if (NETNS_DIR / name).exists()]
    assert left == [], f"namespaces left behind: {left}"
    assert not Path(details["lab"]["workdir"]).exists()
