"""Order statistics of the labs' measurements: one place for the quantiles every lab reports.

Two methods, because the figures they produce are compared over time and must not shift:
``nearest_rank`` (the benchmarks: a sample that was measured, 0.0 for none) and ``percentile``
(the Figure 2 experiment: linear interpolation, numpy's default, as the paper's tooling).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def nearest_rank(samples: Iterable[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank; 0.0 for no samples."""
    ordered = sorted(samples)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def p50_p99(samples: Iterable[float]) -> dict[str, float]:
    """Median and 99th percentile by nearest rank, with the number of samples."""
    values = list(samples)
    return {"p50": nearest_rank(values, 0.5), "p99": nearest_rank(values, 0.99), "n": len(values)}


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation between order statistics (numpy's
    default method)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)
