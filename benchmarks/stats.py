"""Summaries of latency samples: median, p99 and throughput, the same way for every benchmark."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples_s: Sequence[float], *, wall_s: float | None = None) -> dict[str, Any]:
    """Latency samples in seconds -> milliseconds; calls/s from the wall time (or 1/mean when sequential)."""
    if not samples_s:
        return {"n": 0, "median_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan, "calls_per_s": math.nan}
    mean = statistics.fmean(samples_s)
    return {
        "n": len(samples_s),
        "median_ms": statistics.median(samples_s) * 1e3,
        "p99_ms": percentile(samples_s, 99) * 1e3,
        "mean_ms": mean * 1e3,
        "calls_per_s": (len(samples_s) / wall_s) if wall_s else (1 / mean if mean else math.nan),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
