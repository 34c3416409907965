"""``LatestWriter``: a daemon's status and state files are replaced from a thread, so a disk
that stalls (a journal behind a large writeback) never stalls the event loop that submits."""

from __future__ import annotations

import errno
import stat
import threading
from pathlib import Path

import pytest

from migrate.kernel import files
from migrate.kernel.files import LatestWriter


class StalledDisk:
    """Stands in for ``write_private``: every write waits until ``release`` (a disk behind a
    writeback), then writes for real; records what was written, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = files.write_private
        self.released = threading.Event()
        self.started = threading.Event()
        self.written: list[bytes] = []
        self.fail_with: OSError | None = None
        monkeypatch.setattr(files, "write_private", self.write)

    def write(
        self, path: Path, data: bytes | str, mode: int = 0o600, *, durable: bool = True
    ) -> None:
        self.started.set()
        assert self.released.wait(10), "the test never released the disk"
        if self.fail_with is not None:
            raise self.fail_with
        assert isinstance(data, bytes)
        self.written.append(data)
        self.real(path, data, mode, durable=durable)


def test_submit_returns_while_the_disk_stalls_and_the_newest_content_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = StalledDisk(monkeypatch)
    writer = LatestWriter(tmp_path / "status.json", durable=False)
    writer.submit(b"1")
    assert disk.started.wait(10)
    # The first write is stuck in the disk; these return at once (else the test hangs here).
    writer.submit(b"2")
    writer.submit(b"3")
    assert disk.written == []
    disk.released.set()
    writer.flush(timeout=10)
    # A burst is one write: 2 was replaced by 3 before the thread got to it.
    assert disk.written == [b"1", b"3"]
    assert (tmp_path / "status.json").read_bytes() == b"3"
    writer.close()


def test_a_failed_write_is_raised_by_the_next_call_and_the_next_content_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = StalledDisk(monkeypatch)
    disk.released.set()
    disk.fail_with = OSError(errno.ENOSPC, "No space left on device")
    writer = LatestWriter(tmp_path / "state.json")
    writer.submit(b"lost")
    with pytest.raises(OSError, match="No space left"):
        writer.flush(timeout=10)
    disk.fail_with = None
    writer.submit(b"kept")  # the error was raised once: this one goes through
    writer.flush(timeout=10)
    assert (tmp_path / "state.json").read_bytes() == b"kept"
    writer.close()


def test_close_writes_the_last_content_and_later_submissions_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.json"
    writer = LatestWriter(path)
    for n in range(50):
        writer.submit(str(n).encode())
    writer.close()
    assert path.read_bytes() == b"49"
    # Private, like every file of the daemons.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    writer.submit(b"after")  # at shutdown, on the caller's thread
    assert path.read_bytes() == b"after"


def test_flush_gives_up_after_its_timeout_while_the_disk_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = StalledDisk(monkeypatch)
    writer = LatestWriter(tmp_path / "state.json")
    writer.submit(b"x")
    with pytest.raises(TimeoutError, match="not written within"):
        writer.flush(timeout=0.05)
    disk.released.set()
    writer.flush(timeout=10)
    writer.close()
    assert disk.written == [b"x"]


def test_a_writer_never_used_starts_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    writer = LatestWriter(tmp_path / "status.json")
    writer.flush(timeout=1)
    writer.close()
    assert threading.active_count() == before
    assert not (tmp_path / "status.json").exists()


def test_the_disk_stall_benchmark_times_both_ways_in_both_phases_and_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from labs.benchmarks import disk_stall

    assert disk_stall.main(["--seconds", "1", "--writeback-mib", "16", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for phase in ("idle:", "writeback of 16 MiB:"):
        assert phase in out
    for way in ("status on the loop", "state on the loop", "status to its writer"):
        assert out.count(way) == 2, out
    assert "state: worst call under writeback" in out
    assert list(tmp_path.iterdir()) == []  # its files, the bulk ones too, removed
