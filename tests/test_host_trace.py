"""experiments/host_trace.py: JAX's and XLA's host events of a step, summed by name per call, and the device
kernels per program."""

import types

import jax
import jax.numpy as jnp
import pytest

from experiments.host_trace import host_trace, summarize


def _event(name, us, **stats):
    return types.SimpleNamespace(name=name, duration_ns=us * 1e3, start_ns=0.0, stats=list(stats.items()))


def _plane(name, lines):
    return types.SimpleNamespace(name=name, lines=[types.SimpleNamespace(name=n, events=e) for n, e in lines])


def test_summarize_sums_host_events_by_name_per_call_and_counts_kernels_per_module():
    host = _plane("/host:CPU", [("python", [_event("PjitFunction(layer)", 30), _event("PjitFunction(layer)", 50),
                                            _event("shard_args", 10)]),
                                ("worker", [_event("ThunkExecutor::Execute", 100)])])
    gpu = _plane("/device:GPU:0", [("Stream #1", [_event("k1", 5, hlo_module="jit_layer", hlo_op="fusion"),
                                                  _event("k2", 5, hlo_module="jit_layer", hlo_op="fusion.1"),
                                                  _event("k3", 5, hlo_module="jit_head", hlo_op="dot")])])
    out = summarize([host, gpu], calls=2, top=2)
    assert out["host_events"] == [dict(name="ThunkExecutor::Execute", count_per_call=0.5, us_per_call=50.0),
                                  dict(name="PjitFunction(layer)", count_per_call=1.0, us_per_call=40.0)]
    assert out["kernels_per_call"] == 1.5
    assert out["kernels_per_call_by_module"] == {"jit_head": 0.5, "jit_layer": 1.0}


def test_summarize_refuses_a_profile_without_host_events():
    with pytest.raises(RuntimeError, match="no host events"):
        summarize([_plane("/device:GPU:0", [])], calls=1)
    with pytest.raises(ValueError, match="calls"):
        summarize([], calls=0)


def test_host_trace_of_a_jitted_step_names_its_program():
    x = jnp.ones((64, 64))
    step = jax.jit(lambda a: jnp.sin(a) @ a)
    out = host_trace(lambda: step(x), calls=3)
    names = [e["name"] for e in out["host_events"]]
    dispatch = [e for e in out["host_events"] if e["name"].startswith("PjitFunction(")]
    assert dispatch and dispatch[0]["us_per_call"] > 0 and dispatch[0]["count_per_call"] >= 1, names
    assert out["kernels_per_call"] >= 1
