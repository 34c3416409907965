"""``roam client status --watch`` / ``roam server status --watch``: the summary, refreshed in
place (rich's Live) every few seconds until Ctrl-C or SIGTERM, which end it cleanly (exit 0,
the terminal restored, the signal handler given back)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from rich.console import Console
from rich.live import Live
from rich.text import Text

from migrate.errors import RoamError

MIN_PERIOD_S = 0.2  # a refresh re-reads a small file: no faster than this


def watch(
    frame: Callable[[], list[str]],
    period_s: float,
    *,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Show ``frame()`` every ``period_s`` until ``stop`` is set, SIGTERM or Ctrl-C.

    A frame that fails (the shim stopped, the file went) shows the error and the watch goes
    on: the shim may come back (systemd restarts it)."""
    stop = stop or threading.Event()
    period = max(MIN_PERIOD_S, period_s)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while not stop.is_set():
                live.update(Text("\n".join(_lines(frame))), refresh=True)
                stop.wait(period)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _lines(frame: Callable[[], list[str]]) -> list[str]:
    try:
        return frame()
    except (RoamError, OSError) as error:
        return [f"roam: error: {error}", "(watching; Ctrl-C to stop)"]
