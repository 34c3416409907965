"""Removing what labs created: one lab at its own exit, or every lab whose owner is dead.

``teardown`` is shared by ``Lab.close`` and ``cleanup_dead_labs``: stop the processes living in
the lab's namespaces (by pid, through pidfds), unmount the namespaces (the kernel then destroys
their veths, bridges, qdiscs and nftables tables with them), remove the lab's work directory and
its record.

``cleanup_dead_labs`` (``roam lab cleanup``) touches only labs that are provably ours and
orphaned: a record whose owner process is gone, or a namespace named ``roam-<pid>-<token>-...``
with no record and no process ``<pid>``. Live labs and every other namespace are left alone.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from labs.naming import NETNS_DIR, RECORD_DIR, LabId, parse_namespace
from labs.plumbing import namespace_exists, remove_namespace
from labs.processes import DEFAULT_GRACE_S, kill_pids, pids_in_namespaces, process_start_ticks
from labs.records import LabRecord, record_paths, remove_record
from migrate.errors import ConfigError


@dataclass
class TeardownReport:
    lab_id: str
    namespaces_removed: list[str] = field(default_factory=list)
    pids_stopped: list[int] = field(default_factory=list)
    workdir_removed: str | None = None
    errors: list[str] = field(default_factory=list)


def _is_own_workdir(lab_id: LabId, workdir: Path) -> bool:
    """Only ever remove a directory the kit made for this lab (mkdtemp, prefix roam-<id>-)."""
    return (
        workdir.is_dir()
        and not workdir.is_symlink()
        and workdir.parent == Path(tempfile.gettempdir())
        and workdir.name.startswith(f"roam-{lab_id}-")
    )


def teardown(
    lab_id: LabId,
    namespaces: list[str],
    workdir: Path | None,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    record_dir: Path = RECORD_DIR,
) -> TeardownReport:
    """Remove everything of one lab; never raises, collects errors in the report."""
    report = TeardownReport(str(lab_id))
    own = [name for name in namespaces if name.startswith(lab_id.namespace_prefix)]
    paths = [NETNS_DIR / name for name in own]
    try:
        report.pids_stopped = kill_pids(
            pids_in_namespaces(paths), grace_s=grace_s, still_ours=paths
        )
    except OSError as error:
        report.errors.append(f"stopping processes: {error}")
    for name in own:
        try:
            if remove_namespace(name):
                report.namespaces_removed.append(name)
        except OSError as error:
            report.errors.append(f"removing namespace {name}: {error.strerror or error}")
    if workdir is not None and _is_own_workdir(lab_id, workdir):
        try:
            shutil.rmtree(workdir)
            report.workdir_removed = str(workdir)
        except OSError as error:
            report.errors.append(f"removing {workdir}: {error.strerror or error}")
    if not report.errors:
        remove_record(lab_id, record_dir)
    return report


@contextmanager
def _cleanup_lock(record_dir: Path) -> Iterator[None]:
    """Serialise concurrent ``roam lab cleanup`` runs."""
    record_dir.mkdir(parents=True, exist_ok=True)
    with open(record_dir / ".cleanup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _owner_alive(pid: int) -> bool:
    return process_start_ticks(pid) is not None


@dataclass
class DeadLab:
    lab_id: LabId
    namespaces: list[str]
    workdir: Path | None
    recorded: bool


def find_dead_labs(record_dir: Path = RECORD_DIR) -> tuple[list[DeadLab], list[str]]:
    """Labs whose owner is dead, and one-line problems with unreadable records."""
    dead: list[DeadLab] = []
    problems: list[str] = []
    known: set[LabId] = set()
    for path in record_paths(record_dir):
        try:
            record = LabRecord.load(path)
        except ConfigError as error:
            problems.append(str(error))
            continue
        known.add(record.id)
        if record.owner_alive():
            continue
        workdir = Path(record.workdir) if record.workdir else None
        dead.append(DeadLab(record.id, record.namespaces, workdir, recorded=True))
    # namespaces without a record: a lab whose record was lost, or one killed between mkdir
    # and writing the record (the record is written first, so this should be rare)
    orphans: dict[LabId, list[str]] = {}
    if NETNS_DIR.is_dir():
        for entry in sorted(NETNS_DIR.iterdir()):
            parsed = parse_namespace(entry.name)
            if parsed is None or parsed[0] in known:
                continue
            orphans.setdefault(parsed[0], []).append(entry.name)
    for lab_id, names in orphans.items():
        if not _owner_alive(lab_id.owner_pid):
            dead.append(DeadLab(lab_id, names, None, recorded=False))
    return dead, problems


@dataclass
class CleanupSummary:
    reports: list[TeardownReport]
    unreadable_records: list[str]  # one line each; such records are left in place


def cleanup_dead_labs(
    *, dry_run: bool = False, record_dir: Path = RECORD_DIR, grace_s: float = DEFAULT_GRACE_S
) -> CleanupSummary:
    """Remove every lab whose owner is dead; with ``dry_run``, only report what would go."""
    reports = []
    with _cleanup_lock(record_dir):
        dead, problems = find_dead_labs(record_dir)
        for lab in dead:
            if dry_run:
                reports.append(
                    TeardownReport(
                        str(lab.lab_id),
                        namespaces_removed=[n for n in lab.namespaces if namespace_exists(n)],
                        workdir_removed=str(lab.workdir) if lab.workdir else None,
                    )
                )
                continue
            reports.append(
                teardown(
                    lab.lab_id, lab.namespaces, lab.workdir, grace_s=grace_s, record_dir=record_dir
                )
            )
    return CleanupSummary(reports, problems)
