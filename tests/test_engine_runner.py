"""Slot cache and step runners against full forwards of the tiny model (float32, CPU, simulated devices).

Compile budget: every runner here uses one cache shape and the buckets ((4,), (8,)), so the prefill [4, 8]
and decode [4, 1] programs compile once for the module; references are full forwards of one [4, 32] shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwdp_jax.config import TINY
from dwdp_jax.engine import kv_cache
from dwdp_jax.engine.runner import (Buckets, DepRunner, DwdpRankRunner, LockstepScheduler, ModelRunner, _Row,
                                    pack_rows)
from dwdp_jax.engine.sampling import SamplingParams
from dwdp_jax.engine.scheduler import DecodeItem, FakeClock, PrefillChunk, Scheduler, SchedulerConfig, run_engine
from dwdp_jax.engine.workload import Request, split_by_rank
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dep import DepModel
from dwdp_jax.parallel.dwdp import DwdpGroup

CFG = TINY
SLOTS, MAX_LEN = 4, 32
BUCKETS = Buckets(batch=(4,), length=(8,))
REF_ROWS, REF_LEN = 4, 32
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=3)


@pytest.fixture(scope="module")
def full_logits(model):
    """seqs (token lists, each <= REF_LEN) -> per sequence [len, vocab] logits of one causal full forward."""
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graph, state)(ids))

    def run(seqs):
        out = []
        for i in range(0, len(seqs), REF_ROWS):
            group = seqs[i : i + REF_ROWS]
            buf = np.zeros((REF_ROWS, REF_LEN), np.int32)  # end padding: causal, so it changes nothing before it
            for r, s in enumerate(group):
                buf[r, : len(s)] = s
            logits = np.asarray(forward(state, buf))
            out += [logits[r, : len(s)] for r, s in enumerate(group)]
        return out

    return run


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def runner(model, **kw):
    return ModelRunner(model, SLOTS, MAX_LEN, buckets=kw.pop("buckets", BUCKETS), **kw)


def tokens(seed, n):
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, n).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Cache


def test_cache_spec_sizes_and_allocation():
    spec = kv_cache.CacheSpec.for_model(CFG, num_slots=3, max_len=20, dtype=jnp.bfloat16)
    per_token = CFG.num_layers * (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * 2
    assert spec.bytes_per_token == per_token
    assert spec.total_bytes == per_token * 4 * 21  # scratch slot and position included
    device = jax.devices()[1]
    cache = kv_cache.allocate(spec, device)
    assert len(cache) == CFG.num_layers and kv_cache.nbytes(cache) == spec.total_bytes
    assert cache[0].latent.shape == (4, 21, CFG.kv_lora_rank) and cache[0].k_pe.shape == (4, 21, CFG.qk_rope_head_dim)
    assert cache[0].latent.dtype == jnp.bfloat16 and cache[0].latent.devices() == {device}
    # the scratch slot and position, never real ones, take padding
    ids, positions, slots = pack_rows([_Row(1, 5, np.array([7, 8], np.int32))], 2, 4, spec)
    np.testing.assert_array_equal(ids, [[0, 0, 7, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[20, 20, 5, 6], [20, 20, 20, 20]])
    np.testing.assert_array_equal(slots, [1, 3])


def test_buckets():
    b = Buckets.default(max_batch_size=5, max_chunk_len=100, min_len=16)
    assert b.batch == (1, 2, 4, 8) and b.length == (16, 32, 64, 128)
    assert b.batch_for(3) == 4 and b.length_for(17) == 32
    with pytest.raises(ValueError, match="largest batch bucket"):
        b.batch_for(9)
    with pytest.raises(ValueError, match="ascending"):
        Buckets((4, 2), (8,))


# ---------------------------------------------------------------------------------------------------------------
# Cache equivalence


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_prefill_then_decode_matches_full_forward(model, full_logits, form):
    """S = 11 prompt tokens (prefill runs in pieces 8 + 3: the largest length bucket is 8), then k = 3
    decode tokens, each through the absorbed (decode) or the expanded (prefill) MLA form."""
    seq, s = tokens(0, 14), 11
    ref = full_logits([seq])[0]
    r = runner(model)
    got = [r.prefill([PrefillChunk("a", 2, 0, seq[:s], True)])[0]]
    for p in range(s, len(seq)):
        if form == "absorbed":
            got.append(r.decode([DecodeItem("a", 2, int(seq[p]), p)])[0])
        else:
            got.append(r.prefill([PrefillChunk("a", 2, p, seq[p : p + 1], True)])[0])
    for j, logits in enumerate(got):
        assert rel_err(logits, ref[s - 1 + j]) <= TOL, (form, j)


def test_chunked_prefill_equals_one_shot(model):
    seq = tokens(1, 13)
    one, two = runner(model), runner(model)
    a = one.prefill([PrefillChunk("a", 0, 0, seq[:11], True)])[0]
    two.prefill([PrefillChunk("a", 0, 0, seq[:5], False)])
    b = two.prefill([PrefillChunk("a", 0, 5, seq[5:11], True)])[0]
    assert rel_err(b, a) <= TOL
    for layer_one, layer_two in zip(one.cache, two.cache):
        assert rel_err(layer_two.latent[0, :11], layer_one.latent[0, :11]) <= TOL
        assert rel_err(layer_two.k_pe[0, :11], layer_one.k_pe[0, :11]) <= TOL
    da = one.decode([DecodeItem("a", 0, int(seq[11]), 11)])[0]
    db = two.decode([DecodeItem("a", 0, int(seq[11]), 11)])[0]
    assert rel_err(db, da) <= TOL


def test_requests_in_different_slots_do_not_disturb_each_other(model, full_logits):
    """Interleaved prefill chunks and decodes of three requests; a slot reused by a shorter request; the
    scratch slot and position filled with large values first, so that reading them would show."""
    r = runner(model)
    r.cache = [kv_cache_poisoned(kv, r.spec) for kv in r.cache]
    a, b, c, d = tokens(2, 12), tokens(3, 9), tokens(4, 15), tokens(5, 6)
    ref = dict(zip("abcd", full_logits([a, b, c, d])))
    check = lambda name, logits, pos: rel_err(logits, ref[name][pos]) <= TOL or pytest.fail(f"{name} at {pos}")

    out = r.prefill([PrefillChunk("a", 0, 0, a[:10], True), PrefillChunk("c", 3, 0, c[:4], False)])
    check("a", out[0], 9)
    check("c", out[1], 3)
    slot0 = [np.asarray(kv.latent[0, :10]) for kv in r.cache]
    out = r.prefill([PrefillChunk("c", 3, 4, c[4:12], True), PrefillChunk("b", 1, 0, b[:7], True)])
    check("c", out[0], 11)
    check("b", out[1], 6)
    for kv, before in zip(r.cache, slot0):  # slot 0 untouched by a step without it
        np.testing.assert_array_equal(np.asarray(kv.latent[0, :10]), before)
    out = r.decode([DecodeItem("c", 3, int(c[12]), 12), DecodeItem("a", 0, int(a[10]), 10),
                    DecodeItem("b", 1, int(b[7]), 7)])
    check("c", out[0], 12)
    check("a", out[1], 10)
    check("b", out[2], 7)
    # slot 3 freed and reused by a shorter request, with no clearing, while the others decode
    out = r.prefill([PrefillChunk("d", 3, 0, d[:5], True)])
    check("d", out[0], 4)
    out = r.decode([DecodeItem("a", 0, int(a[11]), 11), DecodeItem("d", 3, int(d[5]), 5),
                    DecodeItem("b", 1, int(b[8]), 8)])
    check("a", out[0], 11)
    check("d", out[1], 5)
    check("b", out[2], 8)


def kv_cache_poisoned(kv, spec):
    big = lambda x: x.at[spec.scratch_slot].set(1e4).at[:, spec.scratch_pos].set(-1e4)
    return type(kv)(big(kv.latent), big(kv.k_pe))


def test_bucket_padding_does_not_change_results(model):
    """The same request through exact-fit shapes (one row, the prompt's length) and padded buckets."""
    seq = tokens(6, 12)
    exact = runner(model, buckets=Buckets(batch=(4,), length=(10,)))  # 10: no padding for the prompt
    padded = runner(model, buckets=Buckets(batch=(4,), length=(8, 16)))  # 16: 6 padding tokens, 3 padding rows
    got = []
    for r in (exact, padded):
        got.append([r.prefill([PrefillChunk("a", 1, 0, seq[:10], True)])[0]])
        got[-1] += [r.decode([DecodeItem("a", 1, int(seq[p]), p)])[0] for p in (10, 11)]
    for x, y in zip(*got):
        assert rel_err(y, x) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Engine runs: greedy tokens against a naive loop of full forwards


REQUESTS = [(9, 4), (4, 6), (14, 3), (6, 5), (11, 2), (3, 6), (7, 4)]  # (prompt_len, max_new_tokens)


def engine_requests():
    return [Request(f"q{i}", tokens(10 + i, n), out) for i, (n, out) in enumerate(REQUESTS)]


def sched_config():
    return SchedulerConfig(max_batch_size=SLOTS, max_seq_len=MAX_LEN, token_budget=8)


@pytest.fixture(scope="module")
def naive_tokens(full_logits):
    """Greedy continuation of every request by full re-forwards (no cache)."""
    seqs = {r.request_id: list(r.prompt) for r in engine_requests()}
    want = {r.request_id: r.max_new_tokens for r in engine_requests()}
    while any(len(seqs[k]) - len(p.prompt) < want[k] for k, p in zip(seqs, engine_requests())):
        ids = list(seqs)
        for k, logits in zip(ids, full_logits([seqs[k] for k in ids])):
            seqs[k].append(int(np.argmax(logits[-1])))
    return {r.request_id: seqs[r.request_id][r.prompt_len : r.prompt_len + r.max_new_tokens]
            for r in engine_requests()}


def outputs(finished):
    return {f.request_id: list(f.output_tokens) for f in finished}


@pytest.fixture(scope="module")
def single_tokens(model):
    sched, r = Scheduler(sched_config()), runner(model)
    shapes = set()
    call = r._call

    def spy(ids, positions, slots, absorbed):
        shapes.add((ids.shape, absorbed))
        return call(ids, positions, slots, absorbed)

    r._call = spy
    run = run_engine(sched, r.step_fn, FakeClock(), requests=engine_requests())
    assert not run.rejected and len(sched.finished) == len(REQUESTS)
    assert shapes == {((4, 8), False), ((4, 1), True)}  # the buckets' two programs, nothing per request
    return outputs(sched.finished)


def test_engine_run_matches_naive_greedy_loop(single_tokens, naive_tokens):
    assert single_tokens == naive_tokens


def test_dwdp_rank_runners_match_single_device(model, single_tokens):
    group = DwdpGroup(model, jax.devices()[:2])
    runners = [DwdpRankRunner(rank, SLOTS, MAX_LEN, buckets=BUCKETS) for rank in group.ranks]
    assert runners[1].cache[0].latent.devices() == {jax.devices()[1]}
    scheds = [Scheduler(sched_config(), rank=r) for r in range(2)]
    per_rank = split_by_rank(engine_requests(), 2)

    def serve(rank, reqs):
        run_engine(scheds[rank.rank], runners[rank.rank].step_fn, FakeClock(), requests=reqs)

    group.run_parallel(serve, per_rank)
    got = outputs(scheds[0].finished + scheds[1].finished)
    assert got == single_tokens
    assert all(f.rank == 1 for f in scheds[1].finished) and len(scheds[1].finished) == len(per_rank[1])


def test_dep_lockstep_runner_matches_single_device(model, single_tokens):
    dep = DepRunner(DepModel(model, jax.devices()[:2]), SLOTS, MAX_LEN, buckets=BUCKETS)
    sched = LockstepScheduler([Scheduler(sched_config(), rank=r) for r in range(2)])
    run = run_engine(sched, dep.step_fn, FakeClock(), requests=engine_requests())
    assert not run.rejected
    assert outputs(sched.finished) == single_tokens
    assert {f.rank for f in sched.finished} == {0, 1}  # both devices served requests


def test_temperature_sampling_is_reproducible_per_seed(model, single_tokens):
    def serve(seed):
        sched = Scheduler(sched_config())
        r = runner(model, sampling=SamplingParams(temperature=1.0, top_k=8), seed=seed)
        run_engine(sched, r.step_fn, FakeClock(), requests=engine_requests())
        return outputs(sched.finished)

    a, b, c = serve(0), serve(0), serve(1)
    assert a == b and a != c and a != single_tokens
    assert all(len(a[r.request_id]) == r.max_new_tokens for r in engine_requests())
