"""Errors of the lab kit.

Bad input (a link parameter, a node name, a delay this kernel cannot apply) raises
``migrate.errors.ConfigError`` before anything is created. A failure while a lab runs raises a
``LabError``: both are ``RoamError``s, so the ``roam`` command prints them as one line.
``CommandFailedError`` and ``CommandTimeoutError`` also derive from their ``subprocess``
counterparts, so code written against ``subprocess.run(check=True)`` keeps working.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from migrate.errors import ConfigError, LocalError

__all__ = [
    "CommandFailedError",
    "CommandTimeoutError",
    "ConfigError",
    "LabError",
    "ServiceStartError",
]


class LabError(LocalError):
    """The lab could not create, run or remove something it was asked to."""


def _last_line(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class CommandFailedError(LabError, subprocess.CalledProcessError):
    """A program run in a lab host with ``check=True`` exited with a non-zero status."""

    def __init__(
        self,
        node: str,
        argv: Sequence[str],
        returncode: int,
        stdout: str | bytes | None,
        stderr: str | bytes | None,
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, list(argv), stdout, stderr)
        self.node = node

    def __str__(self) -> str:
        detail = _last_line(self.stderr) or _last_line(self.stdout)
        suffix = f": {detail}" if detail else ""
        return f"{self.cmd[0]} in {self.node} exited with status {self.returncode}{suffix}"


class CommandTimeoutError(LabError, subprocess.TimeoutExpired):
    """A program run in a lab host did not finish within its timeout and was killed."""

    def __init__(
        self,
        node: str,
        argv: Sequence[str],
        timeout_s: float,
        stdout: str | bytes | None = None,
        stderr: str | bytes | None = None,
    ) -> None:
        subprocess.TimeoutExpired.__init__(self, list(argv), timeout_s, stdout, stderr)
        self.node = node

    def __str__(self) -> str:
        return f"{self.cmd[0]} in {self.node} did not finish within {self.timeout:g} s"


class ServiceStartError(LabError):
    """A service did not start accepting connections within its bounded wait."""
