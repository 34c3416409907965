"""The shims raise their open-file limit at start (systemd's soft 1024 would refuse the 513th
relayed connection with EMFILE), and never lower it."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, resource, sys
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from migrate.kernel.processes import raise_open_file_limit
before, after = raise_open_file_limit(int(sys.argv[3]))
print(json.dumps([before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def probe(soft: int, hard: int, wanted: int) -> list[int]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(soft), str(hard), str(wanted)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    values: list[int] = json.loads(result.stdout)
    return values


def test_a_low_soft_limit_is_raised_at_least_to_the_hard_one():
    before, after, now = probe(1024, 4096, 1 << 20)
    assert before == 1024
    assert after == now
    assert now >= 4096


def test_a_limit_already_high_enough_is_left_alone():
    assert probe(4096, 4096, 2048) == [4096, 4096, 4096]
