"""Commands that need an optional extra say which, in one line, before doing anything."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from roam_cli.extras import missing_extra
from roam_cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["fig2", "overhead"])
def test_a_lab_experiment_without_the_labs_extra_is_one_line_and_creates_nothing(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "out"
    status = main(["lab", command, "--out", str(out)])
    printed, err = capsys.readouterr()
    assert status == 1
    assert printed == ""
    assert err == (
        "roam: error: this command needs the 'labs' extra (no module 'matplotlib'): "
        "pip install 'server-roaming[labs]'\n"
    )
    assert not out.exists()


def test_any_other_missing_module_is_a_bug_not_an_extra() -> None:
    assert missing_extra(ModuleNotFoundError("x", name="scapy.layers")) is not None
    assert missing_extra(ModuleNotFoundError("x", name="cryptography")) is None


def test_the_shims_runtime_dependencies_hold_no_lab_only_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "scapy" not in runtime
    assert "netfilterqueue" not in runtime
    assert any("scapy" in dep for dep in project["optional-dependencies"]["labs"])
