"""A daemon at its open-file limit still changes its nft rules (``migrate.kernel.fdreserve``).

Measured before: a server shim relaying 10,000 connections on a host whose hard limit is
20,000 died at a gate change ("Could not open file /proc/self/fd/19999: Too many open files").
Each check runs in a child process of its own, in a network namespace of its own (``unshare
--net``: gone with the process), with a low limit and every other descriptor taken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.system]

CHILD = textwrap.dedent(
    """
    import os, resource, sys
    from migrate.errors import RoamError
    from migrate.kernel import nft
    from migrate.kernel.fdreserve import RESERVE

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    if sys.argv[1] == "reserve":
        RESERVE.hold()
    nft.apply("add table inet roam_fd_test\\ndelete table inet roam_fd_test\\n")  # loaded
    taken = []
    while True:  # the daemon's connections, up to the limit
        try:
            taken.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    try:
        nft.apply("add table inet roam_fd_test\\n")
        nft.apply("delete table inet roam_fd_test\\n")
    except RoamError as error:
        print("failed:", error)
        sys.exit(1)
    held = RESERVE.held
    try:  # still at the limit: the reserve was taken back
        os.open(os.devnull, os.O_RDONLY)
        print("a descriptor was free after the change")
        sys.exit(2)
    except OSError:
        pass
    print("applied; reserve held again:", held)
    """
)


def run_child(mode: str) -> subprocess.CompletedProcess[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run(
        ["unshare", "--net", sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        check=False,
    )


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nft") is None:
        pytest.skip("system test: needs root, unshare and nft")


@pytest.mark.parametrize("program", [False, True], ids=["libnftables", "nft-program"])
def test_a_daemon_at_its_open_file_limit_still_applies_rules(
    program: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if program:
        monkeypatch.setenv("ROAM_NFT_PROGRAM", "1")
    done = run_child("reserve")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "applied; reserve held again: 16" in done.stdout


def test_without_the_reserve_the_same_change_fails_at_the_limit() -> None:
    done = run_child("none")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Too many open files" in done.stdout
