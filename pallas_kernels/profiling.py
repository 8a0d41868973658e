"""Kernel durations from CUPTI (GPU only), for benchmarks that must not time host dispatch."""

from __future__ import annotations

import statistics


def kernel_calls(f, *args, iterations: int = 5) -> list[list[tuple[str, float]]]:
  """Runs the jitted `f(*args)` `iterations` times under CUPTI; per call, every GPU kernel it ran as
  (kernel name, seconds), on all devices the call uses."""
  from jax.experimental.mosaic.gpu import profiler

  _, timings = profiler.measure(f, aggregate=False, iterations=iterations)(*args)
  return [[(name, ms / 1e3) for name, ms in call] for call in timings]


def median_per_call(calls, per_call) -> float:
  """Median over calls of `per_call(kernels of one call)`; median_low, so an actual measured value."""
  return statistics.median_low(per_call(call) for call in calls)


def is_mosaic(name: str) -> bool:
  """Whether a kernel name is a Mosaic GPU (Pallas) kernel."""
  return "mosaic" in name
