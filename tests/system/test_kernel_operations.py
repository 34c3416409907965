"""``roam doctor`` and ``roam cleanup`` on this machine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from migrate.kernel import nft
from roam_cli.main import main

pytestmark = pytest.mark.system


def test_doctor_json_reports_the_features_this_machine_has(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["doctor", "--json"])
    checks = {check["name"]: check for check in json.loads(capsys.readouterr().out)["checks"]}
    for name in ("privileges", "nftables", "nflog", "tcp_repair", "ip_transparent",
                 "splice", "policy_routing"):  # fmt: skip
        assert checks[name]["ok"], checks[name]
        assert checks[name]["required"]
    # The client shim holds frozen segments in an NFQUEUE where it can (iptables is installed).
    assert checks["nfqueue"]["ok"], checks["nfqueue"]
    assert checks["nfqueue"]["required"] is False
    assert checks["netem"]["required"] is False
    # Debian's nftables package brings libnftables1: the shims change rules in-process.
    assert checks["libnftables"]["ok"], checks["libnftables"]
    assert checks["libnftables"]["required"] is False
    if not checks["netem"]["ok"]:
        assert checks["netem"]["fix"]
    assert status == 0
    assert not any(name.startswith("roam_doc_") for _, name in nft.list_tables())


def test_doctor_prints_one_line_per_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("ok ")


def test_cleanup_removes_a_dead_table_then_finds_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVER_ROAMING_RUN_DIR", str(tmp_path))
    process = subprocess.Popen(["true"])
    process.wait()
    name = nft.instance_table_name("test", process.pid)
    nft.replace_table("inet", name, "")
    try:
        assert main(["cleanup", "--dry-run"]) == 0
        assert f"unrecorded nft table inet {name}: would delete" in capsys.readouterr().out
        assert main(["cleanup"]) == 0
        assert f"unrecorded nft table inet {name}: deleted" in capsys.readouterr().out
    finally:
        nft.delete_table("inet", name)


def test_cleanup_on_a_clean_machine_says_so() -> None:
    # whatever earlier processes left is removed by the first run; the second finds nothing
    subprocess.run(["roam", "cleanup"], capture_output=True, timeout=60, check=False)
    second = subprocess.run(
        ["roam", "cleanup"], capture_output=True, text=True, timeout=60, check=False
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "nothing to clean up"
