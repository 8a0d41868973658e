"""The device-ordered copy-engine fetch (`StreamOrderedPull`) on simulated CPU devices.

On CPU its copies are host memmoves that run when the device reaches the issue hook, so with synchronous CPU
dispatch these tests check what the GPU version relies on: the hooks run in dispatch order, on the right
device, between the layer programs, and DWDP reads exactly the staged experts (whole buffers, planned subsets
with on-demand misses, ring reuse across steps). The CUDA side (events, streams) is checked on the GPUs by
`experiments/gpu_check_dwdp.py --fetch=copy_engine_stream`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup
from dwdp_jax.parallel.fetch import DeviceHook, StreamOrderedPull, fetch_backend
from dwdp_jax.planner import FetchPolicy

CFG = TINY.replace(num_layers=3, first_k_dense_replace=1)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=11)


def _check_steps(model, group, rng, batch, seq, steps=3):
    """`steps` forward passes, a different batch per rank each time, against the single-device model."""
    for _ in range(steps):
        batches = [rng.randint(0, CFG.vocab_size, (batch, seq)).astype(np.int32) for _ in group.ranks]
        outs = group.run_parallel(lambda rank, ids: np.asarray(rank.forward(ids)), batches)
        for ids, logits in zip(batches, outs):
            ref = np.asarray(model(jnp.asarray(ids)))
            assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-5


def test_needs_sync_dispatch_on_cpu():
    if jax.config.values["jax_cpu_enable_async_dispatch"]:
        with pytest.raises(ValueError, match="jax_cpu_enable_async_dispatch"):
            StreamOrderedPull()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="copy_engine_stream"):
        fetch_backend("nvlink_magic")


def test_hook_runs_actions_in_dispatch_order_on_its_device(sync_dispatch):
    device = jax.devices()[1]
    hook = DeviceHook(device)
    seen = []
    double = jax.jit(lambda x: x * 2)
    x = jax.device_put(np.arange(4.0, dtype=np.float32), device)
    for i in range(3):
        out = hook.run(lambda stream, i=i: seen.append(("a", i, stream)), lambda stream, i=i: seen.append(("b", i)))
        x = double(x)
    assert seen == [("a", 0, None), ("b", 0), ("a", 1, None), ("b", 1), ("a", 2, None), ("b", 2)]
    assert out.devices() == {device}
    np.testing.assert_array_equal(np.asarray(x), np.arange(4.0) * 8)


def test_staged_bytes_equal_the_source(sync_dispatch, model):
    group = DwdpGroup(model, jax.devices()[:2], dwdp=DwdpConfig(2), fetch=StreamOrderedPull(slots=2))
    rank, peer = group.ranks
    layer = CFG.first_k_dense_replace
    src = peer.local_experts(layer)
    handle = rank.fetch.subset(src, rank.device, [3, 1, 2], offset=1)  # a permuted subset, shifted by one
    (staged,) = rank.fetch.ready_all([handle])
    rank.fetch.sync(rank.device)
    assert staged.w_gate_up.devices() == {rank.device}
    np.testing.assert_array_equal(np.asarray(staged.w_gate_up)[1:4], np.asarray(src.w_gate_up)[[3, 1, 2]])
    np.testing.assert_array_equal(np.asarray(staged.w_down)[1:4], np.asarray(src.w_down)[[3, 1, 2]])
    group.close()


@pytest.mark.parametrize("g, depth, slots", [(2, 1, 2), (4, 2, 3)])
def test_dwdp_with_device_ordered_fetch_matches_single_device(sync_dispatch, model, g, depth, slots):
    """Several steps (the ring wraps and the cross-step prefetch is used) on different batches per rank."""
    group = DwdpGroup(model, jax.devices()[:g], dwdp=DwdpConfig(g, depth), fetch=StreamOrderedPull(slots=slots))
    _check_steps(model, group, np.random.RandomState(g), batch=2, seq=5)
    group.close()


def test_planned_fetch_with_misses_matches_single_device(sync_dispatch, model):
    """top_k prefetch of few experts: most routed remote experts are on-demand misses copied into the same
    staging after the prefetched ones (a second issue hook into a slot before its wait)."""
    g = 2
    dwdp = DwdpConfig(g, 1, policy=FetchPolicy("top_k", k=1, experts_per_token=CFG.num_experts_per_tok))
    group = DwdpGroup(model, jax.devices()[:g], dwdp=dwdp, fetch=StreamOrderedPull(slots=2))
    _check_steps(model, group, np.random.RandomState(7), batch=1, seq=3)
    assert sum(rank.counters["miss_experts"] for rank in group.ranks) > 0
    group.close()
