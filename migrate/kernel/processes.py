"""Processes by pid: who runs (pid plus start time), stopping one, and finding and stopping the
processes inside a network namespace.

Used by instance records (``migrate.kernel.instances``: shims and labs) and the lab kit. Only
processes an instance started are ever signalled: the children it recorded (pid and start time),
and any process living in one of its own namespaces (every program in a lab namespace was started
there by the lab or by one of its programs). Signals go through a pidfd, so a pid that has been
reused by an unrelated process in the meantime is never hit.
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
CHILD_GRACE_S = 2.0
_KILL_WAIT_S = 5.0


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` (``/proc/<pid>/stat`` field 22, clock ticks since boot), or
    ``None`` if no such process runs (a zombie counts as finished)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses; fields follow the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        if fields[0] in ("Z", "X"):
            return None  # a zombie has finished; it only waits for its parent
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_alive(pid: int, starttime: int) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``starttime``."""
    return pid > 0 and process_start_time(pid) == starttime


def _wait_pidfd(fd: int, timeout_s: float) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout_s)
    return bool(readable)


def stop_process(pid: int, starttime: int, *, grace_s: float = CHILD_GRACE_S) -> bool:
    """SIGTERM, then after ``grace_s`` SIGKILL, the process ``(pid, starttime)`` if it runs.

    Signals go through a pidfd opened while the start time still matched, so a reused pid is
    never hit. ``True`` if the process was running.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if process_start_time(pid) != starttime:
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                break
            if _wait_pidfd(fd, grace_s if sig == signal.SIGTERM else _KILL_WAIT_S):
                break
    finally:
        os.close(fd)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it was our own child
    return True


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


# A relayed connection holds two sockets and, while it moves bulk, up to two pipes (splice) or
# four (splice with tee); a live hand-over adds a repaired socket. A million is the kernel's
# default fs.nr_open; a daemon asks for no more than that.
WANTED_OPEN_FILES = 1 << 20


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> tuple[int, int]:
    """Raise this process's limit of open files (RLIMIT_NOFILE) as far as allowed, towards
    ``wanted``; returns (before, after) of the soft limit.

    systemd starts services with a soft limit of 1024, which a shim relaying 500 connections
    would exhaust (EMFILE: new connections refused). The soft limit goes up to the hard one;
    as root (CAP_SYS_RESOURCE) the hard one too, up to fs.nr_open. Never lowers anything."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        ceiling = wanted
    target = min(wanted, ceiling)
    if hard != resource.RLIM_INFINITY and hard < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return soft, target
        target = hard  # not allowed to raise the hard limit: use all of it
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    return soft, soft
