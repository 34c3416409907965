"""What a daemon's file writes cost its event loop while the disk is busy: the synchronous
replacement the shims did on their loops before (``write_private``: a status without fsync, a
state with) against handing the same content to a ``LatestWriter`` thread, each timed idle and
while a bounded writeback runs beside (files written to a temporary directory and synced, as a
lab writing its content does; all removed at the end).

    python -m labs.benchmarks.disk_stall [--writeback-mib 1024] [--seconds 15] [--dir /var/tmp]

Prints, per way and phase, the milliseconds one call kept its caller (p50, p99, max) and how
many calls took over 100 ms; the last line compares the worst call of each way under writeback.
``--dir`` must be on a disk (a tmpfs shows nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from migrate.kernel.files import LatestWriter, write_private

MIB = 1024 * 1024
CHUNK = 16 * MIB
CALL_EVERY_S = 0.02
SLOW_S = 0.1


def writeback(directory: Path, total_mib: int, until: float, stop: threading.Event) -> None:
    """Write ``total_mib`` in files and sync, again and again, until ``until`` (bounded)."""
    block = os.urandom(CHUNK)
    while not stop.is_set() and time.monotonic() < until:
        for n in range(max(1, total_mib * MIB // CHUNK)):
            if stop.is_set() or time.monotonic() >= until:
                break
            with open(directory / f"bulk-{n % 8}", "ab") as handle:
                handle.write(block)
        os.sync()
        for path in directory.glob("bulk-*"):
            path.unlink()


def time_calls(calls: dict[str, Callable[[int], None]], seconds: float) -> dict[str, list[float]]:
    taken: dict[str, list[float]] = {name: [] for name in calls}
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        for name, call in calls.items():
            started = time.monotonic()
            call(n)
            taken[name].append(time.monotonic() - started)
        time.sleep(CALL_EVERY_S)
    return taken


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    slow = sum(1 for v in ordered if v > SLOW_S)
    return f"p50 {p50:7.2f}  p99 {p99:7.2f}  max {ordered[-1] * 1000:7.1f} ms  >100 ms: {slow}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writeback-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    if args.writeback_mib < 1 or not 1 <= args.seconds <= 600:
        parser.error("--writeback-mib must be >= 1 and --seconds within 1..600")
    workdir = Path(tempfile.mkdtemp(prefix="roam-disk-stall-", dir=args.dir))
    status = LatestWriter(workdir / "status.json", durable=False)
    state = LatestWriter(workdir / "state.json")
    content = b'{"epoch": %d, "padding": "' + b"x" * 2000 + b'"}\n'
    calls: dict[str, Callable[[int], None]] = {
        "status on the loop (before)": lambda n: write_private(
            workdir / "status-sync.json", content % n, durable=False
        ),
        "state on the loop (before)": lambda n: write_private(
            workdir / "state-sync.json", content % n
        ),
        "status to its writer": lambda n: status.submit(content % n),
        "state to its writer": lambda n: state.submit(content % n),
    }
    stop = threading.Event()
    try:
        phases = {"idle": time_calls(calls, min(5.0, args.seconds))}
        bulk = workdir / "bulk"
        bulk.mkdir()
        worker = threading.Thread(
            target=writeback,
            args=(bulk, args.writeback_mib, time.monotonic() + args.seconds + 30, stop),
        )
        worker.start()
        phases[f"writeback of {args.writeback_mib} MiB"] = time_calls(calls, args.seconds)
        stop.set()
        worker.join()
        status.close()
        state.close()
    finally:
        stop.set()
        shutil.rmtree(workdir, ignore_errors=True)
    for phase, taken in phases.items():
        print(f"{phase}:")
        for name, values in taken.items():
            print(f"  {name:30s} {summary(values)}")
    busy = list(phases.values())[-1]
    for kind in ("status", "state"):
        before = max(busy[f"{kind} on the loop (before)"])
        after = max(busy[f"{kind} to its writer"])
        ratio = before / max(after, 1e-6)
        print(
            f"{kind}: worst call under writeback {before * 1000:.1f} ms on the loop, "
            f"{after * 1000:.2f} ms handed to its writer ({ratio:.0f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
