"""Removing what labs created: one lab at its own exit, or every lab whose owner is dead.

A lab is an instance of the one record system (``migrate.kernel.instances``): an instance of kind
``lab`` whose record (``/run/server-roaming/labs/lab-<pid>-<token>.json``) lists its work
directory and every namespace it will create, written before they exist. Removing a lab undoes
that record: stop the processes living in each namespace (by pid, through pidfds), unmount the
namespace (the kernel then destroys its veths, bridges, qdiscs and nftables tables with it),
remove the work directory, then the record.

``cleanup_dead_labs`` (``roam lab cleanup``, ``roam cleanup``) touches only labs that are
provably ours and orphaned: a record whose owner process is gone, or a namespace named
``roam-<pid>-<token>-...`` with no record and no process ``<pid>``. Live labs and every other
namespace are left alone. A record that names a namespace or a directory not of its own lab is
refused as unreadable and left in place.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from labs.naming import NETNS_DIR, RECORD_DIR, LabId, parse_namespace
from migrate.errors import ConfigError
from migrate.kernel.instances import (
    InstanceRecord,
    InstanceRecordError,
    Netns,
    Undone,
    WorkDir,
    locked,
    record_paths,
    remove_netns,
    sweep_record,
)
from migrate.kernel.processes import DEFAULT_GRACE_S, process_start_time

LAB_KIND = "lab"


@dataclass
class TeardownReport:
    lab_id: str
    namespaces_removed: list[str] = field(default_factory=list)
    pids_stopped: list[int] = field(default_factory=list)
    workdir_removed: str | None = None
    errors: list[str] = field(default_factory=list)


def is_own_workdir(lab_id: LabId, workdir: str) -> bool:
    """Only ever remove a directory the kit made for this lab (mkdtemp, prefix roam-<id>-)."""
    path = Path(workdir)
    return path.parent == Path(tempfile.gettempdir()) and path.name.startswith(f"roam-{lab_id}-")


def load_lab_record(path: Path) -> tuple[LabId, InstanceRecord]:
    """A lab's record, checked to name only its own namespaces and work directory."""
    try:
        record = InstanceRecord.load(path)
    except InstanceRecordError as error:
        raise ConfigError(f"lab record {path} is malformed: {error}") from None
    lab_id = LabId.parse(f"{record.pid}-{record.token}")
    if record.kind != LAB_KIND or path.name != record.filename:
        raise ConfigError(f"lab record {path} does not match its file name")
    for obj in record.created:
        if isinstance(obj, Netns) and not obj.name.startswith(lab_id.namespace_prefix):
            raise ConfigError(f"lab record {path} lists a namespace that is not its own")
        if isinstance(obj, WorkDir) and not is_own_workdir(lab_id, obj.path):
            raise ConfigError(f"lab record {path} lists a directory that is not its own")
        if not isinstance(obj, Netns | WorkDir):
            raise ConfigError(f"lab record {path} lists {obj.describe()}, which labs never make")
    return lab_id, record


def namespaces_of(record: InstanceRecord) -> list[str]:
    return [obj.name for obj in record.created if isinstance(obj, Netns)]


def workdir_of(record: InstanceRecord) -> Path | None:
    found = [obj.path for obj in record.created if isinstance(obj, WorkDir)]
    return Path(found[0]) if found else None


def report_of(lab_id: LabId, undone: Iterable[Undone], errors: Iterable[str]) -> TeardownReport:
    """The report of a lab's removal, from what undoing its record did."""
    report = TeardownReport(str(lab_id), errors=list(errors))
    pids: set[int] = set()
    for item in undone:
        pids.update(item.stopped)
        if isinstance(item.obj, Netns) and item.removed:
            report.namespaces_removed.append(item.obj.name)
        if isinstance(item.obj, WorkDir) and item.removed:
            report.workdir_removed = item.obj.path
    report.namespaces_removed.sort()
    report.pids_stopped = sorted(pids)
    return report


def teardown_unrecorded(
    lab_id: LabId, namespaces: list[str], *, grace_s: float = DEFAULT_GRACE_S
) -> TeardownReport:
    """Remove the namespaces of a lab whose record is lost; never raises."""
    report = TeardownReport(str(lab_id))
    pids: set[int] = set()
    for name in namespaces:
        if not name.startswith(lab_id.namespace_prefix):
            continue
        try:
            stopped, removed = remove_netns(name, grace_s=grace_s)
        except OSError as error:
            report.errors.append(f"removing namespace {name}: {error.strerror or error}")
            continue
        pids.update(stopped)
        if removed:
            report.namespaces_removed.append(name)
    report.pids_stopped = sorted(pids)
    return report


@dataclass
class DeadLab:
    lab_id: LabId
    namespaces: list[str]
    workdir: Path | None
    record: tuple[Path, InstanceRecord] | None  # None: namespaces found without a record

    @property
    def recorded(self) -> bool:
        return self.record is not None


def find_dead_labs(record_dir: Path = RECORD_DIR) -> tuple[list[DeadLab], list[str]]:
    """Labs whose owner is dead, and one-line problems with unreadable records."""
    dead: list[DeadLab] = []
    problems: list[str] = []
    known: set[LabId] = set()
    for path in record_paths(record_dir):
        try:
            lab_id, record = load_lab_record(path)
        except ConfigError as error:
            problems.append(str(error))
            continue
        except OSError:
            continue  # removed meanwhile
        known.add(lab_id)
        if record.owner_alive():
            continue
        dead.append(
            DeadLab(lab_id, namespaces_of(record), workdir_of(record), record=(path, record))
        )
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
        if process_start_time(lab_id.owner_pid) is None:
            dead.append(DeadLab(lab_id, names, None, record=None))
    return dead, problems


@dataclass
class CleanupSummary:
    reports: list[TeardownReport]
    unreadable_records: list[str]  # one line each; such records are left in place


def _would_remove(lab: DeadLab) -> TeardownReport:
    return TeardownReport(
        str(lab.lab_id),
        namespaces_removed=[n for n in lab.namespaces if (NETNS_DIR / n).exists()],
        workdir_removed=str(lab.workdir) if lab.workdir else None,
    )


def cleanup_dead_labs(
    *, dry_run: bool = False, record_dir: Path = RECORD_DIR, grace_s: float = DEFAULT_GRACE_S
) -> CleanupSummary:
    """Remove every lab whose owner is dead; with ``dry_run``, only report what would go."""
    reports = []
    with locked(record_dir):
        dead, problems = find_dead_labs(record_dir)
        for lab in dead:
            if dry_run:
                reports.append(_would_remove(lab))
            elif lab.record is None:
                reports.append(teardown_unrecorded(lab.lab_id, lab.namespaces, grace_s=grace_s))
            else:
                path, record = lab.record
                swept = sweep_record(path, record, record_dir, grace_s=grace_s)
                reports.append(report_of(lab.lab_id, swept.undone, swept.failures))
    return CleanupSummary(reports, problems)
