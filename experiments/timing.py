"""Host timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time


def median_wall_s(fn, repeats: int) -> float:
    """Median host seconds of `repeats` calls of the blocking `fn`, after one untimed call (compiles, warms up)."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
