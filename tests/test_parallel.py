"""DWDP, DEP and replicated DP against the single-device model, on simulated CPU devices."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dep import DepModel
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup, replicated_placement, source_order
from dwdp_jax.parallel.memory import memory_per_device
from dwdp_jax.planner.placement import Placement
from tests.forward_util import jitted_forward

CFG = TINY.replace(num_layers=3, first_k_dense_replace=1)
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    return jitted_forward(model)


def _batches(g, b=2, s=6, seed=0):
    return [np.random.RandomState(seed + r).randint(0, CFG.vocab_size, (b, s)) for r in range(g)]


def _greedy(forward, ids, steps=3):
    """Greedy continuation by full re-forward (no cache): [b, s] -> [b, s + steps].

    One fixed input shape (padded at the end; causal attention ignores what follows a position), so the
    per-device programs compile once."""
    b, s = ids.shape
    buf = np.zeros((b, s + steps), ids.dtype)
    buf[:, :s] = ids
    for j in range(steps):
        logits = np.asarray(forward(jnp.asarray(buf)))
        buf[:, s + j] = logits[:, s + j - 1].argmax(-1)
    return buf


def _check_group(reference, group, batches):
    outs = group.run_parallel(lambda rank, ids: _greedy(rank.forward, ids), batches)
    for ids, tokens in zip(batches, outs):
        padded = np.concatenate([ids, np.zeros((ids.shape[0], 3), ids.dtype)], axis=1)
        logits = np.asarray(group.ranks[0].forward(jnp.asarray(padded)))  # any rank serves any batch
        ref = np.asarray(reference(jnp.asarray(padded)))
        assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-5
        np.testing.assert_array_equal(tokens, _greedy(reference, ids))


def _permuted(g, seed):
    rng = np.random.RandomState(seed)
    base = Placement.from_config(CFG, g)
    return Placement(num_ranks=g, home_le=np.stack([rng.permutation(row) for row in base.home_le]))


def _with_replicas(g):
    base = Placement.from_config(CFG, g)
    replicas = tuple(tuple(((h + 1) % g,) if e % 3 == 0 else () for e, h in enumerate(row))
                     for row in base.home_le.tolist())
    return Placement(num_ranks=g, home_le=base.home_le, replicas=replicas)


@pytest.mark.parametrize(
    "g, placement, depth, staggered",
    [
        (2, "contiguous", 1, True),
        (4, "permuted", 2, True),
        (4, "replicas", 0, False),
        (8, "contiguous", 1, True),
    ],
)
def test_dwdp_matches_single_device(model, reference, g, placement, depth, staggered):
    placements = {"contiguous": None, "permuted": _permuted(g, 1), "replicas": _with_replicas(g)}
    group = DwdpGroup(model, jax.devices()[:g], placements[placement], DwdpConfig(g, depth, staggered))
    _check_group(reference, group, _batches(g))


def test_replicated_dp_matches_and_fetches_nothing(model, reference):
    group = DwdpGroup(model, jax.devices()[:2], replicated_placement(CFG, 2), DwdpConfig(2))
    assert all(not peers for rank in group.ranks for peers in rank.fetch_peers.values())
    _check_group(reference, group, _batches(2))


@pytest.mark.parametrize("g", [2, 4])
def test_dep_matches_single_device(model, reference, g):
    dep = DepModel(model, jax.devices()[:g])
    ids = np.concatenate(_batches(g))
    padded = np.concatenate([ids, np.zeros((ids.shape[0], 3), ids.dtype)], axis=1)
    ref = np.asarray(reference(jnp.asarray(padded)))
    out = np.asarray(dep.forward(jnp.asarray(padded)))
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    np.testing.assert_array_equal(_greedy(dep.forward, ids), _greedy(reference, ids))


def test_no_collective_on_the_dwdp_step_path(model):
    group = DwdpGroup(model, jax.devices()[:4], None, DwdpConfig(4))
    texts = group.ranks[1].compiled_programs(batch=2, seq=5)
    assert len(texts) == CFG.num_layers
    for text in texts:
        assert not [op for op in COLLECTIVES if op in text]
    # The check can fail: DEP's program has its all-to-alls.
    dep_text = DepModel(model, jax.devices()[:4]).lowered_text(jnp.zeros((8, 5), jnp.int32))
    assert "all-to-all" in dep_text


def test_dense_layers_run_in_the_prologue_program():
    """The embedding and the dense layers before the first MoE layer run as one program, then one per MoE layer,
    the last with the LM head: the rank still matches the single-device model (all logits, the last column's,
    given columns'), and a step dispatches exactly `programs_per_step` programs."""
    cfg = TINY.replace(num_layers=4, first_k_dense_replace=2)
    model = init_model(cfg, dtype=jnp.float32, seed=5)
    group = DwdpGroup(model, jax.devices()[:2], None, DwdpConfig(2))
    rank = group.ranks[0]
    assert rank.prologue_layers == [0, 1] and rank.programs_per_step == 3
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 6))
    ref = np.asarray(jitted_forward(model)(jnp.asarray(ids)))
    calls = []

    def counted(f):
        return lambda *a, **k: calls.append(1) or f(*a, **k)

    rank._prologue = {k: counted(f) for k, f in rank._prologue.items()}
    rank._logits = counted(rank._logits)
    for programs in rank._programs:
        for key in list(programs):
            programs[key] = counted(programs[key])
    out = np.asarray(rank.forward(jnp.asarray(ids)))
    assert len(calls) == rank.programs_per_step
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    last = np.asarray(rank.forward(jnp.asarray(ids), last_only=True))
    np.testing.assert_allclose(last, out[:, -1:], rtol=1e-5, atol=1e-5)
    at = np.asarray(rank.forward(jnp.asarray(ids), last_at=np.asarray([2, 5], np.int32)))
    np.testing.assert_allclose(at, out[[0, 1], [2, 5]], rtol=1e-5, atol=1e-5)
    assert len(calls) == 3 * rank.programs_per_step


