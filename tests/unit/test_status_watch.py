"""``roam client|server status --watch``: the summary is rendered again and again, and the watch
ends cleanly (exit 0, SIGTERM's handler given back) when told: SIGTERM, Ctrl-C or its event."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migrate.errors import ConfigError
from roam_cli.main import main
from roam_cli.watch import watch


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_it_renders_again_and_exits_on_sigterm() -> None:
    frames: list[int] = []

    def frame() -> list[str]:
        frames.append(len(frames) + 1)
        if len(frames) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as systemd or kill(1) would
        return [f"frame {frames[-1]}"]

    before = signal.getsignal(signal.SIGTERM)
    screen, out = console()
    assert watch(frame, 0.2, console=screen) == 0
    assert frames == [1, 2]
    assert "frame 1" in out.getvalue()
    assert "frame 2" in out.getvalue()
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_ends_it_and_a_failing_frame_is_shown_not_fatal() -> None:
    calls = 0

    def frame() -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConfigError("no client shim is running (x does not exist)")
        raise KeyboardInterrupt

    screen, out = console()
    assert watch(frame, 0.2, console=screen) == 0
    assert calls == 2
    assert "no client shim is running" in out.getvalue()


def test_its_event_ends_it() -> None:
    stop = threading.Event()
    seen: list[str] = []

    def frame() -> list[str]:
        seen.append("x")
        if len(seen) == 3:
            stop.set()
        return ["x"]

    screen, _out = console()
    assert watch(frame, 0.2, console=screen, stop=stop) == 0
    assert len(seen) == 3


def test_server_status_watch_shows_the_summary_and_refuses_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status: dict[str, Any] = {"pid": os.getpid(), "listen": "10.0.0.1:80", "epoch": 7}
    path = tmp_path / "server.json"
    path.write_text(json.dumps(status))
    shown: list[list[str]] = []

    def one_frame(frame: Any, period_s: float) -> int:
        shown.append(frame())
        return 0

    monkeypatch.setattr("roam_cli.watch.watch", one_frame)
    assert main(["server", "status", "--status", str(path), "--watch", "1"]) == 0
    assert any("epoch 7" in line for line in shown[0]), shown
    assert main(["server", "status", "--status", str(path), "--watch", "--json"]) == 1
    assert "--watch refreshes the summary" in capsys.readouterr().err
