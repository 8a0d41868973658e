"""Measurement helpers of the kernel benchmarks (GPU only): kernel durations from CUPTI, for benchmarks that must
not time host dispatch, and the copy-engine baseline that remote-DMA and fetch bandwidths are compared with."""

from __future__ import annotations

import statistics
import time


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


def copy_engine_gbps(devices, nbytes=2 << 30, repeats=5, device_timed=False) -> float:
  """Per-GPU bandwidth of cudaMemcpyPeerAsync with every GPU pulling from its next peer at once.

  Host-timed (issue to last stream sync) by default; `device_timed=True` times each copy with CUDA events
  on its stream and takes the slowest GPU, the measure to set beside a kernel's own (CUPTI) duration."""
  import cupy as cp

  g = len(devices)
  ids = [d.id for d in devices]
  bufs, streams, events = [], [], []
  for i in ids:
    with cp.cuda.Device(i):
      for j in ids:
        if j != i:
          try:
            cp.cuda.runtime.deviceEnablePeerAccess(j)
          except cp.cuda.runtime.CUDARuntimeError:
            pass
      bufs.append((cp.empty(nbytes, cp.uint8), cp.ones(nbytes, cp.uint8)))
      streams.append(cp.cuda.Stream(non_blocking=True))
      events.append((cp.cuda.Event(), cp.cuda.Event()))
  times = []
  for _ in range(repeats + 1):
    for i in ids:
      cp.cuda.Device(i).synchronize()
    t0 = time.perf_counter()
    for r, i in enumerate(ids):
      src_rank = (r + 1) % g
      with cp.cuda.Device(i):
        events[r][0].record(streams[r])
        cp.cuda.runtime.memcpyPeerAsync(bufs[r][0].data.ptr, i, bufs[src_rank][1].data.ptr, ids[src_rank],
                        nbytes, streams[r].ptr)
        events[r][1].record(streams[r])
    for r, i in enumerate(ids):
      streams[r].synchronize()
    host_s = time.perf_counter() - t0
    device_s = max(cp.cuda.get_elapsed_time(a, b) for a, b in events) / 1e3
    times.append(device_s if device_timed else host_s)
  del bufs
  return nbytes / statistics.median(times[1:]) / 1e9
