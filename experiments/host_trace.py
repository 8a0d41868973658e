"""Where a step's host time goes inside JAX and XLA: the host-side trace events of a few calls (JAX's jit
dispatch `PjitFunction(name)`, the PjRt client's execute phases, XLA's thunk and command-buffer launches), summed
by event name per call, next to the kernels each program launched on the device.

`host_profile.py` sees Python frames and puts a jitted call's C++ time into its caller's own time; this looks
inside that time. Method: `jax.profiler.trace` with the host tracer at level 2 (TraceMe events of the runtime),
no Python tracer; events on the host plane (`/host:CPU`) summed by name (nested events overlap, so the rows do
not add up to the step), kernels counted from the device plane (`engine_profile.op_events`; on CPU the XLA thunk
events) per HLO module. Tracing attaches the device tracer too (CUPTI on a GPU), which adds to every kernel
launch's host cost: compare traces with traces, and take absolute host times from untraced timings. XLA runs its
command buffers (CUDA graphs) as plain kernel launches while a profiler session is active unless XLA_FLAGS holds
`--xla_enable_command_buffers_during_profiling=true`.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from collections.abc import Callable

import jax

from experiments import engine_profile


def summarize(planes, calls: int, top: int = 20) -> dict:
    """A profile's planes -> {"host_events": the `top` host event names by their summed duration per call,
    each {"name", "count_per_call", "us_per_call"}; "kernels_per_call": device kernels per call;
    "kernels_per_call_by_module": {HLO module: kernels per call}}."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    planes = list(planes)
    total, count = collections.Counter(), collections.Counter()
    for plane in planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                total[event.name] += event.duration_ns / 1e3
                count[event.name] += 1
    if not total:
        raise RuntimeError(f"no host events in the profile (planes: {[p.name for p in planes]})")
    kernels = engine_profile.op_events(planes)
    by_module = collections.Counter(k.module or "(no module)" for k in kernels)
    return dict(host_events=[dict(name=name, count_per_call=count[name] / calls, us_per_call=us / calls)
                             for name, us in total.most_common(top)],
                kernels_per_call=len(kernels) / calls,
                kernels_per_call_by_module={m: n / calls for m, n in sorted(by_module.items())})


def host_trace(fn: Callable[[], object], calls: int, top: int = 20) -> dict:
    """`summarize` of `calls` calls of `fn` (which returns device arrays), each waited for, after one untraced
    call (compilation stays out of the trace)."""
    jax.block_until_ready(fn())
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.host_tracer_level = 2
    log_dir = tempfile.mkdtemp(prefix="host_trace-")
    try:
        with jax.profiler.trace(log_dir, profiler_options=options):
            for _ in range(calls):
                jax.block_until_ready(fn())
        return summarize(engine_profile.load_profile(log_dir), calls, top)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
