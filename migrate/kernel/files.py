"""Files of the daemons, the CLI and the labs: the one atomic writer and one log opener.

Every writer of state, records, status and results goes through ``write_private``; there is no
other write-temporary-then-rename in the tree.

Status files, JSON logs, saved state and lab work directories name the active server and when
each epoch ends: anyone who reads them learns the schedule the roaming hides. So everything
written here is created with its final mode (0600 by default; 0644 only for what is public,
such as ``deployment.json``) in a directory created 0700, and never chmod-ed after the fact.
The umask can only narrow these modes.

``write_private`` replaces a file atomically: a temporary file in the same directory, written
and fsync-ed, renamed over the target, then the directory fsync-ed, so a reader sees the old
file or the new one and a crash leaves one of the two on disk, never half of one.
``open_private_log`` appends to a log and narrows an existing log left world-readable by an
older version to 0600 (only one this process owns).

A daemon replaces its status and state files from a ``LatestWriter`` thread, never on its event
loop: replacing a file waits for the filesystem's journal, and behind a large writeback (a lab
writing gigabytes of content, any busy disk) ext4 made one small replacement wait 0.5 s here and
one fsync-ed write 0.75 s; every shim that wrote on its loop stopped that long, its hand-overs
with it (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path
from typing import IO

WRITER_CLOSE_TIMEOUT_S = 10.0  # a disk stuck longer than this: give up on the last write

PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644  # only for what is documented public: deployment.json, results, unit files
PRIVATE_DIRECTORY = 0o700


def private_directory(path: Path) -> None:
    """Create ``path`` (and missing parents) 0700; an existing directory is left as it is.

    An existing directory may be shared (``/tmp``, an operator's choice): narrowing it is not
    ours to do. The files in it are 0600 whatever its mode.
    """
    path.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)


def own_private_directory(path: Path) -> None:
    """Create ``path`` 0700, and narrow it to 0700 if it exists: a directory that is ours alone
    (the default run directory, a lab's work directory), perhaps made 0755 by an older version."""
    private_directory(path)
    info = path.stat()
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != PRIVATE_DIRECTORY:
        os.chmod(path, PRIVATE_DIRECTORY)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(
    path: Path, data: bytes | str, mode: int = PRIVATE_FILE, *, durable: bool = True
) -> None:
    """Atomically replace ``path`` with ``data`` (text is written as UTF-8), created with
    ``mode`` (0600 by default, ``PUBLIC_FILE`` for a public file): written, fsync-ed, renamed
    over ``path``, the directory fsync-ed. On any error the temporary file is removed.
    ``durable=False`` skips both fsyncs: for a file rewritten often and rebuilt at start (a
    status), readers still see the old or the new content whole."""
    if isinstance(data, str):
        data = data.encode()
    private_directory(path.parent)
    # One temporary name per process and thread: two writers never share one. O_EXCL after
    # removing a leftover of a crashed writer: never write through a file (or a symlink)
    # someone else put at the temporary name.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode
    )
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    if durable:
        _fsync_directory(path.parent)


def open_private_log(path: Path) -> IO[str]:
    """Open ``path`` for appending text, line-buffered, created 0600 in a 0700 directory."""
    private_directory(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, PRIVATE_FILE)  # a log an older version left readable by others
        return open(fd, "a", encoding="utf-8", buffering=1)
    except BaseException:
        os.close(fd)
        raise


class LatestWriter:
    """Replaces one file (``write_private``) from a thread of its own, with the newest content
    only: ``submit`` returns at once and a burst of submissions is one write.

    ``flush`` waits until what was submitted before it is on disk (for a write that must land
    before the caller goes on, such as a counter reservation). A failed write is raised by the
    next ``submit`` or ``flush`` (once); ``close`` writes the last content and ends the thread,
    after which ``submit`` writes on the caller's thread."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        self._changed = threading.Condition()
        self._pending: bytes | None = None
        self._submitted = 0  # submissions so far, and how many of them are on disk
        self._written = 0
        self._error: Exception | None = None
        self._closed = False
        self._thread: threading.Thread | None = None  # started by the first submission

    def submit(self, data: bytes) -> None:
        with self._changed:
            closed = self._closed
            if not closed:
                self._pending = data
                self._submitted += 1
                self._changed.notify_all()
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"writer {self.path.name}", daemon=True
                    )
                    self._thread.start()
            error, self._error = self._error, None
        if closed:
            write_private(self.path, data, durable=self.durable)
        if error is not None:
            raise error  # an earlier write's; this one is written all the same

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted so far is written; raise a write's error, or
        ``TimeoutError`` after ``timeout`` seconds."""
        with self._changed:
            target = self._submitted
            if not self._changed.wait_for(
                lambda: self._written >= target or self._error is not None, timeout
            ):
                raise TimeoutError(f"{self.path} not written within {timeout} s")
            self._raise_error()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(WRITER_CLOSE_TIMEOUT_S)
        with self._changed:
            self._raise_error()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._closed)
                data, self._pending = self._pending, None
                upto = self._submitted
                if data is None:
                    return
            try:
                write_private(self.path, data, durable=self.durable)
            except Exception as error:  # raised to the owner by its next call
                with self._changed:
                    self._error = error
                    self._changed.notify_all()
                continue
            with self._changed:
                self._written = upto
                self._changed.notify_all()
