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


class Budget:
    """Wall-clock budget of the run; remembers the points it refused. A point starts only if the longest point
    measured so far (`record`) would still end inside the budget: a decode point compiles for about a minute,
    and one started just before the limit ran into the caller's time-out before the results were written
    (bench_engine's sweep in session 13)."""

    def __init__(self, t0: float, limit_s: float, clock=time.perf_counter):
        self.t0, self.limit_s, self.clock = t0, limit_s, clock
        self.longest_point_s = 0.0
        self.skipped: list[str] = []

    def record(self, point_s: float) -> None:
        """A point took point_s seconds (compile and measurement)."""
        self.longest_point_s = max(self.longest_point_s, point_s)

    def allows(self, point: str) -> bool:
        if self.clock() - self.t0 + self.longest_point_s < self.limit_s:
            return True
        self.skipped.append(point)
        return False
