"""Host-side engine: workloads and traces, the per-rank scheduler and its driving loop, sampling, metrics."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.engine import metrics, sampling
from dwdp_jax.engine.scheduler import PENDING, FakeClock, Scheduler, SchedulerConfig, StepPlan, run_engine
from dwdp_jax.engine.workload import (
    FixedLength,
    LognormalLength,
    RankSplit,
    Request,
    RequestError,
    WorkloadSpec,
    apportion,
    generate,
    load_trace,
    save_trace,
    split_by_rank,
    validate_request,
)


def req(rid, prompt_len, max_new, arrival_s=0.0, rank=None):
    return Request(rid, np.arange(prompt_len) % 97, max_new, arrival_s, rank)


# ---------------------------------------------------------------------------------------------------------------
# Workloads


def test_generate_is_reproducible_and_seed_dependent():
    spec = WorkloadSpec(50, LognormalLength(300, 0.5, 10, 2000), LognormalLength(50, 0.5, 1, 200),
                        vocab_size=1000, split=RankSplit(4, "dirichlet", alpha=0.5), arrival_rate_rps=5.0, seed=7)
    a, b = generate(spec), generate(spec)
    assert a == b
    c = generate(dataclasses.replace(spec, seed=8))
    assert [r.prompt_len for r in a] != [r.prompt_len for r in c]
    assert not np.array_equal(a[0].prompt, c[0].prompt)
    assert all(r.prompt.dtype == np.int32 and 0 <= r.prompt.min() and r.prompt.max() < 1000 for r in a)


def test_trace_round_trip_is_exact(tmp_path):
    reqs = generate(WorkloadSpec(20, LognormalLength(100, 1.0, 1, 500), FixedLength(8), vocab_size=50000,
                                 split=RankSplit(2, "hot", factor=3.0), arrival_rate_rps=3.0, seed=1))
    explicit = Request("hand", [5, 4, 3], 2, arrival_s=0.1 + 0.2, rank=1)
    # its source no longer matches its prompt:
    tampered = dataclasses.replace(reqs[0], request_id="tampered", prompt=reqs[0].prompt[::-1])
    reqs += [explicit, tampered]
    path = tmp_path / "trace.jsonl"
    save_trace(path, reqs)
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert len(lines) == len(reqs)
    assert "prompt" not in lines[0] and "prompt_seed" in lines[0]  # synthetic prompts stored as a seed
    assert lines[-2]["prompt"] == [5, 4, 3] and lines[-1]["prompt"] == reqs[0].prompt[::-1].tolist()
    # tokens and float arrival times exact; a stale source is dropped
    assert load_trace(path) == reqs[:-1] + [dataclasses.replace(tampered, source=None)]


def test_paper_lengths_are_fixed():
    reqs = generate(WorkloadSpec(4, vocab_size=129280))
    assert [(r.prompt_len, r.max_new_tokens, r.arrival_s, r.rank) for r in reqs] == [(8192, 1024, 0.0, None)] * 4


def test_lognormal_median_and_clipping():
    rng = np.random.default_rng(0)
    lens = LognormalLength(median=1000, sigma=0.8, min_len=100, max_len=4000).sample(rng, 20000)
    assert abs(np.median(lens) / 1000 - 1) < 0.03
    assert lens.min() == 100 and lens.max() == 4000  # sigma 0.8 reaches both clips in 20k draws
    log_std = np.std(np.log(lens[(lens > 100) & (lens < 4000)]))
    assert 0.6 < log_std < 0.8  # the clipped tails shrink it a little


def test_hot_rank_gets_factor_times_the_tokens():
    base = WorkloadSpec(600, FixedLength(100), FixedLength(10), vocab_size=100, seed=3)
    by_requests = generate(dataclasses.replace(base, split=RankSplit(4, "hot", factor=3.0, hot_rank=2)))
    tokens = [sum(r.prompt_len for r in rs) for rs in split_by_rank(by_requests, 4)]
    assert tokens == [10000, 10000, 30000, 10000]
    assert [r.rank for r in by_requests[:12]] != sorted(r.rank for r in by_requests[:12])  # ranks interleaved

    by_length = generate(dataclasses.replace(base, split=RankSplit(4, "hot", mode="length", factor=2.0)))
    per_rank = split_by_rank(by_length, 4)
    assert [len(rs) for rs in per_rank] == [150] * 4
    assert {r.prompt_len for r in per_rank[0]} == {200} and {r.prompt_len for r in per_rank[1]} == {100}
    assert {r.max_new_tokens for r in by_length} == {10}


def test_dirichlet_and_zipf_loads():
    rng = np.random.default_rng(0)
    zipf = RankSplit(4, "zipf", zipf_s=1.0).loads(rng)
    np.testing.assert_allclose(zipf / zipf[0], [1, 1 / 2, 1 / 3, 1 / 4])
    dirichlet = RankSplit(8, "dirichlet", alpha=0.3).loads(rng)
    assert dirichlet.shape == (8,) and abs(dirichlet.mean() - 1) < 1e-12 and dirichlet.std() > 0.3
    assert apportion(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]
    assert apportion(7, np.array([0.5, 0.25, 0.25])).tolist() == [3, 2, 2]  # exact 3.5, 1.75, 1.75


def test_poisson_arrivals():
    reqs = generate(WorkloadSpec(4000, FixedLength(4), FixedLength(2), vocab_size=10, arrival_rate_rps=20.0))
    t = np.array([r.arrival_s for r in reqs])
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps > 0).all()
    assert abs(gaps.mean() / 0.05 - 1) < 0.05 and abs(gaps.std() / 0.05 - 1) < 0.07  # exponential: std == mean


def test_validate_request_errors():
    validate_request(req("ok", 10, 6), max_seq_len=16)
    cases = [
        (Request("empty", [], 4), "empty prompt"),
        (req("long", 10, 7), "exceeds the cache slot"),
        (req("zero", 10, 0), "max_new_tokens must be > 0"),
        (req("neg", 10, -3), "max_new_tokens must be > 0"),
        (req("late", 4, 4, arrival_s=-1.0), "arrival_s"),
    ]
    for bad, message in cases:
        with pytest.raises(RequestError, match=message):
            validate_request(bad, max_seq_len=16)
    with pytest.raises(RequestError, match="outside vocab"):
        validate_request(Request("vocab", [1, 50], 2), max_seq_len=16, vocab_size=50)
    with pytest.raises(RequestError, match="1-D"):
        Request("2d", np.zeros((2, 2), np.int32), 2)


# ---------------------------------------------------------------------------------------------------------------
# Scheduler


class FakeModel:
    """A step function that checks the plan contract against per-slot token caches and returns a token that
    depends only on (request, position), so outputs are known in advance. Advances the clock per step."""

    def __init__(self, config: SchedulerConfig, clock: FakeClock, s_per_token: float = 1e-4):
        self.config, self.clock, self.s_per_token = config, clock, s_per_token
        self.cache = {}  # slot -> (request_id, tokens)
        self.plans: list[StepPlan] = []

    @staticmethod
    def token(request_id: str, position: int) -> int:
        return (sum(map(ord, request_id)) * 31 + 7 * position) % 1000 + 1

    def __call__(self, plan: StepPlan) -> dict:
        self.plans.append(plan)
        assert 0 < plan.num_tokens <= self.config.token_budget
        slots = [c.slot for c in plan.prefill] + [d.slot for d in plan.decode]
        assert len(slots) == len(set(slots)) <= self.config.max_batch_size
        out = {}
        for c in plan.prefill:
            if c.start == 0:
                self.cache[c.slot] = (c.request_id, [])
            rid, toks = self.cache[c.slot]
            assert rid == c.request_id and len(toks) == c.start
            toks.extend(c.tokens.tolist())
            out[c.request_id] = self.token(rid, len(toks)) if c.is_last else None
        for d in plan.decode:
            rid, toks = self.cache[d.slot]
            assert rid == d.request_id and len(toks) == d.position
            toks.append(d.token)
            assert len(toks) <= self.config.max_seq_len
            out[rid] = self.token(rid, len(toks))
        self.clock.advance(1e-3 + self.s_per_token * plan.num_tokens)
        return out


def expected_output(r: Request) -> tuple[int, ...]:
    return tuple(FakeModel.token(r.request_id, r.prompt_len + i) for i in range(r.max_new_tokens))


def test_admission_is_fcfs_by_arrival():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_seq_len=64, token_budget=32))
    s.submit(req("late", 4, 2, arrival_s=5.0))
    s.submit(req("b", 4, 2, arrival_s=1.0))
    s.submit(req("a", 4, 2, arrival_s=0.5))
    s.submit(req("c", 4, 2, arrival_s=1.0))
    assert s.schedule(now_s=0.0).is_empty and s.next_arrival_s() == 0.5
    plan = s.schedule(now_s=2.0)
    assert [c.request_id for c in plan.prefill] == ["a", "b"]  # c arrived too but no slot; late has not arrived
    assert [c.slot for c in plan.prefill] == [0, 1] and s.num_waiting == 2 and s.num_free_slots == 0


def test_chunked_prefill_obeys_token_budget():
    cfg = SchedulerConfig(max_batch_size=4, max_seq_len=64, token_budget=16)
    s = Scheduler(cfg)
    s.submit(req("a", 40, 3))
    s.submit(req("b", 20, 3))
    chunks = []
    for step in range(3):
        plan = s.schedule(now_s=float(step))
        assert plan.num_tokens <= 16
        chunks.append([(c.request_id, c.slot, c.start, len(c.tokens), c.is_last) for c in plan.prefill])
        s.complete_step(plan, {c.request_id: 9 for c in plan.prefill if c.is_last}, now_s=step + 0.5)
    assert chunks[0] == [("a", 0, 0, 16, False)]
    assert chunks[1] == [("a", 0, 16, 16, False)]
    assert chunks[2] == [("a", 0, 32, 8, True), ("b", 1, 0, 8, False)]  # the rest of the budget admits b
    np.testing.assert_array_equal(plan.prefill[0].tokens, np.arange(32, 40))


def test_decode_before_prefill():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_seq_len=128, token_budget=10))
    s.submit(req("run1", 3, 5))
    s.submit(req("run2", 3, 5))
    plan = s.schedule(0.0)
    s.complete_step(plan, {"run1": 11, "run2": 12}, 0.1)
    s.submit(req("new", 100, 5))
    plan = s.schedule(0.2)
    assert [(d.request_id, d.token, d.position) for d in plan.decode] == [("run1", 11, 3), ("run2", 12, 3)]
    assert [(c.request_id, len(c.tokens)) for c in plan.prefill] == [("new", 8)]  # 10 - 2 decode tokens
    np.testing.assert_array_equal(plan.decode_arrays()[0], [0, 1])


def test_retirement_at_max_new_tokens_and_slot_reuse():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_seq_len=16, token_budget=8))
    s.submit(req("a", 4, 3))
    s.submit(req("b", 5, 1))
    slots_and_starts = []
    t = 0.0
    while not s.idle:
        plan = s.schedule(t)
        slots_and_starts += [(c.request_id, c.slot, c.start) for c in plan.prefill]
        assert plan.num_tokens and len(plan.prefill) + len(plan.decode) == 1  # one slot: one request at a time
        t += 1.0
        s.complete_step(plan, {c.request_id: 1 for c in plan.prefill} | {d.request_id: 2 for d in plan.decode}, t)
    assert slots_and_starts == [("a", 0, 0), ("b", 0, 0)]  # b reuses a's slot from position 0
    a, b = s.finished
    assert (a.request_id, a.output_tokens, a.token_times_s) == ("a", (1, 2, 2), (1.0, 2.0, 3.0))
    assert a.finish_reason == "length"
    assert (b.request_id, b.output_tokens, b.admitted_s, b.first_token_s) == ("b", (1,), 3.0, 4.0)


def test_eos_finishes_early_and_frees_slot():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_seq_len=32, token_budget=8, eos_id=0))
    s.submit(req("a", 4, 10))
    s.submit(req("b", 4, 1))
    s.complete_step(s.schedule(0.0), {"a": 5}, 1.0)
    assert s.complete_step(s.schedule(1.0), {"a": 0}, 2.0)[0].finish_reason == "eos"
    assert s.finished[0].output_tokens == (5, 0) and s.num_free_slots == 1
    assert [c.request_id for c in s.schedule(2.0).prefill] == ["b"]


def test_plan_contract_errors():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_seq_len=32, token_budget=8))
    s.submit(req("a", 4, 3))
    plan = s.schedule(0.0)
    with pytest.raises(RuntimeError, match="in flight"):
        s.schedule(0.0)
    with pytest.raises(ValueError, match="no token"):
        s.complete_step(plan, {"a": None}, 1.0)
    with pytest.raises(ValueError, match="not in the plan"):
        s.complete_step(plan, {"a": 1, "zzz": 2}, 1.0)
    s.complete_step(plan, {"a": 1}, 1.0)  # the failed calls changed nothing
    assert s.schedule(1.0).decode[0].position == 4
    with pytest.raises(ValueError, match="token_budget"):
        SchedulerConfig(max_batch_size=8, max_seq_len=32, token_budget=4)


def test_bad_requests_are_rejected_without_disturbing_others():
    cfg = SchedulerConfig(max_batch_size=3, max_seq_len=64, token_budget=16, vocab_size=100)
    good = [req(f"g{i}", 10 + 3 * i, 4 + i, arrival_s=0.01 * i) for i in range(5)]

    def serve(with_bad: bool):
        clock = FakeClock()
        s = Scheduler(cfg, rank=1)
        for i, r in enumerate(good):
            s.submit(r)
            if with_bad and i == 2:
                for bad, message in [
                    (Request("empty", [], 4), "empty"),
                    (req("huge", 60, 10), "exceeds"),
                    (req("nonpos", 4, 0), "max_new_tokens"),
                    (Request("vocab", [3, 100], 2), "vocab"),
                    (req("g0", 4, 2), "duplicate"),
                    (req("wrong_rank", 4, 2, rank=0), "rank 0"),
                ]:
                    with pytest.raises(RequestError, match=message):
                        s.submit(bad)
                assert s.num_waiting == 3
        run = run_engine(s, FakeModel(cfg, clock), clock, sleep=clock.sleep)
        return s.finished, run

    clean, clean_run = serve(False)
    dirty, dirty_run = serve(True)
    assert clean == dirty and clean_run == dirty_run
    assert sorted(f.request_id for f in dirty) == [r.request_id for r in good]


def test_full_run_with_fake_model_finishes_every_request_exactly():
    cfg = SchedulerConfig(max_batch_size=6, max_seq_len=512, token_budget=64)
    reqs = generate(WorkloadSpec(40, LognormalLength(120, 0.7, 4, 400), LognormalLength(20, 0.7, 1, 100),
                                 vocab_size=1000, arrival_rate_rps=200.0, seed=11))
    clock = FakeClock()
    s = Scheduler(cfg)
    model = FakeModel(cfg, clock)
    run = run_engine(s, model, clock, requests=reqs + [Request("bad", [], 3)], sleep=clock.sleep)
    assert s.idle and run.rejected[0][0] == "bad" and "empty prompt" in run.rejected[0][1]
    assert len(s.finished) == len(reqs)
    by_id = {f.request_id: f for f in s.finished}
    for r in reqs:
        f = by_id[r.request_id]
        assert f.output_tokens == expected_output(r) and f.num_output_tokens == r.max_new_tokens
        assert r.arrival_s <= f.admitted_s < f.first_token_s <= f.last_token_s
        assert list(f.token_times_s) == sorted(f.token_times_s)
    assert max(len(p.prefill) + len(p.decode) for p in model.plans) == cfg.max_batch_size
    assert sum(p.num_tokens for p in model.plans) == sum(r.prompt_len + r.max_new_tokens - 1 for r in reqs)
    assert [st.num_tokens for st in run.steps] == [p.num_tokens for p in model.plans]
    assert run.steps[-1].end_s == run.end_s and run.wall_s > reqs[-1].arrival_s

    summary = metrics.summarize_run(s.finished, run.wall_s, num_gpus=1)
    assert summary.output_tokens == sum(r.max_new_tokens for r in reqs)
    assert summary.ttft_median_s > 0 and summary.tpot_median_s > 0


def test_closed_loop_concurrency():
    cfg = SchedulerConfig(max_batch_size=8, max_seq_len=64, token_budget=32)
    clock = FakeClock()
    s = Scheduler(cfg)
    in_system = []

    def step(plan):
        in_system.append(s.num_waiting + s.num_running)
        return model(plan)

    model = FakeModel(cfg, clock)
    reqs = [req(f"r{i}", 5 + i, 3) for i in range(7)]
    run_engine(s, step, clock, requests=reqs, concurrency=2, sleep=clock.sleep)
    assert max(in_system) == 2 and len(s.finished) == 7
    arrivals = sorted(f.arrival_s for f in s.finished)
    assert arrivals[0] == arrivals[1] == 0.0 and arrivals[2] > 0  # each later request arrives when one leaves
    assert all(f.admitted_s == f.arrival_s for f in s.finished)


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def test_greedy_is_deterministic_with_ties_to_lowest_id():
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -0.5, -0.5]], jnp.bfloat16)
    greedy = sampling.SamplingParams()
    for key in [jax.random.key(0), jax.random.key(1)]:
        np.testing.assert_array_equal(sampling.sample(logits, greedy, key), [1, 0, 2])
        per_row = sampling.sample_per_row(logits, *sampling.stack_params([greedy] * 3), key)
        np.testing.assert_array_equal(per_row, [1, 0, 2])


def test_top_k_1_equals_greedy():
    logits = jax.random.normal(jax.random.key(3), (64, 500))
    greedy = jnp.argmax(logits, -1)
    p = sampling.SamplingParams(temperature=1.5, top_k=1)
    np.testing.assert_array_equal(sampling.sample(logits, p, jax.random.key(4)), greedy)
    per_row = sampling.sample_per_row(logits, *sampling.stack_params([p] * 64), jax.random.key(4))
    np.testing.assert_array_equal(per_row, greedy)


def empirical_freqs(ids: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount(ids, minlength=vocab) / ids.size


@pytest.mark.parametrize("per_row", [False, True])
def test_top_k_and_top_p_sample_only_their_set_with_the_right_frequencies(per_row):
    n = 20000
    probs = np.array([0.02, 0.4, 0.05, 0.25, 0.15, 0.03, 0.1])  # sorted ids: 1, 3, 4, 6, 2, 5, 0
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, probs.size))
    cases = [
        (sampling.SamplingParams(1.0, top_k=3), [1, 3, 4]),
        (sampling.SamplingParams(1.0, top_p=0.6), [1, 3]),  # mass before id 3 is 0.4 < 0.6, before id 4 0.65
        (sampling.SamplingParams(1.0, top_k=3, top_p=0.7), [1, 3]),  # renormalized over top 3: 0.5, 0.3125, 0.1875
        (sampling.SamplingParams(1.0), list(range(probs.size))),
    ]
    for params, support in cases:
        key = jax.random.key(42)
        if per_row:
            ids = sampling.sample_per_row(logits, *sampling.stack_params([params] * n), key)
        else:
            ids = jax.jit(sampling.sample, static_argnames="params")(logits, params, key)
        freqs = empirical_freqs(np.asarray(ids), probs.size)
        expect = np.zeros_like(probs)
        expect[support] = probs[support] / probs[support].sum()
        assert set(np.flatnonzero(freqs)) == set(support), params
        np.testing.assert_allclose(freqs, expect, atol=4 * np.sqrt(0.25 / n))


def test_temperature_sharpens_and_keys_reproduce():
    n = 20000
    logits = jnp.broadcast_to(jnp.log(jnp.array([0.5, 0.25, 0.25])), (n, 3))
    cold = np.asarray(sampling.sample(logits, sampling.SamplingParams(temperature=0.5), jax.random.key(0)))
    np.testing.assert_allclose(empirical_freqs(cold, 3), [2 / 3, 1 / 6, 1 / 6], atol=0.015)  # p**2 renormalized
    p = sampling.SamplingParams(temperature=0.8, top_k=2, top_p=0.9)
    a, b = (sampling.sample(logits[:64], p, jax.random.key(9)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sampling.sample(logits[:64], p, jax.random.key(10)))


def test_per_row_params_mix_greedy_and_sampling():
    logits = jax.random.normal(jax.random.key(5), (4, 300)) * 3
    rows = [sampling.SamplingParams(), sampling.SamplingParams(1.0, top_k=5), sampling.SamplingParams(0.7, top_p=0.5),
            sampling.SamplingParams(2.0)]
    fn = jax.jit(sampling.sample_per_row)
    top5 = np.argsort(-np.asarray(logits[1]), kind="stable")[:5]
    for seed in range(20):
        ids = np.asarray(fn(logits, *sampling.stack_params(rows), jax.random.key(seed)))
        assert ids.dtype == np.int32 and ids[0] == int(jnp.argmax(logits[0])) and ids[1] in top5
    with pytest.raises(ValueError):
        sampling.SamplingParams(top_p=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


@dataclasses.dataclass
class Timing:
    arrival_s: float
    first_token_s: float
    last_token_s: float
    prompt_len: int
    num_output_tokens: int


def test_run_metrics_hand_computed():
    records = [
        Timing(0.0, 1.0, 5.0, 10, 5),  # ttft 1,   tpot 4/4 = 1,   e2e 5
        Timing(1.0, 1.5, 2.5, 20, 3),  # ttft 0.5, tpot 1/2 = 0.5, e2e 1.5
        Timing(2.0, 4.0, 4.0, 30, 1),  # ttft 2,   tpot undefined, e2e 2
    ]
    lat = metrics.request_latencies(records)
    np.testing.assert_allclose(lat.ttft_s, [1.0, 0.5, 2.0])
    np.testing.assert_allclose(lat.tpot_s, [1.0, 0.5, np.nan])
    np.testing.assert_allclose(lat.e2e_s, [5.0, 1.5, 2.0])
    m = metrics.summarize_run(records, wall_s=10.0, num_gpus=2)
    assert (m.input_tokens, m.output_tokens) == (60, 9)
    assert m.input_tps == pytest.approx(6.0) and m.output_tps == pytest.approx(0.9)
    assert m.output_tps_per_gpu == pytest.approx(0.45)
    assert m.tps_per_user_mean == pytest.approx(1.5) and m.tps_per_user_median == pytest.approx(1.5)  # 1/1, 1/0.5
    assert m.ttft_median_s == pytest.approx(1.0) and m.ttft_p90_s == pytest.approx(1.8)  # 1 + 0.8 * (2 - 1)
    assert m.ttft_p99_s == pytest.approx(1.98)
    assert m.tpot_median_s == pytest.approx(0.75) and m.tpot_p90_s == pytest.approx(0.95)
    assert m.e2e_median_s == pytest.approx(2.0)


def test_step_time_stats_and_json():
    steps = [(0, 0.0, 1.0, 10), (0, 1.0, 3.0, 20), metrics.StepRecord(0, 3.0, 6.0, 30), (1, 0.0, 4.0, 5)]
    stats = metrics.step_time_stats(steps, num_bins=3)  # durations rank 0: 1, 2, 3; rank 1: 4; edges 1, 2, 3, 4
    np.testing.assert_allclose(stats[0].edges_s, [1.0, 2.0, 3.0, 4.0])
    assert stats[0].counts.tolist() == [1, 1, 1] and stats[1].counts.tolist() == [0, 0, 1]
    assert (stats[0].num_steps, stats[0].num_tokens, stats[0].busy_s, stats[0].mean_s) == (3, 60, 6.0, 2.0)
    assert (stats[0].median_s, stats[0].max_s, stats[1].median_s) == (2.0, 3.0, 4.0)
    assert stats[0].p90_s == pytest.approx(2.8)

    run = metrics.summarize_run([Timing(0.0, 1.0, 1.0, 4, 1)], wall_s=2.0, num_gpus=1)
    out = json.loads(json.dumps(metrics.to_json(run, stats), allow_nan=False))
    assert out["metrics"]["tpot_median_s"] is None and out["metrics"]["output_tps_per_gpu"] == 0.5
    assert out["metrics"]["step_time_median_max_over_ranks_s"] == 4.0
    assert [r["rank"] for r in out["rows"]] == [0, 1] and out["rows"][0]["counts"] == [1, 1, 1]
    assert math.isnan(run.tps_per_user_mean)


class FakeStepAhead:
    """`FakeModel` behind the step-ahead contract: `dispatch` runs the plan at once (PENDING tokens taken from
    the previous dispatch's tokens, which the host has not collected yet), `collect` hands its tokens over."""

    def __init__(self, model: FakeModel):
        self.model = model
        self.chained = 0  # decode items fed from the previous step's tokens

    def dispatch(self, plan, prev):
        decode = []
        for d in plan.decode:
            if d.token == PENDING:
                assert prev is not None and prev[d.request_id] is not None
                d = dataclasses.replace(d, token=prev[d.request_id])
                self.chained += 1
            decode.append(d)
        return self.model(dataclasses.replace(plan, decode=tuple(decode)))

    @staticmethod
    def collect(pending):
        return pending


def test_step_ahead_gives_the_same_outputs_and_drops_tokens_after_eos():
    """run_engine(step_ahead=...) plans and dispatches each decode step before the tokens of the step in flight
    are read: the outputs, finish reasons and page-free scheduler state equal the step-by-step run's, also for
    requests that end on EOS (their extra step's token is dropped) and with arrivals during decoding."""
    reqs = generate(WorkloadSpec(30, LognormalLength(60, 0.7, 4, 200), LognormalLength(12, 0.7, 1, 40),
                                 vocab_size=1000, arrival_rate_rps=300.0, seed=5))
    eos_at = reqs[3]  # its third output is the EOS id
    cfg = SchedulerConfig(max_batch_size=5, max_seq_len=512, token_budget=48,
                          eos_id=FakeModel.token(eos_at.request_id, eos_at.prompt_len + 2))

    def serve(ahead: bool):
        clock = FakeClock()
        s = Scheduler(cfg)
        model = FakeModel(cfg, clock)
        fake = FakeStepAhead(model)
        run = run_engine(s, None if ahead else model, clock, requests=reqs, sleep=clock.sleep,
                         step_ahead=fake if ahead else None)
        assert s.idle and not run.rejected
        return {f.request_id: (f.output_tokens, f.finish_reason) for f in s.finished}, fake.chained, model.plans

    sync, _, _ = serve(False)
    ahead, chained, plans = serve(True)
    assert ahead == sync and sync[eos_at.request_id] == (expected_output(eos_at)[:3], "eos")
    assert sum(r == "eos" for _, r in sync.values()) >= 1
    assert chained > len(plans) // 2  # most decode items came from the step before, on the "device"


def test_schedule_ahead_contract():
    cfg = SchedulerConfig(max_batch_size=2, max_seq_len=64, token_budget=16)
    s = Scheduler(cfg)
    with pytest.raises(RuntimeError, match="none is in flight"):
        s.schedule_ahead(0.0)
    s.submit(req("a", 20, 3))
    first = s.schedule(0.0)  # a 16-token chunk: the prompt is not done, nothing to plan ahead
    assert s.schedule_ahead(0.0) is None
    s.complete_step(first, {}, 0.1)
    last = s.schedule(0.1)  # the last chunk
    ahead = s.schedule_ahead(0.1)
    assert [(d.request_id, d.token, d.position) for d in ahead.decode] == [("a", PENDING, 20)]
    with pytest.raises(RuntimeError, match="already planned"):
        s.schedule_ahead(0.1)
    s.complete_step(last, {"a": 5}, 0.2)
    # the ahead step is now in flight; its successor: max_new_tokens=3 allows one more step after it
    after = s.schedule_ahead(0.2)
    assert [(d.token, d.position) for d in after.decode] == [(PENDING, 21)]
    s.complete_step(ahead, {"a": 6}, 0.3)
    assert s.schedule_ahead(0.3) is None  # the step in flight gives "a" its last token
    s.complete_step(after, {"a": 7}, 0.4)
    assert s.idle and s.finished[0].output_tokens == (5, 6, 7)


def test_schedule_ahead_keeps_running_while_the_queue_waits_for_pages():
    """A request that arrived but cannot be promised pages yet does not stop decode steps from running ahead;
    one that can be admitted does (the next `schedule` admits it)."""
    from dwdp_jax.engine.paged_cache import PagedCacheSpec, PageTable

    def scheduler():
        table = PageTable(PagedCacheSpec(num_layers=1, num_pages=3, num_slots=2, max_len=192, kv_lora_rank=32,
                                         rope_dim=16, page_size=64))
        s = Scheduler(SchedulerConfig(max_batch_size=2, max_seq_len=192, token_budget=64), page_table=table)
        s.submit(req("a", 60, 60))  # 120 tokens: 2 of the 3 pages promised
        return s, table, s.schedule(0.0)

    s, table, _ = scheduler()
    s.submit(req("b", 60, 60))  # needs 2 pages: 1 is left
    assert not table.can_reserve(1, 120)
    ahead = s.schedule_ahead(0.0)
    assert ahead is not None and [(d.request_id, d.token) for d in ahead.decode] == [("a", PENDING)]
    s, table, _ = scheduler()
    s.submit(req("c", 10, 20))  # 30 tokens: the free page covers it
    assert table.can_reserve(1, 30) and s.schedule_ahead(0.0) is None
