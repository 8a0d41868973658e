"""Where a step's host time goes: a step function's calls under cProfile (Python frames and the C++ calls they
make, such as a jitted program's dispatch), each call then waited for outside the profile."""

from __future__ import annotations

import cProfile
import os
import pstats

import jax


def host_profile(fn, calls: int, top: int = 15) -> dict:
    """Profiles `calls` calls of `fn` (which returns device arrays without waiting for them).

    Returns {"host_s_per_call": profiled host seconds per call (cProfile's own overhead included, so larger than
    an unprofiled call), "top": the `top` entries by their own time, each {"function": "file:line(name)",
    "calls_per_call", "own_us_per_call", "cumulative_us_per_call"}}."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    profile = cProfile.Profile()
    for _ in range(calls):
        profile.enable()
        out = fn()
        profile.disable()
        jax.block_until_ready(out)
    stats = pstats.Stats(profile)
    entries = []
    for (path, line, name), (_, ncalls, own, cumulative, _) in stats.stats.items():
        where = f"{os.path.basename(path)}:{line}({name})" if path != "~" else name
        entries.append(dict(function=where, calls_per_call=ncalls / calls, own_us_per_call=own / calls * 1e6,
                            cumulative_us_per_call=cumulative / calls * 1e6))
    entries.sort(key=lambda e: -e["own_us_per_call"])
    return dict(host_s_per_call=stats.total_tt / calls, top=entries[:top])
