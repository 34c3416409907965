"""Cleanup of open labs on SIGINT, SIGTERM and interpreter exit.

Handlers are installed when the first lab of the process opens and the previous ones restored
when the last closes. On a signal, every open lab is closed, then the previous handler runs as
if ours had not been there (Python's SIGINT handler raises ``KeyboardInterrupt``; a default
SIGTERM kills the process with that signal). Helpers forked by pyroute2 inherit the handlers
but are not the owner: they never clean up, they only chain.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from types import FrameType
from typing import Protocol

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_Handler = signal.Handlers | int | object | None


class Closable(Protocol):
    def close(self) -> None: ...


_lock = threading.RLock()  # reentrant: a signal may arrive while the main thread holds it
_open: list[Closable] = []
_previous: dict[int, _Handler] = {}
_owner_pid = os.getpid()
_atexit_registered = False


def register(lab: Closable) -> None:
    """Track an opening lab; install the handlers if it is the first."""
    global _atexit_registered, _owner_pid
    with _lock:
        if not _atexit_registered:
            atexit.register(_at_exit)
            _atexit_registered = True
        _open.append(lab)
        if len(_open) == 1:
            _owner_pid = os.getpid()
            _install()


def unregister(lab: Closable) -> None:
    """Forget a closed lab; restore the previous handlers if it was the last."""
    with _lock:
        if lab in _open:
            _open.remove(lab)
        if not _open:
            _restore()


def open_labs() -> list[Closable]:
    with _lock:
        return list(_open)


def _install() -> None:
    # signal.signal only works in the main thread; elsewhere atexit and __exit__ still clean up
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in HANDLED_SIGNALS:
        previous = signal.getsignal(signum)
        if previous is _on_signal:
            continue
        _previous[signum] = previous
        signal.signal(signum, _on_signal)


def _restore() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_previous.items()):
        # someone may have replaced our handler meanwhile; then theirs stays
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)  # type: ignore[arg-type]
        del _previous[signum]


def _close_all(reason: str) -> None:
    for lab in reversed(open_labs()):
        try:
            lab.close()
        except Exception as error:  # keep closing the others; report, do not mask the signal
            print(f"labs: cleanup on {reason} failed: {error}", file=sys.stderr)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    if os.getpid() == _owner_pid:
        _close_all(signal.Signals(signum).name)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    # default action: die of the same signal, so the parent sees the true cause
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _at_exit() -> None:
    if os.getpid() == _owner_pid:
        _close_all("exit")
