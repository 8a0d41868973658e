"""DWDP with the prefetch planner on simulated CPU devices: planned (subset) fetches, on-demand misses, the
no-prefetch and merge-copy ablations, against the single-device model on a skewed router."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup
from dwdp_jax.planner import FetchPolicy, Placement, skew
from tests.forward_util import jitted_forward

# The module's tests share the skewed model and the fetch-all run: one xdist worker runs them (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("test_planner_dwdp")

CFG = TINY.replace(num_layers=3, first_k_dense_replace=1)  # 2 MoE layers, 16 experts, 4 per token
G = 4


@pytest.fixture(scope="module")
def model():
    m = init_model(CFG, dtype=jnp.float32, seed=5)
    routers = np.stack([np.asarray(layer.mlp.router[...]) for layer in m.layers if layer.is_moe])
    spec = skew.make_skew(CFG, routers, exponent=1.0, num_tokens=2048, iters=60, seed=0)
    skew.apply_skew(m, spec)
    return m


def _decode_like_batches(steps=4, b=1, s=2):
    """Short batches (few tokens per step: the regime where a rank needs only some remote experts)."""
    rng = np.random.RandomState(0)
    return [[rng.randint(0, CFG.vocab_size, (b, s)).astype(np.int32) for _ in range(G)] for _ in range(steps)]


def _run(model, dwdp, steps):
    group = DwdpGroup(model, jax.devices()[:G], dwdp=dwdp)
    outs = [group.run_parallel(lambda rank, ids: np.asarray(rank.forward(ids)), batch) for batch in steps]
    return group, outs


_FORWARDS = {}  # id(model) -> (model, its jitted forward)


def _reference(model):
    """The single-device model's forward under jit, made once per model: one compile per shape, where eagerly
    each of the file's ~60 reference forwards dispatched its ops one by one."""
    if id(model) not in _FORWARDS:
        _FORWARDS[id(model)] = (model, jitted_forward(model))
    return _FORWARDS[id(model)][1]


def _check_logits(model, steps, outs):
    forward = _reference(model)
    for batch, out in zip(steps, outs):
        for ids, logits in zip(batch, out):
            ref = np.asarray(forward(jnp.asarray(ids)))
            assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-5


def _total(group, key):
    return sum(rank.counters[key] for rank in group.ranks)


def test_skew_is_installed(model):
    counts = np.zeros(CFG.n_routed_experts)
    ids = np.random.RandomState(1).randint(0, CFG.vocab_size, (8, 16))
    group = DwdpGroup(model, jax.devices()[:1], dwdp=DwdpConfig(1))
    stats = []
    group.ranks[0].forward(ids, stats=stats)
    for _, c in stats:
        counts += np.asarray(c)
    share = np.sort(counts / counts.sum())[::-1]
    assert share[0] > 2.0 / CFG.n_routed_experts  # the hottest expert gets > 2x the mean load


@pytest.fixture(scope="module")
def fetch_all_run(model):
    """Planned fetch-all over the decode-like steps: the bytes a policy must beat."""
    steps = _decode_like_batches()
    full, outs = _run(model, DwdpConfig(G, policy=FetchPolicy("fetch_all", experts_per_token=4)), steps)
    _check_logits(model, steps, outs)
    assert _total(full, "miss_experts") == 0
    return steps, full


@pytest.mark.parametrize("policy", [FetchPolicy("top_k", k=2, experts_per_token=4),
                                    FetchPolicy("coverage", coverage=0.6, experts_per_token=4)],
                         ids=["top_k", "coverage"])
def test_planned_fetch_is_exact_and_fetches_less(model, fetch_all_run, policy):
    steps, full = fetch_all_run
    planned, outs = _run(model, DwdpConfig(G, policy=policy), steps)
    _check_logits(model, steps, outs)  # misses are served (fetched on demand), never silently wrong
    fetched = _total(planned, "prefetched_bytes") + _total(planned, "miss_bytes")
    assert fetched < _total(full, "prefetched_bytes")
    assert _total(planned, "miss_experts") <= _total(planned, "routed_remote_experts")
    # every routed remote expert was either prefetched or fetched on demand, and the router stats saw it
    assert planned.ranks[0].router_stats.step == len(steps)


def test_no_prefetch_fetches_exactly_the_routed_experts(model):
    steps = _decode_like_batches(steps=2)
    group, outs = _run(model, DwdpConfig(G, prefetch_depth=0, policy=FetchPolicy("fetch_all")), steps)
    _check_logits(model, steps, outs)
    assert _total(group, "prefetched_experts") == 0
    assert _total(group, "miss_experts") == _total(group, "routed_remote_experts") > 0


def test_staging_budget_caps_the_prefetch(model):
    steps = _decode_like_batches(steps=2)
    group, outs = _run(model, DwdpConfig(G, policy=FetchPolicy("fetch_all"), staging_budget_experts=3), steps)
    _check_logits(model, steps, outs)
    layers_steps = CFG.num_moe_layers * len(steps)
    for rank in group.ranks:
        assert rank.counters["prefetched_experts"] == 3 * layers_steps


def test_merge_copy_ablation_and_replicas(model):
    base = Placement.from_config(CFG, G)
    replicas = tuple(tuple(((home + 1) % G,) if e % 3 == 0 else () for e, home in enumerate(layer))
                     for layer in base.home_le.tolist())
    placement = Placement(num_ranks=G, home_le=base.home_le, replicas=replicas)
    steps = _decode_like_batches(steps=1, s=3)
    for dwdp in (DwdpConfig(G, merge_copy=True),
                 DwdpConfig(G, merge_copy=True, policy=FetchPolicy("top_k", k=1, experts_per_token=4))):
        group = DwdpGroup(model, jax.devices()[:G], placement, dwdp)
        outs = [group.run_parallel(lambda rank, ids: np.asarray(rank.forward(ids)), batch) for batch in steps]
        _check_logits(model, steps, outs)


def test_budget_needs_a_policy():
    with pytest.raises(ValueError, match="staging_budget_experts"):
        DwdpConfig(2, staging_budget_experts=4)
    with pytest.raises(ValueError, match="expert_backend"):
        DwdpConfig(2, expert_backend="cuda")


def test_close_breaks_the_rank_cycle(model):
    import weakref

    group = DwdpGroup(model, jax.devices()[:2], dwdp=DwdpConfig(2))
    ref = weakref.ref(group.ranks[0])
    group.close()
    assert all(rank.group == [] for rank in group.ranks)
    del group
    assert ref() is None  # no cycle left: the rank (and its weights, staging) is freed at once


def test_whole_buffer_steps_feed_the_router_stats_without_waiting(model):
    """Without a policy, each step's router histograms are copied to the host asynchronously and added by a later
    step once ready (a step never blocks on the previous one); `flush_router_stats` adds whatever is left. The
    statistics then hold every step's routed tokens, as the planned path's do."""
    steps = _decode_like_batches(steps=3)
    group, outs = _run(model, DwdpConfig(G), steps)
    _check_logits(model, steps, outs)
    rank = group.ranks[0]
    stats = rank.flush_router_stats()
    assert stats.step == len(steps) and not rank._pending_counts
    tokens = steps[0][0].size  # per step on rank 0
    # every step's histogram decayed once per step since: decay + decay^2 + ... as of the step after the last
    expected = tokens * CFG.num_experts_per_tok * sum(stats.decay ** (j + 1) for j in range(len(steps)))
    for layer in range(CFG.num_moe_layers):
        assert stats.decayed_counts(layer).sum() == pytest.approx(expected, rel=1e-6)
