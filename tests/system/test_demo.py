"""``roam demo``, the README's first command: a live download survives roams, nothing remains.

Runs the real command (as the README does, through ``roam_argv``) with a smaller file.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from labs.roaming import roam_argv

pytestmark = pytest.mark.system


def _namespaces() -> list[str]:
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def test_demo_download_survives_roams_and_leaves_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root")
    demo = subprocess.Popen(
        roam_argv("demo", "--size-mib", "24", "--rate-mbit", "40"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.terminate()
            demo.wait(timeout=30)
    assert demo.returncode == 0, output
    assert "demo: OK, the download survived every roam intact" in output
    sent = re.search(r"sha256 sent +(\w+)", output)
    received = re.search(r"sha256 received +(\w+)", output)
    assert sent, output
    assert received, output
    assert sent.group(1) == received.group(1)
    handovers = re.search(r"(\d+) hand-overs", output)
    assert handovers, output
    assert int(handovers.group(1)) >= 1, output
    assert "outsider without a bundle: no answer" in output
    # The demo's lab is named after its process: none of its namespaces remain.
    assert [n for n in _namespaces() if n.startswith(f"roam-{demo.pid}-")] == []
