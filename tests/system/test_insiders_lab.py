"""``roam lab insiders`` in small (issue 17): N = 6 servers, k = 3, three clients, one of
them an insider whose leaked keys aim a SYN flood at its server every epoch.

The insider is ranked first, with the policy's confidence, within the epochs that
docs/insiders.md states for this setup; no innocent client is ever flagged; the automatic
policy (``roam suspects --revoke-above``) revokes the insider and nobody else; from the
revocation on no request of the insider is served; once its leased keys run out the attacker
computes no server (it sends nothing, no server reports an attack) and the legitimate clients
are served. Nothing of the lab is left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labs.experiments.insiders import InsidersOptions, run_insiders
from labs.naming import NETNS_DIR

pytestmark = [pytest.mark.system, pytest.mark.slow]

# docs/insiders.md ("The lab"): with 3 clients and 2 quiet epochs before the attack, the
# policy's confidence comes within this many epochs of attack.
MAX_EPOCHS_TO_CONFIDENCE = 20


def test_the_insider_is_ranked_first_revoked_and_then_finds_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    pytest.importorskip("scapy")
    options = InsidersOptions(
        servers=6,
        active=3,
        clients=3,
        tick_s=1.0,
        baseline_epochs=2,
        max_attack_epochs=MAX_EPOCHS_TO_CONFIDENCE,
        after_epochs=3,
        lease_epochs=3,
        out=tmp_path,
    )
    result = run_insiders(options)
    insider = result.insider
    assert insider == "c3"

    # Ranked first, with the confidence, within the stated epochs; nobody else ever flagged.
    assert result.confident_epoch is not None, [r.insider_confidence for r in result.ranks]
    epochs = result.epochs_to(result.confident_epoch)
    assert epochs is not None
    assert epochs <= MAX_EPOCHS_TO_CONFIDENCE
    final = result.ranks[-1]
    assert final.first == insider
    assert final.strictly_first
    assert all(set(rank.flagged) <= {insider} for rank in result.ranks), result.ranks
    assert result.revoked == [insider]
    assert result.revoked_at is not None

    # The attack was real: the insider's server was flooded and its co-clients noticed.
    summary = result.summary()
    assert summary["attack_packets"]["attack"] > 0

    # After the revocation the insider gets no service at all.
    after = [r for r in result.requests[insider] if r["phase"] in ("leftover", "after")]
    assert after, "the insider made no request after its revocation"
    assert not any(r["ok"] for r in after), after

    # Once the leaked keys ran out, the attacker computed no server: nothing was sent, no
    # server reported an attack, and the legitimate clients were served.
    assert result.dark_at is not None
    assert summary["attack_packets"]["after"] == 0
    assert result.attacked_after_revocation == 0
    legit_after = [
        r
        for host, rows in result.requests.items()
        if host != insider
        for r in rows
        if r["phase"] == "after"
    ]
    assert legit_after
    served = sum(r["ok"] for r in legit_after) / len(legit_after)
    assert served >= 0.9, legit_after
    assert result.problems == []

    assert (tmp_path / "results.json").exists()
    left = [name for name in result.lab["namespaces"] if (NETNS_DIR / name).exists()]
    assert left == [], f"namespaces left behind: {left}"
    assert not Path(result.lab["workdir"]).exists()
