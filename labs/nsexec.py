"""Running programs inside a lab namespace.

Programs run under ``ip netns exec``: besides entering the network namespace it remounts
``/sys`` for that namespace, which tools reading ``/sys/class/net`` (tcpdump, ethtool) rely on,
and it ``exec``s the program, so the pid we hold is the program's own pid. pyroute2 has no
equivalent for running an unrelated program, hence the one shell-out here.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence

from labs.errors import CommandFailedError, CommandTimeoutError
from migrate.errors import ConfigError

DEFAULT_TIMEOUT_S = 60.0


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The argument list that runs ``argv`` inside ``netns``."""
    if isinstance(argv, str | bytes) or not argv:
        raise ConfigError(f"a command must be a non-empty list of arguments, got {argv!r}")
    # say which program is missing, rather than let `ip netns exec` fail with status 255
    require_tools(str(argv[0]))
    return ["ip", "netns", "exec", netns, *(str(arg) for arg in argv)]


def require_tools(*names: str) -> None:
    """Raise a ``ConfigError`` naming every program in ``names`` that is not installed."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise ConfigError(f"missing programs: {', '.join(missing)} (install them: make deps)")


def run_in_netns(
    netns: str,
    argv: Sequence[str],
    *,
    where: str,
    check: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``netns`` to completion, within ``timeout_s`` (then it is killed).

    ``where`` names the node in error messages.
    """
    full = netns_argv(netns, argv)
    try:
        completed = subprocess.run(
            full,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise CommandTimeoutError(
            where, list(argv), timeout_s, error.stdout, error.stderr
        ) from None
    # Report the program's own argv, not the ip-netns-exec wrapper.
    completed.args = list(argv)
    if check and completed.returncode != 0:
        raise CommandFailedError(
            where, list(argv), completed.returncode, completed.stdout, completed.stderr
        )
    return completed
