"""Benchmark: hash-chain traversal with pebbles against the two naive approaches.

    python -m labs.benchmarks.chain [--sizes 20,24] [--advances 1048576] [--json]

For each chain length n = 2^k, three ways of following the epochs forward (K_1, K_2, ...)
from K_n run side by side, each in its own child process so that its peak memory (max RSS
growth) is its own:

* ``pebbles``  : ``migrate.hashchain.KeyChain`` (O(log n) keys kept, amortised O(log n) hashes)
* ``store-all``: compute the whole chain once and keep every key (O(n) memory, O(1) per step)
* ``rehash``   : keep only K_n and hash down to K_i for every step (O(1) memory, O(n) per step)

Reported per approach: setup time (first key), cost per epoch advance (wall time and hashes),
cost of random access at several distances above the cursor, and peak memory. Ratios are
against ``pebbles`` in the same run. Only ``rehash`` is sampled (a few steps), because running
it over the whole chain would take days at n = 2^24; its per-step cost does not depend on how
many steps are taken.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from migrate.hashchain import KeyChain, chain_step

TOP = bytes(range(32))


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


def pebbles(n: int, advances: int, probes: list[int]) -> dict[str, Any]:
    chain = KeyChain(TOP, n)
    started = time.perf_counter()
    chain.seek(1)
    setup = time.perf_counter() - started
    setup_hashes = chain.hashes
    chain.hashes = 0
    most_pebbles = chain.pebble_count
    started = time.perf_counter()
    for _ in range(advances - 1):
        chain.advance()
        most_pebbles = max(most_pebbles, chain.pebble_count)
    per_advance = (time.perf_counter() - started) / max(1, advances - 1)
    advance_hashes = chain.hashes / max(1, advances - 1)
    access: dict[str, float] = {}
    for distance in probes:
        target = min(n, chain.cursor + distance)
        chain.hashes = 0
        started = time.perf_counter()
        chain.key(target)
        access[str(distance)] = time.perf_counter() - started
    return {
        "setup_s": setup,
        "setup_hashes": setup_hashes,
        "advance_us": per_advance * 1e6,
        "advance_hashes": advance_hashes,
        "random_access_s": access,
        "keys_kept": most_pebbles,
    }


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


def benchmark(exponent: int, advances: int, rehash_samples: int) -> dict[str, Any]:
    n = 1 << exponent
    advances = min(advances, n)
    probes = [1, 1000, 1_000_000]
    return {
        "n": n,
        "exponent": exponent,
        "advances": advances,
        "pebbles": run_isolated(lambda: pebbles(n, advances, probes)),
        "store-all": run_isolated(lambda: store_all(n, advances, probes)),
        "rehash": run_isolated(lambda: rehash(n, rehash_samples, probes)),
    }


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "| n | approach | setup (s) | per advance (µs) | hashes per advance | keys kept | "
        "peak memory (MiB) | advance cost vs pebbles | memory vs pebbles |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["pebbles"]
        for name in ("pebbles", "store-all", "rehash"):
            row = result[name]
            speed = row["advance_us"] / base["advance_us"]
            memory = row["peak_memory_mib"] / max(base["peak_memory_mib"], 0.01)
            lines.append(
                f"| 2^{result['exponent']} | {name} | {row['setup_s']:.2f} | "
                f"{row['advance_us']:.2f} | {row['advance_hashes']:.1f} | {row['keys_kept']} | "
                f"{row['peak_memory_mib']:.1f} | {speed:.2f}x | {memory:.0f}x |"
            )
    lines.append("")
    lines.append("Random access to K_(cursor+d) with pebbles (seconds):")
    for result in results:
        access = result["pebbles"]["random_access_s"]
        text = ", ".join(f"d={d}: {t:.6f}" for d, t in access.items())
        lines.append(f"- 2^{result['exponent']}: {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20,24", help="exponents k of n = 2^k (default 20,24)")
    parser.add_argument(
        "--advances",
        type=int,
        default=1 << 20,
        help="epoch advances timed per approach (default 2^20)",
    )
    parser.add_argument("--rehash-samples", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    exponents = [int(part) for part in args.sizes.split(",")]
    results = [benchmark(k, args.advances, args.rehash_samples) for k in exponents]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