def test_source_order_is_a_permutation_per_step():
    for g in (2, 4, 8, 16):
        orders = [source_order(r, g) for r in range(g)]
        for step in range(g - 1):
            assert sorted(o[step] for o in orders) == list(range(g))  # no two ranks read one source at once
        same = [source_order(r, g, staggered=False) for r in range(g)]
        assert max(np.bincount([o[0] for o in same])) >= g - 1


def test_a_slow_rank_does_not_slow_the_others(model):
    """Rank 0 gets far more work; the others keep their own pace (steps counted over the same wall window).
    Under a per-layer barrier (DEP) every rank would complete the same number of steps."""
    g = 4
    group = DwdpGroup(model, jax.devices()[:g], None, DwdpConfig(g))
    work = [np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 96))] + _batches(g - 1, b=1, s=4)
    group.run_parallel(lambda rank, ids: rank.forward(jnp.asarray(ids)).block_until_ready(), work)  # compile
    steps = [0] * g
    stop = threading.Event()

    def loop(rank, ids):
        ids = jnp.asarray(ids)
        while not stop.is_set():
            rank.forward(ids).block_until_ready()
            steps[rank.rank] += 1

    timer = threading.Timer(4.0, stop.set)
    timer.start()
    group.run_parallel(loop, work)
    assert steps[0] >= 1
    assert min(steps[1:]) >= 3 * steps[0], steps


def test_memory_per_device_r1():
    from dwdp_jax.config import preset

    r1 = preset("deepseek-r1")
    m4 = memory_per_device(r1, 4, prefetch_depth=1)
    m8 = memory_per_device(r1, 8, prefetch_depth=1)
    one_layer = 256 * r1.expert_bytes(1.0)
    assert abs(one_layer / 1e9 - 11.27) < 0.05  # 256 x 3 x 7168 x 2048 FP8 bytes
    assert abs(m4["local_expert_bytes"] - 58 * one_layer / 4) < 1
    assert abs(m4["staging_bytes"] - 0.75 * one_layer) < 1
    assert m8["total_bytes"] < m4["total_bytes"]
