"""Status files, JSON logs and saved state name the active server: 0600 in 0700 directories.

Run under umask 0, so a file gets 0600 only because its writer asked for it (with the usual
umask 022 a plain ``write_text`` already gives 0644: world-readable).
"""

import json
import os
import stat
import threading

import pytest

from migrate.kernel.eventlog import DaemonFiles, EventLog, read_events
from migrate.kernel.files import PUBLIC_FILE, open_private_log, own_private_directory, write_private


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def write_status(path, status):
    """As a daemon does: handed to the status writer's thread, then waited for."""
    files = DaemonFiles(path.parent / "unused.state", path)
    files.show_status(status)
    files.flush(timeout=10)


@pytest.fixture(autouse=True)
def permissive_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_status_files_are_0600_in_a_new_0700_directory(tmp_path):
    path = tmp_path / "run" / "client-alice.status.json"
    write_status(path, {"server": "10.0.0.2:80", "epoch_ends": 1234.5})
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    write_status(path, {"server": "10.0.0.3:80"})  # replaced, never widened
    assert mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_json_logs_are_0600_and_an_old_world_readable_log_is_narrowed(tmp_path):
    fresh = tmp_path / "logs" / "server.jsonl"
    log = EventLog("server", fresh, stream=None)
    log.event("roam", server="10.0.0.2:80")
    log.close()
    assert mode(fresh) == 0o600
    assert mode(fresh.parent) == 0o700
    old = tmp_path / "old.jsonl"
    old.write_text('{"event": "start"}\n')
    old.chmod(0o644)
    log = EventLog("client", old, stream=None)
    log.event("roam", server="10.0.0.3:80")
    log.close()
    assert mode(old) == 0o600
    assert [e["event"] for e in read_events(old)] == ["start", "roam"]  # appended, nothing lost


def test_write_private_replaces_atomically_with_the_asked_mode(tmp_path):
    path = tmp_path / "state"
    write_private(path, b"one")
    assert (path.read_bytes(), mode(path)) == (b"one", 0o600)
    write_private(tmp_path / "deployment.json", b"{}", 0o644)  # public files may ask for 0644
    assert mode(tmp_path / "deployment.json") == 0o644
    # A leftover temporary of a crashed writer (or a symlink planted there) is not written through.
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (tmp_path / f".state.{os.getpid()}.{threading.get_ident()}.tmp").symlink_to(target)
    write_private(path, b"two")
    assert (path.read_bytes(), target.read_bytes()) == (b"two", b"keep")


def test_write_private_takes_text_and_creates_a_private_directory(tmp_path):
    path = tmp_path / "new" / "results.md"
    write_private(path, "durée\n", PUBLIC_FILE)
    assert (path.read_text(), mode(path), mode(path.parent)) == ("durée\n", 0o644, 0o700)


def test_write_private_leaves_no_temporary_file_and_the_old_content_on_error(tmp_path):
    path = tmp_path / "state"
    write_private(path, b"old")
    with pytest.raises(TypeError):
        write_private(path, 12345)  # type: ignore[arg-type]  # fails while writing
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_bytes(b"")
    with pytest.raises(IsADirectoryError):
        write_private(tmp_path / "taken", b"new")  # fails at the rename: a directory is there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "taken"]
    assert path.read_bytes() == b"old"


def test_write_private_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path, monkeypatch
):
    path = tmp_path / "state"
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(source, target):
        synced.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_private(path, b"data")
    assert len(synced) == 3
    assert synced[0].startswith(str(tmp_path / ".state."))  # the temporary file's content
    assert synced[1:] == ["rename", str(tmp_path)]  # then the directory entry


def test_a_status_is_replaced_whole_without_fsync(tmp_path, monkeypatch):
    """A status is rewritten at every gate change and hand-over: no fsync, still atomic."""
    path = tmp_path / "status.json"
    write_status(path, {"epoch": 1})
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    write_status(path, {"epoch": 2})
    assert synced == []
    assert json.loads(path.read_text()) == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    assert mode(path) == 0o600


def test_a_log_opened_private_appends(tmp_path):
    path = tmp_path / "a.log"
    with open_private_log(path) as handle:
        handle.write("x\n")
    with open_private_log(path) as handle:
        handle.write("y\n")
    assert path.read_text() == "x\ny\n"
    assert mode(path) == 0o600


def test_our_own_run_directory_is_narrowed_to_0700(tmp_path):
    run = tmp_path / "server-roaming"
    run.mkdir(mode=0o755)
    own_private_directory(run)
    assert mode(run) == 0o700
