"""Lab records: a small JSON file per lab under ``/run/server-roaming/labs``.

The record is written before the lab creates anything and lists everything it will create, so
that a lab whose owner dies at any point (even SIGKILL, which runs no cleanup) can be removed by
``roam lab cleanup``. ``/run`` is a tmpfs: records vanish on reboot together with what they
describe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from labs.naming import RECORD_DIR, LabId
from labs.processes import process_start_ticks
from migrate.errors import ConfigError
from migrate.kernel.files import write_private

RECORD_VERSION = 1


@dataclass
class LabRecord:
    lab_id: str
    owner_pid: int
    owner_start_ticks: int | None  # guards against pid reuse
    namespaces: list[str]
    workdir: str | None = None
    topology: str = ""
    pids: list[int] = field(default_factory=list)
    version: int = RECORD_VERSION

    @classmethod
    def for_owner(cls, lab_id: LabId, namespaces: list[str], topology: str) -> LabRecord:
        return cls(
            lab_id=str(lab_id),
            owner_pid=lab_id.owner_pid,
            owner_start_ticks=process_start_ticks(lab_id.owner_pid),
            namespaces=list(namespaces),
            topology=topology,
        )

    @property
    def id(self) -> LabId:
        return LabId.parse(self.lab_id)

    def owner_alive(self) -> bool:
        """Whether the process that made the lab still runs (the same process, not a reuse)."""
        ticks = process_start_ticks(self.owner_pid)
        if ticks is None:
            return False
        return self.owner_start_ticks is None or ticks == self.owner_start_ticks

    def save(self, directory: Path = RECORD_DIR) -> Path:
        """Write the record atomically (a reader never sees half a file)."""
        path = directory / f"{self.lab_id}.json"
        write_private(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> LabRecord:
        try:
            data = json.loads(path.read_text())
            record = cls(
                lab_id=str(data["lab_id"]),
                owner_pid=int(data["owner_pid"]),
                owner_start_ticks=(
                    None
                    if data.get("owner_start_ticks") is None
                    else int(data["owner_start_ticks"])
                ),
                namespaces=[str(name) for name in data["namespaces"]],
                workdir=None if data.get("workdir") is None else str(data["workdir"]),
                topology=str(data.get("topology", "")),
                pids=[int(pid) for pid in data.get("pids", [])],
                version=int(data.get("version", RECORD_VERSION)),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"lab record {path} is malformed: {error}") from None
        lab_id = LabId.parse(record.lab_id)
        if path.name != f"{record.lab_id}.json" or lab_id.owner_pid != record.owner_pid:
            raise ConfigError(f"lab record {path} does not match its file name")
        prefix = lab_id.namespace_prefix
        if any(not name.startswith(prefix) for name in record.namespaces):
            raise ConfigError(f"lab record {path} lists a namespace that is not its own")
        return record


def record_paths(directory: Path = RECORD_DIR) -> list[Path]:
    """Every lab record in ``directory`` (none if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))


def remove_record(lab_id: LabId, directory: Path = RECORD_DIR) -> None:
    for path in (directory / f"{lab_id}.json", directory / f".{lab_id}.json.tmp"):
        path.unlink(missing_ok=True)
