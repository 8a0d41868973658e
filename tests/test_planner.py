"""Planner: placement, optimizer, router statistics, prefetch policies, source ordering, skew, trace summary."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import preset
from dwdp_jax.planner import (
    FetchPolicy,
    Placement,
    PlacementError,
    RouterStats,
    Trace,
    account,
    hit_probability,
    optimize_placement,
    placement_cost,
    plan_fetch,
    skew,
    source_schedule,
    summarize,
)
from dwdp_jax.routing import expert_histogram, route


def _plan(policy, placement, rank, share, tokens=1, budget=None, layer=0, prefill=False, step=0):
    return plan_fetch(
        policy,
        layer=layer,
        rank=rank,
        placement=placement,
        predicted_share=share,
        tokens_next_step=tokens,
        is_prefill=prefill,
        staging_budget_experts=budget,
        step=step,
    )


# ---------------------------------------------------------------------------------------------------------------
# Placement


def test_contiguous_placement_helpers():
    p = Placement.contiguous(num_layers=2, num_experts=16, num_ranks=4)
    np.testing.assert_array_equal(p.local_experts(1, 2), [8, 9, 10, 11])
    np.testing.assert_array_equal(p.remote_experts(0, 0), np.arange(4, 16))
    assert p.holders(0, 13) == (3,)
    np.testing.assert_array_equal(p.experts_per_rank(), np.full((2, 4), 4))
    np.testing.assert_array_equal(p.memory_bytes(1000), np.full(4, 2 * 4 * 1000))


def test_uneven_and_large_groups():
    p = Placement.contiguous(1, 10, 4)  # 10 experts over 4 ranks: sizes 2, 3, 2, 3
    assert sorted(p.experts_per_rank()[0].tolist()) == [2, 2, 3, 3]
    assert sum(len(p.local_experts(0, r)) for r in range(4)) == 10
    big = Placement.contiguous(1, 288, 72)  # an NVL72-sized group: no G <= 8 assumption anywhere
    assert big.num_ranks == 72 and big.holders(0, 287) == (71,)
    plans = [_plan(FetchPolicy(), big, r, np.ones(288)) for r in range(72)]
    assert source_schedule(plans).peak == 1
    # 256 experts over 72 ranks: blocks of 3 or 4 experts drift apart, so two readers meet at times.
    uneven = Placement.contiguous(1, 256, 72)
    plans = [_plan(FetchPolicy(), uneven, r, np.ones(256)) for r in range(72)]
    assert source_schedule(plans).peak == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_ranks=4, home_le=np.array([[0, 1, 4, 2]])), "home rank 4 not in"),
        (dict(num_ranks=4, home_le=np.array([[0, -1, 2, 3]])), "home rank -1"),
        (dict(num_ranks=4, home_le=np.array([0, 1, 2, 3])), "num_layers, num_experts"),
        (dict(num_ranks=2, home_le=np.array([[0.0, 1.0]])), "integer"),
        (dict(num_ranks=0, home_le=np.array([[0]])), "num_ranks"),
        (dict(num_ranks=2, home_le=np.array([[0, 1]]), replicas=(((0,), ()),)), "replica on its home"),
        (dict(num_ranks=3, home_le=np.array([[0, 1]]), replicas=(((1, 1), ()),)), "duplicate"),
        (dict(num_ranks=2, home_le=np.array([[0, 1]]), replicas=(((5,), ()),)), "replica rank 5"),
        (dict(num_ranks=2, home_le=np.array([[0, 1]]), replicas=(((1,),),)), "lists 1 experts"),
        (dict(num_ranks=2, home_le=np.array([[0, 0, 1]]), max_experts_per_rank=1), "rank 0: holds 2"),
    ],
)
def test_placement_validation_errors(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        Placement(**kwargs)


def test_placement_queries_validate_and_contiguous_rejects_empty_rank():
    p = Placement.contiguous(1, 8, 2)
    with pytest.raises(PlacementError, match="rank 2"):
        p.local_experts(0, 2)
    with pytest.raises(PlacementError, match="layer 1"):
        p.remote_experts(1, 0)
    with pytest.raises(PlacementError, match="exceeds num_experts"):
        Placement.contiguous(1, 4, 8)


def test_placement_replicas_and_json_round_trip(tmp_path):
    home = np.array([[0, 0, 1, 1], [1, 0, 1, 0]])
    p = Placement(num_ranks=3, home_le=home, replicas=(((2,), (), (0, 2), ()), ((), (), (), (2,))))
    assert p.holders(0, 2) == (1, 0, 2)
    np.testing.assert_array_equal(p.local_experts(0, 2), [0, 2])
    np.testing.assert_array_equal(p.remote_experts(0, 0), [3])
    np.testing.assert_array_equal(p.experts_per_rank(), [[3, 2, 2], [2, 2, 1]])
    p.save(tmp_path / "p.json")
    q = Placement.load(tmp_path / "p.json")
    assert q == p and q.holders(1, 3) == (0, 2)
    bad = p.to_json_dict()
    del bad["home"]
    with pytest.raises(PlacementError, match="missing field 'home'"):
        Placement.from_json_dict(bad)


def _skewed_load(num_layers, num_ranks, num_experts, seed):
    """Each rank uses its own random hot set heavily (rank-dependent traffic)."""
    rng = np.random.default_rng(seed)
    load = rng.uniform(0.0, 0.2, (num_layers, num_ranks, num_experts))
    for l in range(num_layers):
        owner = rng.permutation(np.arange(num_experts) % num_ranks)
        load[l, owner, np.arange(num_experts)] += rng.uniform(2.0, 4.0, num_experts)
    return load


def test_optimizer_beats_contiguous_on_skewed_load():
    load = _skewed_load(2, 4, 32, seed=0)
    contiguous = Placement.contiguous(2, 32, 4)
    opt = optimize_placement(load, 4)
    base, new = placement_cost(contiguous, load), placement_cost(opt, load)
    assert new.objective < 0.5 * base.objective
    assert new.remote < 0.5 * base.remote
    np.testing.assert_array_equal(opt.experts_per_rank(), np.full((2, 4), 8))  # equal counts, no replicas
    # The planted owner of each expert should be where it lives.
    owner = load.argmax(1)
    assert (opt.home_le == owner).mean() > 0.9


@pytest.mark.parametrize("seed", range(4))
def test_optimizer_never_worse_than_contiguous(seed):
    rng = np.random.default_rng(seed)
    load = rng.gamma(0.5, size=(1, 4, 24)) if seed % 2 else np.ones((1, 4, 24))
    base = placement_cost(Placement.contiguous(1, 24, 4), load).objective
    assert placement_cost(optimize_placement(load, 4), load).objective <= base + 1e-9


def test_optimizer_replicas_respect_budget_and_cut_remote():
    load = _skewed_load(1, 4, 32, seed=1)
    plain = optimize_placement(load, 4)
    rep = optimize_placement(load, 4, replica_budget=2)
    np.testing.assert_array_equal(rep.experts_per_rank(), np.full((1, 4), 10))
    assert rep.max_experts_per_rank == 10
    assert placement_cost(rep, load).remote < placement_cost(plain, load).remote
    with pytest.raises(PlacementError, match="replica_budget"):
        optimize_placement(load, 4, replica_budget=100)
    with pytest.raises(PlacementError, match="load must be"):
        optimize_placement(load[:, :3], 4)


# ---------------------------------------------------------------------------------------------------------------
# Router statistics


def test_stats_decay_arithmetic():
    s = RouterStats(rank=3, num_layers=2, num_experts=4, decay=0.5, prior_count=0.0)
    a, b, c = np.array([4, 0, 0, 0]), np.array([0, 2, 0, 0]), np.array([0, 0, 1, 1])
    s.update(0, a)
    s.update(0, c)  # same step: adds, no decay
    s.next_step()
    s.update(0, b)
    np.testing.assert_allclose(s.decayed_counts(0), 0.5 * (a + c) + b)
    s.next_step()
    s.next_step()  # layer 0 not updated for two steps
    np.testing.assert_allclose(s.decayed_counts(0), 0.25 * (0.5 * (a + c) + b))
    s.update(0, a)
    np.testing.assert_allclose(s.decayed_counts(0), 0.25 * (0.5 * (a + c) + b) + a)
    expected = 0.25 * (0.5 * (a + c) + b) + a
    np.testing.assert_allclose(s.predicted_share(0), expected / expected.sum())
    np.testing.assert_allclose(s.predicted_share(1), np.full(4, 0.25))  # no data: uniform


def test_stats_prior_and_errors():
    s = RouterStats(0, 1, 4, decay=1.0, prior_count=1.0)
    s.update(0, np.array([6, 0, 0, 0]))
    np.testing.assert_allclose(s.predicted_share(0), [0.7, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="shape"):
        s.update(0, np.ones(5))
    with pytest.raises(ValueError, match="layer 1"):
        s.update(1, np.ones(4))
    with pytest.raises(ValueError, match="decay"):
        RouterStats(0, 1, 4, decay=0.0)


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for rank in range(2):
        s = RouterStats(rank, num_layers=3, num_experts=8, decay=0.8)
        for _ in range(4):
            for layer in range(3):
                s.update(layer, rng.integers(0, 10, 8))
            s.next_step()
        path = tmp_path / f"rank{rank}.npz"
        s.save(path)
        paths.append(path)
        t = RouterStats.load(path)
        assert (t.rank, t.step, t.decay, t.prior_count) == (s.rank, s.step, s.decay, s.prior_count)
        for layer in range(3):
            np.testing.assert_allclose(t.predicted_share(layer), s.predicted_share(layer))
        for field in ("rank", "step", "layer", "counts"):
            np.testing.assert_array_equal(getattr(t.trace, field), getattr(s.trace, field))
    trace = Trace.load(paths)
    assert trace.num_records == 24 and trace.num_ranks == 2 and trace.num_layers == 3
    load = trace.load_lge()
    assert load.shape == (3, 2, 8) and load.sum() == trace.counts.sum()
    freq = trace.use_frequency_lge()
    np.testing.assert_allclose(freq, (trace.counts > 0).reshape(2, 4, 3, 8).mean(1).transpose(1, 0, 2))


# ---------------------------------------------------------------------------------------------------------------
# Prefetch policies


def _zipf_share(num_experts, seed=0, s=1.0):
    return skew.zipf_shares(num_experts, s, permutation=np.random.default_rng(seed).permutation(num_experts))


def test_fetch_all_rotated_order_and_sources():
    p = Placement.contiguous(1, 16, 4)
    plan = _plan(FetchPolicy(), p, rank=1, share=_zipf_share(16))
    # Rank 1 reads rank 2's experts, then rank 3's, then rank 0's.
    assert plan.sources == (2,) * 4 + (3,) * 4 + (0,) * 4
    assert set(plan.experts) == set(range(16)) - {4, 5, 6, 7}
    assert plan.remote == frozenset(plan.experts)
    assert [plan.source_of[e] for e in range(4, 8)] == [-1] * 4


def test_top_k_decode_picks_hottest_remote_experts():
    p = Placement.contiguous(1, 64, 4)
    share = _zipf_share(64)
    policy = FetchPolicy("top_k", k=5, experts_per_token=2, smoothing=0.0)
    plan = _plan(policy, p, rank=0, share=share, tokens=1)
    remote = p.remote_experts(0, 0)
    hottest = remote[np.argsort(-share[remote], kind="stable")[:5]]
    assert set(plan.experts) == set(hottest.tolist())
    # Many tokens: the expected number of distinct experts hit reaches every remote expert.
    prefill = _plan(policy, p, rank=0, share=share, tokens=100_000, prefill=True)
    assert set(prefill.experts) == set(remote.tolist())


def test_coverage_is_minimal_and_tends_to_fetch_all():
    p = Placement.contiguous(1, 64, 4)
    share = _zipf_share(64)
    policy = FetchPolicy("coverage", coverage=0.8, experts_per_token=4, smoothing=0.0)
    plan = _plan(policy, p, rank=2, share=share, tokens=1)
    h = hit_probability(share, 1, 4)
    remote = p.remote_experts(0, 2)
    covered = h[list(plan.experts)].sum() / h[remote].sum()
    assert covered >= 0.8
    without_least = sorted(plan.experts, key=lambda e: h[e])[1:]
    assert h[without_least].sum() / h[remote].sum() < 0.8
    assert len(plan.experts) < len(remote)
    big = _plan(policy, p, rank=2, share=share, tokens=1_000_000)
    assert len(big.experts) >= 0.8 * len(remote)
    full = _plan(FetchPolicy("coverage", coverage=1.0, experts_per_token=4), p, rank=2, share=share, tokens=1)
    assert set(full.experts) == set(remote.tolist())


@pytest.mark.parametrize("kind", ["fetch_all", "top_k", "coverage"])
def test_policies_respect_staging_budget(kind):
    p = Placement.contiguous(1, 32, 4)
    share = _zipf_share(32, seed=3)
    policy = FetchPolicy(kind, k=20, coverage=0.99, experts_per_token=4)
    plan = _plan(policy, p, rank=3, share=share, tokens=64, budget=6)
    assert len(plan.fetches) == 6
    unlimited = _plan(policy, p, rank=3, share=share, tokens=64, budget=None)
    assert len(plan.dropped_by_budget) == len(unlimited.fetches) - 6
    h = hit_probability(0.99 * share / share.sum() + 0.01 / 32, 64, 4)
    assert min(h[list(plan.experts)]) >= max(h[list(plan.dropped_by_budget)])  # the least needed are dropped
    assert _plan(policy, p, rank=3, share=share, tokens=64, budget=0).fetches == ()


def test_plans_are_deterministic_and_step_independent():
    p = Placement.contiguous(2, 32, 4)
    share = _zipf_share(32, seed=5)
    policy = FetchPolicy("coverage", coverage=0.9)
    a = _plan(policy, p, rank=1, share=share, tokens=8, layer=1, step=3)
    b = _plan(policy, p, rank=1, share=share.copy(), tokens=8, layer=1, step=3)
    c = _plan(policy, p, rank=1, share=share, tokens=8, layer=1, step=99)
    assert a == b
    assert a.fetches == c.fetches and c.step == 99


def test_prefill_fetch_all_override_and_top_k_floor():
    p = Placement.contiguous(1, 16, 2)
    policy = FetchPolicy("top_k", k=1, experts_per_token=1, prefill_fetch_all=True)
    assert len(_plan(policy, p, 0, np.ones(16), prefill=True).fetches) == 8
    assert len(_plan(policy, p, 0, np.ones(16), prefill=False).fetches) == 1  # expects 0.5 remote experts
    # k is a floor: 8 experts per token over 16 uniform experts needs 4 remote experts on average.
    plan = _plan(FetchPolicy("top_k", k=1, experts_per_token=8), p, 0, np.ones(16))
    assert plan.expected_needed == pytest.approx(4.0) and len(plan.fetches) == 4


def test_account_hits_misses_bytes():
    p = Placement.contiguous(1, 16, 4)
    share = np.zeros(16)
    share[[8, 9, 12]] = 1.0
    plan = _plan(FetchPolicy("top_k", k=3, experts_per_token=1, smoothing=0.0), p, rank=0, share=share)
    assert set(plan.experts) == {8, 9, 12}
    routed = np.array([[0, 8], [9, 13], [1, 15]])  # expert_ids [T, k]; 0 and 1 are local to rank 0
    acc = account(plan, routed, bytes_per_expert=100)
    hits, misses, fetched = acc
    assert hits == (8, 9) and misses == (13, 15) and fetched == 300
    assert acc.miss_rate == 0.5
    assert plan.source_of[13] == 3 and plan.source_of[15] == 3  # where the executor pulls the misses
    assert account(plan, np.array([0, 1, 2])).miss_rate == 0.0
    with pytest.raises(ValueError, match="not in"):
        account(plan, [16])


def test_replica_sources_spread_and_stay_valid():
    # Every expert homed on rank 0 with replicas on 1 and 2; rank 3 must choose among three holders.
    num_experts = 24
    home = np.zeros((1, num_experts), np.int64)
    p = Placement(num_ranks=4, home_le=home, replicas=(tuple((1, 2) for _ in range(num_experts)),))
    share = np.ones(num_experts)
    for choice in ("least_loaded", "hash"):
        plan = _plan(FetchPolicy(source_choice=choice), p, rank=3, share=share)
        assert all(s in p.holders(0, e) for e, s in plan.fetches)
        counts = np.bincount(plan.sources, minlength=4)[:3]
        assert counts.min() >= (4 if choice == "hash" else 8), counts
        assert plan == _plan(FetchPolicy(source_choice=choice), p, rank=3, share=share)
    # Rank 1 holds everything it needs: nothing remote.
    assert _plan(FetchPolicy(), p, rank=1, share=share).fetches == ()


@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16])
def test_source_schedule_rotated_vs_naive(num_ranks):
    p = Placement.contiguous(1, 4 * num_ranks, num_ranks)
    share = np.ones(4 * num_ranks)
    for order, peak in (("rotated", 1), ("interleaved", 1), ("naive", num_ranks - 1)):
        plans = [_plan(FetchPolicy(source_order=order), p, r, share) for r in range(num_ranks)]
        sched = source_schedule(plans)
        assert sched.peak == peak, order
        assert source_schedule(plans, granularity="source").peak == peak
        np.testing.assert_array_equal(sched.served_per_source, np.full(num_ranks, 4 * (num_ranks - 1)))
    naive = source_schedule([_plan(FetchPolicy(source_order="naive"), p, r, share) for r in range(num_ranks)])
    assert naive.max_readers_per_slot[0] == num_ranks - 1


# ---------------------------------------------------------------------------------------------------------------
# Skew


def test_zipf_shares_capped_and_permuted():
    perm = np.random.default_rng(0).permutation(256)
    p = skew.zipf_shares(256, 1.0, max_share=1 / 8, permutation=perm)
    assert abs(p.sum() - 1) < 1e-12 and p.max() <= 1 / 8 + 1e-12
    assert p[perm[0]] == p.max() and p[perm[0]] >= p[perm[1]] >= p[perm[2]]
    np.testing.assert_allclose(skew.zipf_shares(10, 0.0), np.full(10, 0.1))
    with pytest.raises(ValueError, match="cannot hold"):
        skew.cap_shares(np.ones(4), 0.2)


@pytest.mark.parametrize(
    "cfg",
    [
        preset("tiny"),
        preset("tiny").replace(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=6),
    ],
    ids=["tiny-16", "64-experts"],
)
def test_skew_calibration_matches_zipf(cfg):
    rng = np.random.default_rng(0)
    routers = rng.standard_normal((cfg.num_moe_layers, cfg.hidden_size, cfg.n_routed_experts)) * 0.02
    spec = skew.make_skew(cfg, routers, num_tokens=4096, iters=100, seed=0)
    assert spec.bias_le.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert spec.max_total_variation < 0.1, spec.max_total_variation
    # The real thing: fresh hidden states through the scaled router and `route`, group-limited top-k included.
    x = rng.standard_normal((4096, cfg.hidden_size)).astype(np.float32)
    for layer in range(cfg.num_moe_layers):
        w = jnp.asarray(routers[layer] * spec.router_scale_l[layer], jnp.float32)
        ids, _ = jax.jit(route, static_argnums=3)(jnp.asarray(x), w, jnp.asarray(spec.bias_le[layer]), cfg)
        share = np.asarray(expert_histogram(ids, cfg.n_routed_experts)) / ids.size
        assert skew.total_variation(share, spec.target_le[layer]) < 0.1
    # Different hot experts per layer, and a clearly skewed (not uniform) load.
    assert not np.array_equal(np.argsort(spec.target_le[0]), np.argsort(spec.target_le[1]))
    uniform = np.full(cfg.n_routed_experts, 1.0 / cfg.n_routed_experts)
    assert skew.total_variation(spec.achieved_le[0], uniform) > 0.1


def test_skew_per_rank_and_save_load(tmp_path):
    cfg = preset("tiny")
    spec = skew.make_skew(cfg, num_ranks=2, rank_mix=0.7, num_tokens=2048, iters=80, seed=1)
    assert spec.bias_le.shape == (2, cfg.num_moe_layers, cfg.n_routed_experts)
    assert spec.max_total_variation < 0.1
    assert skew.total_variation(spec.target_le[0, 0], spec.target_le[1, 0]) > 0.05
    spec.save(tmp_path / "skew.npz")
    back = skew.SkewSpec.load(tmp_path / "skew.npz")
    np.testing.assert_array_equal(back.bias_le, spec.bias_le)
    assert back.exponent == spec.exponent


# ---------------------------------------------------------------------------------------------------------------
# Summarize


def _small_trace(tmp_path):
    stats = RouterStats(rank=0, num_layers=2, num_experts=8)
    other = RouterStats(rank=1, num_layers=2, num_experts=8)
    for _ in range(3):
        stats.update(0, np.full(8, 5))  # uniform
        stats.update(1, np.array([40, 0, 0, 0, 0, 0, 0, 0]))  # all on expert 0
        other.update(0, np.full(8, 5))
        other.update(1, np.array([0, 0, 0, 10, 0, 0, 0, 0]))
        stats.next_step()
        other.next_step()
    paths = [tmp_path / "r0.npz", tmp_path / "r1.npz"]
    stats.save(paths[0])
    other.save(paths[1])
    return paths


def test_summarize_statistics_and_cli(tmp_path, capsys):
    paths = _small_trace(tmp_path)
    summary = summarize.summarize(Trace.load(paths))
    uniform, hot = summary.layers
    assert uniform.entropy_frac == pytest.approx(1.0) and uniform.cv == pytest.approx(0.0)
    assert uniform.max_over_mean == pytest.approx(1.0)
    assert hot.hot[0] == (0, pytest.approx(0.8)) and hot.hot[1] == (3, pytest.approx(0.2))
    assert hot.max_over_mean == pytest.approx(0.8 * 8)
    p = np.array([0.8, 0.2])
    assert hot.entropy_bits == pytest.approx(-(p * np.log2(p)).sum())
    assert summary.num_steps == 3
    r0, r1 = summary.ranks
    assert (r0.routed, r1.routed) == (3 * 80, 3 * 50)
    assert r0.max_over_mean == pytest.approx((1.0 + 8.0) / 2)
    assert summary.rank_imbalance == pytest.approx(240 / 195)

    png, js = tmp_path / "heat.png", tmp_path / "s.json"
    assert summarize.main([str(paths[0]), str(paths[1]), "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "entropy_bits" in out and "0(0.800)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(js.read_text())["layers"][1]["hot"][0][0] == 0


def test_stats_update_layers_equals_one_update_per_layer():
    """A step's stacked histograms added at once give the statistics and trace of one update per layer."""
    rng = np.random.default_rng(4)
    one, many = (RouterStats(1, 3, 6, decay=0.7) for _ in range(2))
    for step in range(3):
        counts = rng.integers(0, 9, (2, 6))
        layers = [2, 0] if step % 2 else [0, 1]
        for layer, row in zip(layers, counts):
            one.update(layer, row)
        many.update_layers(layers, counts)
        one.next_step()
        many.next_step()
    for layer in range(3):
        np.testing.assert_allclose(many.decayed_counts(layer), one.decayed_counts(layer))
    for field in ("step", "layer", "counts"):
        np.testing.assert_array_equal(getattr(many.trace, field), getattr(one.trace, field))
    with pytest.raises(ValueError, match="distinct"):
        many.update_layers([1, 1], np.ones((2, 6)))
    with pytest.raises(ValueError, match="layer 3"):
        many.update_layers([3], np.ones((1, 6)))
    with pytest.raises(ValueError, match="shape"):
        many.update_layers([0, 1], np.ones((1, 6)))
