"""Bounds on the work one simulated message may cost, for tests of time as it passes.

A handler whose cost grows with the time since the last message (a counter gap, an epoch
gap, a lease) hides in tests that live for seconds. These helpers make such a test fail: the
memory a step allocates is measured exactly (tracemalloc), and its work is counted as the
Python lines and calls it executes (``sys.settrace``), held to a bound far above what a
constant-time step needs and far below what a step proportional to a day's gap takes.

The count, unlike CPU time, is the same on every machine and every run: a slow or busy CI
machine (a process's CPU time includes what a hypervisor steals, and a garbage collection of
the whole test session's heap lands in whichever step triggers it) cannot fail the test, and
a regression fails it everywhere. CPU time is still measured, for the message.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

TraceFunction = Any  # a tracer returns itself (or None): typing cannot spell the recursion

STEP_EVENTS = 20_000
"""Per simulated message: traced Python lines and calls. A constant-time step of these tests
counts 24 to 3,100 of them (the most: a gate's walk, per 20 epochs walked; an update that
re-derives an hour of the chain, 11,000); walking a day of 2 s epochs counts millions."""

STEP_PEAK_BYTES = 256 << 10
"""Per simulated message: what it may allocate at its peak."""


@dataclass
class Work:
    cpu_seconds: float = 0.0
    peak_bytes: int = 0
    events: int = 0


@contextmanager
def measured() -> Iterator[Work]:
    """Measure the work (traced lines and calls), CPU time and peak allocation of the block."""
    work = Work()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    count = 0

    def tracer(_frame: FrameType, _event: str, _arg: object) -> TraceFunction:
        nonlocal count
        count += 1
        return tracer

    previous = sys.gettrace()  # hypothesis traces while it explains a failure: restored
    sys.settrace(tracer)
    start = time.process_time()
    try:
        yield work
    finally:
        sys.settrace(previous)
        work.cpu_seconds = time.process_time() - start
        work.events = count
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
    assert work.events <= STEP_EVENTS * steps, (
        f"{what}: executed {work.events} traced lines and calls for {steps} step(s) (bound "
        f"{STEP_EVENTS * steps}; {work.cpu_seconds * 1000:.1f} ms of CPU, traced)"
    )
