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
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path
from typing import IO

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
