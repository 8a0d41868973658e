"""experiments/host_profile.py: a step function's host time under cProfile, per call, costliest first."""

import jax.numpy as jnp
import pytest

from experiments.host_profile import host_profile


def _python_heavy(n):
    total = 0
    for i in range(n):  # all of it the function's own time: no calls inside the loop
        total += i * i
    return total


def test_host_profile_ranks_functions_by_their_own_time():
    x = jnp.ones(8)

    def step():
        _python_heavy(100000)
        return x + 1

    step()  # compiles x + 1 outside the profile
    result = host_profile(step, calls=3, top=5)
    assert result["host_s_per_call"] > 0
    top = result["top"]
    assert 0 < len(top) <= 5
    assert [e["own_us_per_call"] for e in top] == sorted((e["own_us_per_call"] for e in top), reverse=True)
    # _python_heavy's loop (about 5 ms) outweighs the dispatch of x + 1 (tens of us)
    assert "_python_heavy" in top[0]["function"] and top[0]["calls_per_call"] == pytest.approx(1)


def test_host_profile_needs_a_call():
    with pytest.raises(ValueError, match="calls"):
        host_profile(lambda: None, calls=0)
