"""Stopping processes by pid, and finding the processes inside a namespace.

Only processes the lab started are ever signalled: the ones it holds ``Popen`` objects for, and
any other process living in one of its own namespaces (every program in a lab namespace was
started there by the lab or by one of its programs). Signals go through a pidfd, so a pid that
has been reused by an unrelated process in the meantime is never hit.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

DEFAULT_GRACE_S = 3.0
_KILL_WAIT_S = 5.0


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or ``None`` if it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may contain spaces and parentheses; fields follow the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        if fields[0] == "Z":
            return None  # a zombie has finished; it only waits for its parent
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def namespace_inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def pids_in_namespaces(namespace_paths: Iterable[Path]) -> list[int]:
    """Pids of the processes whose network namespace is one of ``namespace_paths``."""
    wanted = {inode for p in namespace_paths if (inode := namespace_inode(p)) is not None}
    if not wanted:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        if namespace_inode(Path(entry.path) / "ns" / "net") in wanted:
            found.append(int(entry.name))
    return sorted(found)


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None


def _wait_pidfds(pidfds: dict[int, int], deadline: float) -> None:
    """Wait until every pidfd reports its process gone or ``deadline`` passes."""
    while pidfds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        readable, _, _ = select.select(list(pidfds.values()), [], [], remaining)
        for pid, fd in list(pidfds.items()):
            if fd in readable:
                os.close(fd)
                del pidfds[pid]


def kill_pids(
    pids: Iterable[int], *, grace_s: float = DEFAULT_GRACE_S, still_ours: Iterable[Path] = ()
) -> list[int]:
    """SIGTERM each pid, SIGKILL what is left after ``grace_s``; return the pids signalled.

    ``still_ours``: namespace paths; when given, a pid is only signalled if it still lives in
    one of them once its pidfd is open (closing the race with pid reuse).
    """
    wanted = {inode for p in still_ours if (inode := namespace_inode(p)) is not None}
    pidfds: dict[int, int] = {}
    for pid in pids:
        if pid == os.getpid():
            continue
        fd = _open_pidfd(pid)
        if fd is None:
            continue
        if wanted and namespace_inode(Path(f"/proc/{pid}/ns/net")) not in wanted:
            os.close(fd)
            continue
        pidfds[pid] = fd
    signalled = sorted(pidfds)
    for fd in pidfds.values():
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGTERM)
    _wait_pidfds(pidfds, time.monotonic() + grace_s)
    for fd in pidfds.values():
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    _wait_pidfds(pidfds, time.monotonic() + _KILL_WAIT_S)
    for fd in pidfds.values():
        os.close(fd)
    return signalled


def stop_children(
    processes: Iterable[subprocess.Popen[bytes] | subprocess.Popen[str]],
    *,
    grace_s: float = DEFAULT_GRACE_S,
) -> None:
    """Terminate our own child processes (SIGTERM, then SIGKILL after ``grace_s``) and reap
    them, so that none stays a zombie."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    for process in running:
        # a process stuck in the kernel (D state) may survive; the namespace sweep reports it
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_KILL_WAIT_S)
