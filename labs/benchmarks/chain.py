"""Benchmark: hash-chain traversal (worst case per advance) and start-up on long chains.

    python -m labs.benchmarks.chain [--sizes 20,24] [--startup 20,24,32] [--baselines] [--json]

Traversal: for each chain length n = 2^k, ``migrate.hashchain.KeyChain`` follows *every*
epoch forward from K_1 to K_n in a child process of its own (so that its peak memory, max RSS
growth, is its own); each advance is timed and its hash count read, and the report gives the
worst and the 99th percentile of both, the keys held at most, and peak memory. With
``--baselines`` the two naive approaches run too (2^20 advances each):

* ``store-all``: compute the whole chain once and keep every key (O(n) memory, O(1) per step)
* ``rehash``   : keep only K_n and hash down for every step (O(1) memory, O(n) per step)

Start-up: what a server pays to find the epoch running "now" at the chain's start, middle and
end, from K_n and the sealed index ``roam init`` stores (``migrate.chainindex``): opening the
index, then ``EpochSchedule(...).epoch_at(now)``; and, for comparison, without the index. The
index itself is built once (reported: its build time, 2 hashes per epoch). At 2^32 the index
cannot be built here (2^33 hashes, hours in Python): the start-up runs on an index with the
right layout and random keys and landmarks: a start does exactly the same work on it (it hashes
down from index keys and checks none of them), so its time is the real one; the build time is
extrapolated from the measured time per hash.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import random
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from migrate.chainindex import open_index, seal_index, sealed_size
from migrate.endpoints import parse_server_list
from migrate.hashchain import DEFAULT_INDEX_SPACING, KeyChain, PebbleIndex, build_index, chain_step
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams, index_units, m_tag

TOP = bytes(range(32))
NO_GC = False  # set by --no-gc before the child processes fork


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(body: Callable[[], dict[str, Any]], queue: Any) -> None:
    before = _rss_kib()
    result = body()
    result["peak_memory_mib"] = max(0, _rss_kib() - before) / 1024
    queue.put(result)


def run_isolated(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(body, queue))
    process.start()
    result: dict[str, Any] = queue.get()
    process.join()
    return result


def _percentile(histogram: dict[int, int], total: int, fraction: float) -> int:
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= fraction * total:
            return value
    return max(histogram, default=0)


def pebbles(n: int, advances: int, probes: list[int]) -> dict[str, Any]:
    """Every advance from K_1 to K_n: worst and p99 time and hashes, keys held."""
    chain = KeyChain(TOP, n)
    clock = time.perf_counter
    started = clock()
    chain.seek(1)
    setup = clock() - started
    setup_hashes = chain.hashes
    most_pebbles = chain.pebble_count
    # Wall time includes preemption by other processes on a shared machine; the thread's CPU
    # time does not: both are reported, the CPU time being the cost of the advance itself.
    cpu = time.thread_time
    times: dict[int, int] = {}  # advance wall time in 0.1 µs -> count
    cpu_times: dict[int, int] = {}
    hashes: dict[int, int] = {}
    worst_s = worst_cpu_s = 0.0
    worst_at = costliest = 1
    steps = min(advances, n) - 1
    if NO_GC:
        # The interpreter's cyclic garbage collector pauses whatever code runs when it fires
        # (a full collection: milliseconds); --no-gc leaves it out to time the advances alone.
        gc.collect()
        gc.disable()
    total_started = clock()
    for _ in range(steps):
        before = chain.hashes
        started_cpu = cpu()
        started = clock()
        index, _key = chain.advance()
        took = clock() - started
        took_cpu = cpu() - started_cpu
        bucket = int(took * 1e7)
        times[bucket] = times.get(bucket, 0) + 1
        bucket = int(took_cpu * 1e7)
        cpu_times[bucket] = cpu_times.get(bucket, 0) + 1
        cost = chain.hashes - before
        if cost > max(hashes, default=-1):
            costliest = index
        hashes[cost] = hashes.get(cost, 0) + 1
        worst_s = max(worst_s, took)
        if took_cpu > worst_cpu_s:
            worst_cpu_s, worst_at = took_cpu, index
        most_pebbles = max(most_pebbles, chain.pebble_count)
    total = clock() - total_started
    gc.enable()
    replay = _replay(n, costliest) if n <= 1 << 22 else []
    access: dict[str, float] = {}
    for distance in probes:
        target = max(1, chain.cursor - distance)
        started = clock()
        chain.key(target)
        access[str(distance)] = clock() - started
    return {
        "setup_s": setup,
        "setup_hashes": setup_hashes,
        "advances": steps,
        "advance_us": total / max(1, steps) * 1e6,
        "advance_hashes": sum(k * v for k, v in hashes.items()) / max(1, steps),
        "worst_advance_us": worst_s * 1e6,
        "worst_advance_cpu_us": worst_cpu_s * 1e6,
        "worst_advance_epoch": worst_at,
        "p99_advance_us": _percentile(times, steps, 0.99) / 10,
        "p99_advance_cpu_us": _percentile(cpu_times, steps, 0.99) / 10,
        "worst_advance_hashes": max(hashes, default=0),
        "p99_advance_hashes": _percentile(hashes, steps, 0.99),
        "random_access_back_s": access,
        "keys_kept": most_pebbles,
        "keys_bound": 2 * (n - 1).bit_length(),
        "costliest_epoch": costliest,
        "costliest_replay_cpu_us": sorted(replay),
    }


def _replay(n: int, epoch: int, repeat: int = 15) -> list[float]:
    """CPU µs of the advance into ``epoch`` (the first with the most hashes), each time on a
    fresh chain set up at ``epoch - 1``: the cost of the costliest advance without the
    outliers a shared host adds to a single run."""
    took: list[float] = []
    for _ in range(repeat):
        chain = KeyChain(TOP, n)
        chain.seek(epoch - 1)
        started = time.thread_time()
        chain.seek(epoch)
        took.append((time.thread_time() - started) * 1e6)
    return took


def store_all(n: int, advances: int, probes: list[int]) -> dict[str, Any]:
    started = time.perf_counter()
    keys: list[bytes] = [b""] * (n + 1)
    key = TOP
    keys[n] = key
    for index in range(n, 1, -1):
        key = chain_step(key)
        keys[index - 1] = key
    setup = time.perf_counter() - started
    started = time.perf_counter()
    sink = 0
    for index in range(1, advances + 1):
        sink ^= keys[index][0]
    per_advance = (time.perf_counter() - started) / advances
    access = {}
    for distance in probes:
        started = time.perf_counter()
        sink ^= keys[min(n, advances + distance)][0]
        access[str(distance)] = time.perf_counter() - started
    return {
        "setup_s": setup,
        "setup_hashes": n - 1,
        "advance_us": per_advance * 1e6,
        "advance_hashes": 0.0,
        "random_access_s": access,
        "keys_kept": n,
        "sink": sink,
    }


def rehash(n: int, samples: int, probes: list[int]) -> dict[str, Any]:
    def key_at(index: int) -> bytes:
        key = TOP
        for _ in range(n - index):
            key = chain_step(key)
        return key

    rng = random.Random(7)
    started = time.perf_counter()
    key_at(1)
    setup = time.perf_counter() - started
    indices = [rng.randint(1, n) for _ in range(samples)]
    started = time.perf_counter()
    for index in indices:
        key_at(index)
    per_advance = (time.perf_counter() - started) / samples
    return {
        "setup_s": setup,
        "setup_hashes": n - 1,
        "advance_us": per_advance * 1e6,
        "advance_hashes": sum(n - i for i in indices) / samples,
        "random_access_s": {str(d): per_advance for d in probes},
        "keys_kept": 1,
    }


SERVERS = parse_server_list("10.0.0.1:80,10.0.0.2:80,10.0.0.3:80")
M = MSchedule(6)
GROUP = bytes(range(64, 96))
CONTEXT = bytes(16)


def _fixed_random(count: int) -> bytes:
    return bytes(count)


def _synthetic_index(n: int, spacing: int) -> PebbleIndex:
    """The layout of a real index, random keys and landmarks (see the module docstring)."""
    rng = random.Random(n)
    count = (n - 1) // spacing
    mean_units = (1 << M.initial) // 2 + 1
    units: list[int] = []
    ticks = 0
    for _ in range(count):
        units.append(ticks)
        ticks += spacing * mean_units + rng.randint(-spacing, spacing)
    return PebbleIndex(n, spacing, rng.randbytes(32 * count), tuple(reversed(units)), m_tag(M))


def startup(exponent: int, build: bool, compare: bool) -> dict[str, Any]:
    n = 1 << exponent
    spacing = DEFAULT_INDEX_SPACING
    params = ScheduleParams(SERVERS, 1.0, 0.0, M)
    result: dict[str, Any] = {"n": n, "exponent": exponent, "synthetic": not build}
    started = time.perf_counter()
    if build:
        index = build_index(TOP, n, spacing, None, index_units(M), m_tag(M))
    else:
        index = _synthetic_index(n, spacing)
    result["index_build_s"] = time.perf_counter() - started
    sealed = seal_index(index, GROUP, CONTEXT, TOP, _fixed_random)
    result["index_bytes"] = len(sealed)
    assert len(sealed) == sealed_size(n, spacing)
    # One hash and one length digest per epoch: the per-hash time extrapolates the build.
    sample = 1 << 16
    started = time.perf_counter()
    build_index(TOP, sample + 1, spacing, None, index_units(M), m_tag(M))
    result["build_s_per_epoch"] = (time.perf_counter() - started) / sample
    # Epoch 1; the landmark in the middle; within the last index block (epochs last >= 1 tick).
    points = {
        "start": 0.5,
        "middle": index.units[index.count // 2] + 0.5,
        "end": index.units[0] + spacing - 0.5,
    }
    for name, now in points.items():
        started_cpu = time.process_time()
        started = time.perf_counter()
        opened = open_index(sealed, GROUP, CONTEXT, TOP, n)
        opened_s = time.perf_counter() - started
        schedule = EpochSchedule(KeyChain(TOP, n, opened), params)
        epoch = schedule.epoch_at(now)
        total = time.perf_counter() - started
        result[f"start_{name}_s"] = total
        result[f"start_{name}_cpu_s"] = time.process_time() - started_cpu
        result[f"start_{name}_open_s"] = opened_s
        result[f"start_{name}_epoch"] = epoch.index
        result[f"start_{name}_hashes"] = schedule.chain.hashes
        if compare:
            started = time.perf_counter()
            plain = EpochSchedule(KeyChain(TOP, n), params)
            plain_epoch = plain.epoch_at(now)
            result[f"start_{name}_noindex_s"] = time.perf_counter() - started
            assert plain_epoch == epoch, (plain_epoch, epoch)
    return result


def benchmark(exponent: int, advances: int, rehash_samples: int, baselines: bool) -> dict[str, Any]:
    n = 1 << exponent
    probes = [1, 1000, 1_000_000]
    result = {
        "n": n,
        "exponent": exponent,
        "pebbles": run_isolated(lambda: pebbles(n, n, probes)),
    }
    if baselines:
        sample = min(advances, n)
        result["store-all"] = run_isolated(lambda: store_all(n, sample, probes))
        result["rehash"] = run_isolated(lambda: rehash(n, rehash_samples, probes))
    return result


def render(results: list[dict[str, Any]], starts: list[dict[str, Any]]) -> str:
    lines = [
        "Traversal, every advance from K_1 to K_n:",
        "",
        "| n | advances | mean (µs) | p99 CPU (µs) | worst CPU (µs) | worst at epoch | "
        "p99 wall (µs) | worst wall (µs) | mean hashes | p99 hashes | worst hashes | "
        "keys held (bound 2 log2 n) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        row = result["pebbles"]
        lines.append(
            f"| 2^{result['exponent']} | {row['advances']} | {row['advance_us']:.2f} | "
            f"{row['p99_advance_cpu_us']:.1f} | {row['worst_advance_cpu_us']:.1f} | "
            f"{row['worst_advance_epoch']} | {row['p99_advance_us']:.1f} | "
            f"{row['worst_advance_us']:.1f} | {row['advance_hashes']:.2f} | "
            f"{row['p99_advance_hashes']} | {row['worst_advance_hashes']} | "
            f"{row['keys_kept']} ({row['keys_bound']}) | {row['peak_memory_mib']:.1f} |"
        )
    for result in results:
        row = result["pebbles"]
        replay = row["costliest_replay_cpu_us"]
        if replay:
            lines.append(
                f"\nCostliest advance of 2^{result['exponent']} (into epoch "
                f"{row['costliest_epoch']}, {row['worst_advance_hashes']} hashes) replayed "
                f"{len(replay)} times on fresh chains, CPU µs: min {replay[0]:.1f}, median "
                f"{replay[len(replay) // 2]:.1f}, max {replay[-1]:.1f}"
            )
    if any("rehash" in result for result in results):
        lines += [
            "",
            "| n | approach | setup (s) | per advance (µs) | hashes per advance | keys kept | "
            "peak memory (MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for result in results:
            for name in ("pebbles", "store-all", "rehash"):
                if name not in result:
                    continue
                row = result[name]
                lines.append(
                    f"| 2^{result['exponent']} | {name} | {row['setup_s']:.2f} | "
                    f"{row['advance_us']:.2f} | {row['advance_hashes']:.1f} | "
                    f"{row['keys_kept']} | {row['peak_memory_mib']:.1f} |"
                )
    if starts:
        lines += [
            "",
            "Start-up (open the sealed index, then find the epoch running now), seconds of "
            "CPU (wall):",
            "",
            "| n | index | index size | index build (s) | start | middle | end | hashes "
            "(middle) | without index: start | middle | end (wall) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in starts:
            build = (
                f"{row['index_build_s']:.1f}"
                if not row["synthetic"]
                else f"~{row['build_s_per_epoch'] * row['n']:.0f} (extrapolated)"
            )
            plain = " | ".join(
                f"{row[f'start_{name}_noindex_s']:.2f}" if f"start_{name}_noindex_s" in row else "-"
                for name in ("start", "middle", "end")
            )
            lines.append(
                f"| 2^{row['exponent']} | {'synthetic' if row['synthetic'] else 'built'} | "
                f"{row['index_bytes']:,} B | {build} | {_start(row, 'start')} | "
                f"{_start(row, 'middle')} | {_start(row, 'end')} | "
                f"{row['start_middle_hashes']} | {plain} |"
            )
    return "\n".join(lines)


def _start(row: dict[str, Any], name: str) -> str:
    return f"{row[f'start_{name}_cpu_s']:.3f} ({row[f'start_{name}_s']:.3f})"


def _exponents(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20,24", help="exponents k of n = 2^k (default 20,24)")
    parser.add_argument(
        "--startup",
        default="20,24,32",
        help="exponents for the start-up runs (default 20,24,32; above 24 the index is synthetic)",
    )
    parser.add_argument("--baselines", action="store_true", help="also run store-all and rehash")
    parser.add_argument(
        "--advances",
        type=int,
        default=1 << 20,
        help="epoch advances timed per baseline approach (default 2^20)",
    )
    parser.add_argument("--rehash-samples", type=int, default=3)
    parser.add_argument(
        "--no-gc", action="store_true", help="disable the garbage collector while timing advances"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    global NO_GC
    NO_GC = args.no_gc
    results = [
        benchmark(k, args.advances, args.rehash_samples, args.baselines)
        for k in _exponents(args.sizes)
    ]
    starts = [startup(k, build=k <= 24, compare=k <= 20) for k in _exponents(args.startup)]
    if args.json:
        print(json.dumps({"traversal": results, "startup": starts}, indent=2))
    else:
        print(render(results, starts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
