"""Bounds on the work one simulated message may cost, for tests of time as it passes.

A handler whose cost grows with the time since the last message (a counter gap, an epoch
gap, a lease) hides in tests that live for seconds. These helpers make such a test fail: the
memory a step allocates is measured exactly (tracemalloc), and the CPU time it takes (process
time, not wall clock: another process's load does not count) is held to a bound far above what
a constant-time step needs and far below what a step proportional to a day's gap takes.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STEP_CPU_SECONDS = 0.005
"""Per simulated message: a few milliseconds of work at most."""

STEP_PEAK_BYTES = 256 << 10
"""Per simulated message: what it may allocate at its peak."""


@dataclass
class Work:
    cpu_seconds: float = 0.0
    peak_bytes: int = 0


@contextmanager
def measured() -> Iterator[Work]:
    """Measure the CPU time and peak allocation of the block."""
    work = Work()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    start = time.process_time()
    try:
        yield work
    finally:
        work.cpu_seconds = time.process_time() - start
        work.peak_bytes = tracemalloc.get_traced_memory()[1] - base
        if not was_tracing:
            tracemalloc.stop()


@contextmanager
def bounded_step(what: str, steps: int = 1) -> Iterator[Work]:
    """Fail if the block costs more than ``steps`` simulated messages may."""
    with measured() as work:
        yield work
    assert work.peak_bytes <= STEP_PEAK_BYTES, (
        f"{what}: allocated {work.peak_bytes} bytes at its peak (bound {STEP_PEAK_BYTES})"
    )
    assert work.cpu_seconds <= STEP_CPU_SECONDS * steps + 0.05, (
        f"{what}: took {work.cpu_seconds * 1000:.1f} ms of CPU for {steps} step(s)"
    )
